"""One run, top to bottom (DESIGN §3 data flow):

    config -> components -> problems -> student rollouts -> verifier
    -> per rollout: student forward, teacher forwards, ideal vectors (estimator),
       distillation vectors (objectives), cosines -> records in the run directory
    -> aggregates -> summary.json (the CLI prints the leaderboard)
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from gadiag_core.scoring import noise as noise_mod
from gadiag_core.scoring.alignment import aggregate
from gadiag_core.config import RunConfig
from gadiag_core.options import as_dict
from gadiag_core.reports.html_report import write_html_report
from gadiag_core.interfaces import (
    ContextInputs,
    ContinuationRequest,
    EstimationJob,
    GradientEstimator,
    Objective,
    Problem,
    RolloutSampler,
    RolloutView,
    RunContext,
    Student,
    Task,
    Teacher,
)
from gadiag_core.store.records import write_parquet
from gadiag_core.registry import Registry
from gadiag_core.store.rundir import RunDir
from gadiag_core.seeding import derive_seed
from gadiag_core.scoring.spaces import alignment_scores, space_description
from gadiag_core.scoring.vectors import policy, rl_outcome_vector


@dataclass
class Components:
    task: Task
    student: Student
    teachers: dict[str, Teacher]
    objectives: dict[str, Objective]
    sampler: RolloutSampler
    estimator: GradientEstimator


@dataclass
class Rollout:
    problem: Problem
    index: int
    prompt_ids: list[int]
    generated_ids: list[int]
    text: str
    correct: bool
    messages: list[dict] = field(default_factory=list)


# ----------------------------------------------------------------------------
# Building the components a config names


def build_components(config: RunConfig, registry: Registry) -> Components:
    """Every component of the run, built through the registry (names and
    options were checked by config.validate; models load here)."""
    run = RunContext(
        seed=config.run.seed,
        rollouts_total=config.rollouts_total,
        max_new_tokens=config.student.max_new_tokens,
        temperature=config.student.temperature,
        dtype=getattr(config.student_options, "dtype", "float32") or "float32",
        registry=registry,
    )
    task = registry.create("task", config.task.name, run, **config.task.option_dict())
    sampler = registry.create("sampler", config.sampler.name, run, **config.sampler.option_dict())
    estimator = registry.create("estimator", config.estimator.name, run, **config.estimator.option_dict())
    objectives = {name: registry.create("objective", name, run, **choice.option_dict()) for name, choice in config.objectives.items()}
    run.student = registry.create("student", config.student.backend, run, **_set(config.student_options))
    teachers = {}
    for name in config.run.teachers:
        if name in config.teachers:
            choice = config.teachers[name]
            teacher = registry.create("teacher_type", choice.name, run, **_set(choice.options))
            teacher.name = name
        else:
            teacher = registry.create("teacher", name, run)
        teachers[name] = teacher
    return Components(task, run.student, teachers, objectives, sampler, estimator)


def _set(options) -> dict:
    """An options instance as the keyword arguments that rebuild it."""
    return {k: v for k, v in as_dict(options).items()}


# ----------------------------------------------------------------------------
# Student rollouts


def sample_rollouts(c: Components, problems: list[Problem], config: dict, on_done=None, chunk: int = 32) -> list[Rollout]:
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
        outputs = c.sampler.sample(c.student, requests[start : start + chunk], c.student.temperature)
        for (problem, index, prompt_ids, messages), generated in zip(meta[start : start + chunk], outputs):
            text = c.student.decode(generated)
            rollouts.append(Rollout(problem, index, prompt_ids, generated, text, bool(c.task.verify(problem, text)), messages))
            if on_done:
                on_done()
    return rollouts


# ----------------------------------------------------------------------------
# Diagnosing one rollout


def diagnose_rollout(c: Components, rollout: Rollout, siblings: list[Rollout], problems: list[Problem], config: dict):
    """Token records and the rollout record for one student rollout."""
    seed = derive_seed(config.run.seed, "diagnose", rollout.problem.id, rollout.index)
    tau = c.student.temperature
    gen = rollout.generated_ids
    z = c.student.node_logits(rollout.prompt_ids, gen).float()  # [T, V]
    width = z.shape[-1]

    inputs = ContextInputs(
        task=c.task,
        problem=rollout.problem,
        student_messages=rollout.messages,
        other_problems=problems,
        rollouts=[RolloutView(s.index, s.text, s.correct) for s in siblings],
        rollout_index=rollout.index,
        rng=random.Random(seed),
    )
    teacher_logprobs, skipped = {}, []
    for name, teacher in c.teachers.items():
        logprobs = teacher.node_logprobs(inputs, gen)
        if logprobs is None:
            skipped.append(name)
            continue
        if logprobs.shape[-1] != width:  # same tokenizer, padded differently
            logprobs = torch.log_softmax(logprobs[..., :width], dim=-1)
        teacher_logprobs[name] = logprobs

    estimate = c.estimator.estimate(
        EstimationJob(
            student=c.student,
            sampler=c.sampler,
            prompt_ids=rollout.prompt_ids,
            generated_ids=gen,
            student_logits=z,
            teacher_preferred={name: lp.argmax(-1) for name, lp in teacher_logprobs.items()},
            verify=lambda text: c.task.verify(rollout.problem, text),
            max_new_tokens=config.student.max_new_tokens,
            seed=seed,
        )
    )
    rollout_record = {
        "question": rollout.problem.id,
        "rollout": rollout.index,
        "correct": rollout.correct,
        "tokens": len(gen),
        "skipped_teachers": skipped,
        "budget": estimate.budget,
        "question_cos": {},
    }
    if not estimate.nodes:
        return [], rollout_record

    # Every vector densified at the scored nodes: [N, V].
    sel = torch.tensor([n.node for n in estimate.nodes])
    sampled = torch.tensor(gen)[sel]
    z_sel = z[sel]
    probs_sel = policy(z_sel, tau)
    vectors: dict[str, torch.Tensor] = {}
    for name, part in (("ideal", lambda n: n.ideal), ("ideal_half0", lambda n: n.ideal_halves[0]), ("ideal_half1", lambda n: n.ideal_halves[1])):
        dense = torch.zeros(len(sel), width)
        for row, node in enumerate(estimate.nodes):
            dense[row, node.candidates] = part(node).float()
        vectors[name] = dense

    # Distillation vectors b per teacher x objective, and the reference rows.
    pairs: dict[str, tuple[str, str]] = {}
    for tname, logprobs in teacher_logprobs.items():
        for oname, objective in c.objectives.items():
            row = f"{tname}/{oname}"
            vectors[row] = objective.vector(z_sel, logprobs[sel], sampled, tau)
            pairs[row] = ("ideal", row)
    advantage = torch.tensor([float(rollout.correct) - n.value for n in estimate.nodes])
    vectors["rl_outcome"] = rl_outcome_vector(probs_sel, sampled, advantage, tau)
    pairs["rl_outcome"] = ("ideal", "rl_outcome")
    # Noise ceiling: agreement of the two independent halves of â*.
    pairs["noise_ceiling"] = ("ideal_half0", "ideal_half1")

    scores = alignment_scores(config.run.space, c.student, rollout.prompt_ids, gen, sel, vectors, pairs)
    cos_rows = {row: per_node for row, (per_node, _) in scores.items()}
    rollout_record["question_cos"] = {row: per_question for row, (_, per_question) in scores.items()}
    noise = noise_terms(estimate.nodes, probs_sel, vectors, pairs, tau, seed) if config.run.space == "logits" else None
    if noise is not None:
        rollout_record["question_cos_corrected"] = noise["question_corrected"]

    # Each teacher's three most likely tokens at the scored nodes (for reports).
    teacher_top = {}
    for tname, logprobs in teacher_logprobs.items():
        top_p, top_k = logprobs[sel].exp().topk(3, dim=-1)
        teacher_top[tname] = (top_k.tolist(), top_p.tolist())
    records = []
    for row, node in enumerate(estimate.nodes):
        t = node.node
        records.append(
            {
                "question": rollout.problem.id,
                "rollout": rollout.index,
                "node": t,
                "correct": rollout.correct,
                "token_id": gen[t],
                "token": c.student.tokenizer.decode([gen[t]]),
                "pi_token": float(probs_sel[row, sampled[row]]),
                "pi_max": float(probs_sel[row].max()),
                "value": node.value,
                "covered_mass": node.covered_mass,
                "candidates": node.candidates.tolist(),
                "candidate_tokens": token_strings(c.student, node.candidates.tolist()),
                "candidate_pi": node.probs.tolist(),
                "q_hat": node.q_hat.tolist(),
                "counts": node.counts.tolist(),
                "cos": {name: float(values[row]) for name, values in cos_rows.items()},
                **(
                    {
                        "a_sq": float(noise["a_sq"][row]),
                        "energy": float(noise["energy"][row]),
                        "cos_ci": {name: bounds[row] for name, bounds in noise["intervals"].items()},
                    }
                    if noise is not None
                    else {}
                ),
                "teacher_top": {
                    tname: [[c.student.tokenizer.decode([k]), p] for k, p in zip(ids[row], probs[row])]
                    for tname, (ids, probs) in teacher_top.items()
                },
            }
        )
    return records, rollout_record


def node_energy(node, tau: float) -> torch.Tensor:
    """An unbiased estimate of ‖a*‖² on the node's candidates: the estimator's
    own (`energy_binomial`, which knows which Q̂ are exact), else the binomial
    one from the counts; ‖â‖² when no Q̂ is replicated (exact estimators)."""
    own = getattr(node, "energy_binomial", None)
    if own is not None:
        return torch.as_tensor(own, dtype=torch.float64)
    if bool((node.counts <= 1).all()):
        return (node.ideal.double() ** 2).sum()
    return noise_mod.binomial_energy(node.ideal, node.probs, node.q_hat, node.counts, tau)


def noise_terms(nodes, probs_sel, vectors, pairs, tau: float, seed: int) -> dict:
    """Monte-Carlo noise of the ideal vectors, in the logits space (DESIGN §1 "Noise",
    gadiag_core.scoring.noise): per node ‖â‖² and the binomial estimate of ‖a*‖² (the
    energy that corrected aggregates use); per rollout the pooled corrected
    per-question cosine of each row; per token a 95% posterior interval of each
    row's full-vocabulary cosine."""
    a_sq = torch.stack([(n.ideal.double() ** 2).sum() for n in nodes])
    energy = torch.stack([node_energy(n, tau) for n in nodes])
    rows = [row for row, (a, _) in pairs.items() if a == "ideal"]
    question_corrected, intervals = {}, {row: [] for row in rows}
    for row in rows:
        b = vectors[row].double()
        dots = (vectors["ideal"].double() * b).sum(-1)
        question_corrected[row] = noise_mod.pooled_cosine(dots, energy, (b * b).sum(-1))
    pp_total = (probs_sel.double() ** 2).sum(-1)  # [N]
    for i, node in enumerate(nodes):
        cand = node.candidates
        b_all = torch.stack([vectors[row][i].double() for row in rows])  # [P, V]
        pi = probs_sel[i].double()
        b_c = b_all[:, cand]
        out_pb = b_all @ pi - b_c @ pi[cand]
        out_pp = float(pp_total[i] - (pi[cand] ** 2).sum())
        counts = node.counts.clamp(min=0)
        low, high, _ = noise_mod.cosine_interval(
            node.probs, node.q_hat, counts, b_c, b_all.norm(dim=-1), out_pb, out_pp, tau, seed=derive_seed(seed, "ci", node.node)
        )
        for j, row in enumerate(rows):
            intervals[row].append([float(low[j]), float(high[j])])
    return {"a_sq": a_sq, "energy": energy, "question_corrected": question_corrected, "intervals": intervals}


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


