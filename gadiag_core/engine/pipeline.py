"""One run, top to bottom (DESIGN §3 data flow):

    config -> components -> problems -> student rollouts -> verifier
    -> per rollout: student forward, teacher forwards, ideal vectors (estimator),
       distillation vectors (objectives), cosines -> records in the run directory
    -> aggregates -> summary.json (the CLI prints the leaderboard)
"""

from __future__ import annotations

import os
import time
from functools import partial

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from gadiag_core.config import RunConfig
from gadiag_core.interfaces import ContinuationRequest, Problem
from gadiag_core.errors import UsageError, writing
from gadiag_core.registry import Registry
from gadiag_core.reports.html_report import write_html_report
from gadiag_core.scoring.spaces import space_description
from gadiag_core.seeding import derive_seed
from gadiag_core.store.records import record_summary, write_parquet
from gadiag_core.store.rundir import RunDir
from gadiag_core.store.rundir import unit_name as store_unit_name
from gadiag_core.engine.components import Components, Rollout, build_components, run_context
from gadiag_core.engine.diagnose import diagnosis_steps, token_strings
from gadiag_core.engine.scheduler import SamplerStats, run_interleaved


# ----------------------------------------------------------------------------
# Student rollouts


def sample_rollouts(c: Components, problems: list[Problem], config: RunConfig, sample, on_done=None, chunk: int = 32) -> list[Rollout]:
    """`rollouts_per_question` student completions per problem, verified.

    Requested in chunks of about `chunk` rows: large enough to batch well,
    small enough for the progress bar to move. Seeds make the chunking
    irrelevant to the result."""
    per_question = config.run.rollouts_per_question
    requests, meta = [], []
    for problem in problems:
        messages = c.task.student_messages(problem)
        prompt_ids = c.student.encode_messages(messages)
        for index in range(per_question):
            requests.append(
                ContinuationRequest(
                    prefix_ids=tuple(prompt_ids),
                    max_new_tokens=config.student.max_new_tokens,
                    seed=derive_seed(config.run.seed, "rollout", problem.id, index),
                )
            )
            meta.append((problem, index, prompt_ids, messages))
    rollouts = []
    for start in range(0, len(requests), chunk):
        outputs = sample(requests[start : start + chunk])
        for (problem, index, prompt_ids, messages), generated in zip(meta[start : start + chunk], outputs):
            text = c.student.decode(generated)
            rollouts.append(Rollout(problem, index, prompt_ids, generated, text, bool(c.task.verify(problem, text)), messages))
            if on_done:
                on_done()
    return rollouts


# ----------------------------------------------------------------------------
# The whole run


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def run(config: RunConfig, registry: Registry, console: Console | None = None) -> tuple[RunDir, dict]:
    """Run (or resume) the diagnosis the config describes.

    Units of work: the student rollouts (sampled and stored together), then one
    unit per rollout diagnosed. Each unit is stored atomically when done; a rerun
    on the same run directory skips finished units, and the final files are
    assembled from the units in a fixed order, so an interrupted and resumed
    run ends with exactly the files of an uninterrupted one."""
    console = console or Console(stderr=True)
    started = time.time()
    threads = config.run.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    torch.manual_seed(config.run.seed)

    # Everything that can be checked before the models load is checked first,
    # and the run directory is created only then: bad input leaves no folder.
    task = registry.create("task", config.task.name, run_context(config, registry), **config.task.option_dict())
    problems = task.problems(config.run.questions, config.run.seed)
    check_problem_ids(problems, config.task.name)
    run_dir = RunDir.prepare(config.to_dict())
    # --executor ray: the actors start loading their models now, beside the
    # driver's own loading; the driver loads the student only (rollouts, summary).
    remote = start_remote(config, console) if config.run.executor == "ray" else None
    try:
        return _diagnose(config, registry, console, started, task, problems, run_dir, remote)
    finally:
        if remote is not None:
            remote.close()


