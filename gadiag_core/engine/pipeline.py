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
from gadiag_core.registry import Registry
from gadiag_core.reports.html_report import write_html_report
from gadiag_core.scoring.alignment import aggregate
from gadiag_core.scoring.oracle import oracle_summary
from gadiag_core.scoring.spaces import space_description
from gadiag_core.seeding import derive_seed
from gadiag_core.store.records import write_parquet
from gadiag_core.store.rundir import RunDir
from gadiag_core.engine.components import Components, Rollout, build_components
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

    run_dir = RunDir.open_or_create(config.to_dict())
    with console.status("loading student and teachers…"):
        c = build_components(config, registry)
    console.print(f"run directory: {run_dir.path}")
    problems = c.task.problems(config.run.questions, config.run.seed)

    stats = SamplerStats()

    def sample(requests):
        return stats.sample(c.sampler, c.student, requests, c.student.temperature)

    with _progress(console) as progress:
        rollouts = load_rollouts(c, problems, run_dir)
        if rollouts is None:
            n_rollouts = len(problems) * config.run.rollouts_per_question
            bar = progress.add_task("sampling student rollouts", total=n_rollouts)
            rollouts = sample_rollouts(c, problems, config, sample, on_done=lambda: progress.advance(bar))
            run_dir.write_jsonl("rollouts.jsonl", [rollout_row(c, r) for r in rollouts])
        by_question: dict[str, list[Rollout]] = {}
        for r in rollouts:
            by_question.setdefault(r.problem.id, []).append(r)

        done = run_dir.finished_units()
        todo = [r for r in rollouts if unit_name(r) not in done]
        bar = progress.add_task("diagnosing rollouts", total=len(rollouts), completed=len(rollouts) - len(todo))

        def finished(r: Rollout, result) -> None:
            records, rollout_record = result
            run_dir.write_unit(unit_name(r), {"tokens": records, "rollout": rollout_record})
            progress.advance(bar)

        # Up to run.in_flight rollouts at once; their continuation requests
        # share sampler calls (gadiag_core.engine.scheduler). Units are written
        # as they finish; the final files are assembled in a fixed order below.
        starts = ((r, partial(diagnosis_steps, c, r, by_question[r.problem.id], problems, config)) for r in todo)
        run_interleaved(starts, sample, config.run.in_flight, finished)

    units = [run_dir.read_unit(unit_name(r)) for r in rollouts]
    token_records = [record for unit in units for record in unit["tokens"]]
    rollout_records = [unit["rollout"] for unit in units]
    run_dir.write_jsonl("tokens.jsonl", token_records)
    run_dir.write_jsonl("questions.jsonl", rollout_records)
    summary = summarize(config, c, rollouts, token_records, rollout_records)
    # This session's sampler accounting (a resumed run counts only its own part).
    summary["throughput"] = stats.summary(time.time() - started)
    run_dir.write_json("summary.json", summary)
    # Files people open: Parquet records and the HTML report with its plots.
    write_parquet(run_dir.path)
    write_html_report(run_dir.path)
    console.print(f"wall time {time.time() - started:.1f} s")
    return run_dir, summary


def unit_name(rollout: Rollout) -> str:
    return f"{rollout.problem.id}.r{rollout.index}"


def rollout_row(c: Components, r: Rollout) -> dict:
    return {
        "question": r.problem.id,
        "rollout": r.index,
        "correct": r.correct,
        "text": r.text,
        "generated_ids": r.generated_ids,
        "tokens": token_strings(c.student, r.generated_ids),
        "question_text": r.problem.question,
        "answer": r.problem.answer,
    }


def load_rollouts(c: Components, problems: list[Problem], run_dir: RunDir) -> list[Rollout] | None:
    """The stored rollouts of a resumed run (prompts rebuilt from the task), or None."""
    rows = run_dir.read("rollouts.jsonl")
    if not rows:
        return None
    by_id = {p.id: p for p in problems}
    rollouts = []
    for row in rows:
        problem = by_id[row["question"]]
        messages = c.task.student_messages(problem)
        rollouts.append(
            Rollout(problem, row["rollout"], c.student.encode_messages(messages), row["generated_ids"], row["text"], row["correct"], messages)
        )
    return rollouts


def summarize(config, c: Components, rollouts, token_records, rollout_records) -> dict:
    budget: dict[str, float] = {}
    for record in rollout_records:
        for key, value in record["budget"].items():
            budget[key] = budget.get(key, 0) + value
    masses = [r["covered_mass"] for r in token_records]
    budget["mean_covered_mass"] = sum(masses) / len(masses) if masses else float("nan")
    return {
        "task": c.task.name,
        "task_version": c.task.version,
        "task_source": getattr(c.task, "source", None),
        "student": getattr(config.student_options, "model", config.student.backend),
        "space": config.run.space,
        "space_description": space_description(config.run.space, c.student.model),
        "estimator": config.estimator.name,
        "sampler": config.sampler.name,
        "teachers": list(c.teachers),
        "objectives": list(c.objectives),
        # Non-default settings matter to read a row: e.g. {"jsd": {"beta": 0.9}}.
        "objective_options": {name: choice.option_dict() for name, choice in config.objectives.items() if choice.option_dict()},
        "questions": len({r.problem.id for r in rollouts}),
        "rollouts": len(rollouts),
        "accuracy": sum(r.correct for r in rollouts) / len(rollouts) if rollouts else float("nan"),
        "rollouts_correct": sum(r.correct for r in rollouts),
        "budget": budget,
        "rows": aggregate(token_records, rollout_records),
        # The per-token oracle (split-half selection), switch rate, winners.
        "oracle": oracle_summary(token_records),
    }