def run(config: dict, registry: Registry, console: Console | None = None) -> tuple[RunDir, dict]:
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

    with _progress(console) as progress:
        rollouts = load_rollouts(c, problems, run_dir)
        if rollouts is None:
            n_rollouts = len(problems) * config.run.rollouts_per_question
            bar = progress.add_task("sampling student rollouts", total=n_rollouts)
            rollouts = sample_rollouts(c, problems, config, on_done=lambda: progress.advance(bar))
            run_dir.write_jsonl("rollouts.jsonl", [rollout_row(c, r) for r in rollouts])
        by_question: dict[str, list[Rollout]] = {}
        for r in rollouts:
            by_question.setdefault(r.problem.id, []).append(r)

        done = run_dir.finished_units()
        todo = [r for r in rollouts if unit_name(r) not in done]
        bar = progress.add_task("diagnosing rollouts", total=len(rollouts), completed=len(rollouts) - len(todo))
        for r in todo:
            records, rollout_record = diagnose_rollout(c, r, by_question[r.problem.id], problems, config)
            run_dir.write_unit(unit_name(r), {"tokens": records, "rollout": rollout_record})
            progress.advance(bar)

    units = [run_dir.read_unit(unit_name(r)) for r in rollouts]
    token_records = [record for unit in units for record in unit["tokens"]]
    rollout_records = [unit["rollout"] for unit in units]
    run_dir.write_jsonl("tokens.jsonl", token_records)
    run_dir.write_jsonl("questions.jsonl", rollout_records)
    summary = summarize(config, c, rollouts, token_records, rollout_records)
    run_dir.write_json("summary.json", summary)
    # Files people open: Parquet records and the HTML report with its plots.
    write_parquet(run_dir.path)
    write_html_report(run_dir.path)
    console.print(f"wall time {time.time() - started:.1f} s")
    return run_dir, summary


def unit_name(rollout: Rollout) -> str:
    return f"{rollout.problem.id}.r{rollout.index}"


def token_strings(lm, ids: list[int]) -> list[str]:
    """Each token as the text it adds (for display), not the tokenizer's raw form."""
    return [lm.tokenizer.decode([i]) for i in ids]


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
        "questions": len({r.problem.id for r in rollouts}),
        "rollouts": len(rollouts),
        "accuracy": sum(r.correct for r in rollouts) / len(rollouts) if rollouts else float("nan"),
        "rollouts_correct": sum(r.correct for r in rollouts),
        "budget": budget,
        "rows": aggregate(token_records, rollout_records),
    }