def _diagnose(config: RunConfig, registry: Registry, console: Console, started: float, task, problems, run_dir: RunDir, remote):
    """The run after its checks: load, sample or reload the rollouts, diagnose
    the missing units (here or on `remote`), assemble the files."""
    with console.status("loading student and teachers…"):
        c = build_components(config, registry, task=task, teachers=remote is None)
    if c.task is not task:  # rebuilt with student-dependent defaults: its problems too
        problems = c.task.problems(config.run.questions, config.run.seed)
        check_problem_ids(problems, config.task.name)
    space_description(config.run.space, c.student.model)  # a selector that matches nothing fails here
    if remote is not None:
        remote.wait_ready()  # a model the workers cannot load fails here, before the folder exists
    run_dir.start(config.to_dict())
    console.print(f"run directory: {run_dir.path}")

    stats = SamplerStats()

    def sample(requests):
        return stats.sample(c.sampler, c.student, requests, c.student.temperature)

    with _progress(console) as progress:
        rollouts = load_rollouts(c, problems, run_dir, config.run.rollouts_per_question)
        if rollouts is None:
            n_rollouts = len(problems) * config.run.rollouts_per_question
            bar = progress.add_task("sampling student rollouts", total=n_rollouts)
            rollouts = sample_rollouts(c, problems, config, sample, on_done=lambda: progress.advance(bar))
            run_dir.write_jsonl("rollouts.jsonl", [rollout_row(c, r, config.student.max_new_tokens) for r in rollouts])

        expected = {unit_name(r): (r.problem.id, r.index) for r in rollouts}
        done = run_dir.finished_units(expected, warn=lambda line: console.print(line, style="yellow", soft_wrap=True, markup=False, highlight=False))
        bar = progress.add_task("diagnosing rollouts", total=len(rollouts), completed=len(done))

        def finished(r: Rollout, result) -> None:
            if unit_name(r) in done:
                return  # on Ray a wave with a missing unit runs whole; its done units are kept as written
            records, rollout_record = result
            run_dir.write_unit(unit_name(r), {"tokens": records, "rollout": rollout_record})
            progress.advance(bar)

        # Up to run.in_flight rollouts are diagnosed together, a new one
        # starting as soon as one finishes; their continuation requests share
        # sampler calls (gadiag_core.engine.scheduler). A continuation's
        # tokens do not depend on what it was batched with (draws close
        # enough for float rounding to matter are redone batch-free,
        # plugins/sampling/canonical.py), so a resumed run diagnoses only its
        # missing rollouts and still writes what an uninterrupted one would.
        # On Ray a wave of run.in_flight rollouts is what an actor diagnoses.
        # Units are written (here, by the driver alone) as they finish; the
        # final files are assembled in a fixed order below.
        missing = [r for r in rollouts if unit_name(r) not in done]
        if remote is None:
            session = stats.session(c.sampler, c.student, c.student.temperature)
            diagnose_locally(c, missing, rollouts, problems, config, config.run.in_flight, session, finished)
        else:
            waves = [w for w in wave_bounds(len(rollouts), config.run.in_flight) if not all(unit_name(r) in done for r in rollouts[w[0] : w[1]])]
            remote.diagnose(rollouts, waves, finished, stats)
    units = [run_dir.read_unit(unit_name(r)) for r in rollouts]
    token_records = [record for unit in units for record in unit["tokens"]]
    rollout_records = [unit["rollout"] for unit in units]
    run_dir.write_jsonl("tokens.jsonl", token_records)
    run_dir.write_jsonl("questions.jsonl", rollout_records)
    infos = teacher_infos(c) if remote is None else remote.teacher_infos
    summary = summarize(config, c, rollouts, token_records, rollout_records, infos)
    # This session's sampler accounting (a resumed run counts only its own part).
    summary["throughput"] = stats.summary(time.time() - started)
    summary["throughput"].update({"executor": "local"} if remote is None else remote.describe())
    run_dir.write_json("summary.json", summary)
    # Files people open: Parquet records and the HTML report with its plots.
    with writing(run_dir.path):
        write_parquet(run_dir.path)
    with writing(run_dir.path / "report"):
        write_html_report(run_dir.path)
    console.print(f"wall time {time.time() - started:.1f} s")
    return run_dir, summary


def wave_bounds(n: int, size: int) -> list[tuple[int, int]]:
    """[start, stop) of each wave: rollouts in fixed groups of `size`, in rollout order."""
    return [(i, min(i + size, n)) for i in range(0, n, size)]


def diagnose_locally(c: Components, units: list[Rollout], rollouts: list[Rollout], problems: list[Problem], config: RunConfig, in_flight: int, session, finished) -> None:
    """Diagnose `units` (some of `rollouts`) in this process, up to `in_flight`
    at a time, their requests going through one sampler `session`;
    `finished(rollout, (token records, rollout record))` per unit, as each
    finishes.
    (gadiag_core.engine.ray_executor runs this same function on an actor, for
    one wave.)"""
    by_question: dict[str, list[Rollout]] = {}
    for r in rollouts:
        by_question.setdefault(r.problem.id, []).append(r)
    # Longest rollouts first (more nodes, longer continuations from early
    # ones: the longest diagnoses), so the short ones fill the end of the run
    # rather than leaving a few long ones to decode alone in small batches.
    # The default job: 339 decoding steps of 74.1 rows instead of 396 of 63.4
    # in rollout order. The records do not depend on the order.
    order = sorted(units, key=lambda r: -len(r.generated_ids))
    starts = [(r, partial(diagnosis_steps, c, r, by_question[r.problem.id], problems, config)) for r in order]
    run_interleaved(starts, session, in_flight, finished)


def start_remote(config: RunConfig, console: Console):
    """The Ray executor, connected and its actors starting (imported only here:
    ray is an optional extra and slow to import)."""
    from gadiag_core.engine.ray_executor import RayExecutor

    return RayExecutor.start(config, console)


def unit_name(rollout: Rollout) -> str:
    """The rollout's unit file stem (a digest of the question id: ids are user data)."""
    return store_unit_name(rollout.problem.id, rollout.index)


def check_problem_ids(problems: list[Problem], task: str) -> None:
    """Question ids key every record and unit: two questions with one id would
    overwrite each other. UsageError naming the repeated ids."""
    counts: dict[str, int] = {}
    for problem in problems:
        counts[problem.id] = counts.get(problem.id, 0) + 1
    repeated = [f"{ident!r} ({n}×)" for ident, n in counts.items() if n > 1]
    if repeated:
        shown = ", ".join(repeated[:5]) + (f" and {len(repeated) - 5} more" if len(repeated) > 5 else "")
        raise UsageError(f"task {task!r} gave repeated question ids: {shown}; every question needs its own id")


def rollout_row(c: Components, r: Rollout, limit: int) -> dict:
    return {
        "question": r.problem.id,
        "rollout": r.index,
        "correct": r.correct,
        "text": r.text,
        "generated_ids": r.generated_ids,
        "tokens": token_strings(c.student, r.generated_ids),
        "question_text": r.problem.question,
        "answer": r.problem.answer,
        "cut": was_cut(c, r, limit),  # stopped by the max_new_tokens limit, not by an end-of-sequence token
    }


def was_cut(c: Components, r: Rollout, limit: int) -> bool:
    """True when the rollout was stopped by the token limit (not by EOS or a stop string)."""
    ids = r.generated_ids
    return len(ids) >= limit and ids[-1] not in set(c.student.eos_token_ids)


def load_rollouts(c: Components, problems: list[Problem], run_dir: RunDir, per_question: int) -> list[Rollout] | None:
    """The stored rollouts of a resumed run (prompts rebuilt from the task), or
    None when none are stored. They are verified: every line parses, names a
    question of this run, and the set is complete (per_question rollouts of
    every question); anything else is a UsageError saying how to recover."""
    path = run_dir.path / "rollouts.jsonl"
    recover = f"delete {path} and {run_dir.path / 'units'} to sample the rollouts again, or pick a new --run-dir"
    rows = run_dir.read_jsonl("rollouts.jsonl", "rollout", recover)
    if rows is None:
        return None
    return rollouts_from_rows(c, problems, rows, per_question, path, recover)


def rollouts_from_rows(c: Components, problems: list[Problem], rows: list[dict], per_question: int, path, recover: str) -> list[Rollout]:
    """Rollouts rebuilt from their rows (question, rollout, generated_ids, text,
    correct; prompts rebuilt from the task), checked: every row names a
    question of this run, none repeats, the set is complete."""
    by_id = {p.id: p for p in problems}
    rollouts, seen = [], set()
    for number, row in enumerate(rows, 1):
        try:
            key = (row["question"], int(row["rollout"]))
            generated, text, correct = list(row["generated_ids"]), str(row["text"]), bool(row["correct"])
        except (KeyError, TypeError, ValueError):
            raise UsageError(f"{path} record {number} lacks question, rollout, text, generated_ids or correct: {recover}") from None
        problem = by_id.get(key[0])
        if problem is None:
            raise UsageError(f"{path} record {number} names question {key[0]!r}, which is not a question of this run: {recover}")
        if key in seen or not 0 <= key[1] < per_question:
            raise UsageError(f"{path} record {number} repeats or misnumbers rollout {key[1]} of question {key[0]!r}: {recover}")
        seen.add(key)
        messages = c.task.student_messages(problem)
        rollouts.append(Rollout(problem, key[1], c.student.encode_messages(messages), generated, text, correct, messages))
    wanted = len(problems) * per_question
    if len(rollouts) != wanted:
        raise UsageError(f"{path} holds {len(rollouts)} of the run's {wanted} rollouts (a damaged or truncated file): {recover}")
    return rollouts


def teacher_infos(c: Components) -> dict:
    """Each loaded teacher's `info` (external teachers: model, tokenizer, path)."""
    return {name: dict(getattr(teacher, "info", None) or {}) for name, teacher in c.teachers.items()}


def teacher_info(infos: dict, token_records) -> dict:
    """External teachers (`infos`: teacher_infos of the components that held
    them): model, tokenizer, path (ids or bytes), and for the byte path the
    mean teacher mass on the candidates and the mean mass left out."""
    out = {}
    for name, info in infos.items():
        info = dict(info or {})
        if not info:
            continue
        masses = [r["teacher_mass"][name] for r in token_records if name in r.get("teacher_mass", {})]
        if masses:
            info["covered_mass"] = sum(m["covered"] for m in masses) / len(masses)
            info["left_out"] = sum(m["left_out"] for m in masses) / len(masses)
        out[name] = info
    return out


def summarize(config, c: Components, rollouts, token_records, rollout_records, infos: dict) -> dict:
    """summary.json: what the run was (task, student, space, plugins) and what
    its records say (gadiag_core.store.records.record_summary). `infos`:
    see teacher_infos (on Ray, the workers')."""
    rows = [rollout_row(c, r, config.student.max_new_tokens) for r in rollouts]
    return {
        "task": c.task.name,
        "task_version": c.task.version,
        "task_source": getattr(c.task, "source", None),
        "student": getattr(config.student_options, "model", config.student.backend),
        "space": config.run.space,
        "space_description": space_description(config.run.space, c.student.model),
        "estimator": config.estimator.name,
        "sampler": config.sampler.name,
        "teachers": list(config.run.teachers),  # c.teachers is empty on a Ray driver
        "teacher_info": teacher_info(infos, token_records),
        "objectives": list(c.objectives),
        # Non-default settings matter to read a row: e.g. {"jsd": {"beta": 0.9}}.
        "objective_options": {name: choice.option_dict() for name, choice in config.objectives.items() if choice.option_dict()},
        "max_new_tokens": config.student.max_new_tokens,
        **record_summary(rows, rollout_records, token_records),
    }
