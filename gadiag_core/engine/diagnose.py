"""Diagnosing one student rollout, in five stages (DESIGN §1–2):

    teacher_logprobs   the student's logits z and each teacher's log p_T at
                       every node (one batched read per model)       [T, V] each
                       (a CandidateTeacher — another tokenizer — only prepares
                       here and names its preferred token at every node)
    estimate_ideal     the estimator's ideal vectors â* at the nodes it scores (a
                       request generator: its continuation requests go out in
                       batches, gadiag_core.engine.scheduler)
    scored_logprobs    every teacher's log p at the scored nodes     [N, V] per teacher
                       (CandidateTeachers score the nodes' candidate sets now)
    node_vectors       every vector densified at the scored nodes    [N, V] per row
    records            cosines (gadiag_core.scoring.spaces), noise terms, and
                       the token and rollout records written to the run directory

`diagnosis_steps` runs them in order as a generator that yields continuation
requests and returns (token records, rollout record); the run drives many of
them at once (gadiag_core.engine.scheduler; `run.in_flight = 1` drives one
after another).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from gadiag_core.engine.components import Components, Rollout
from gadiag_core.errors import UsageError
from gadiag_core.interfaces import CandidateTeacher, ContextInputs, EstimationJob, IdealEstimate, Problem, PromptedTeacher, RolloutView
from gadiag_core.scoring import noise as noise_mod
from gadiag_core.scoring.spaces import alignment_scores
from gadiag_core.scoring.vectors import policy, rl_outcome_vector
from gadiag_core.seeding import derive_seed


def token_strings(lm, ids: list[int]) -> list[str]:
    """Each token as the text it adds (for display), not the tokenizer's raw form."""
    return [lm.tokenizer.decode([i]) for i in ids]


# ----------------------------------------------------------------------------
# 1. Teachers


def context_inputs(c: Components, rollout: Rollout, siblings: list[Rollout], problems: list[Problem], seed: int) -> ContextInputs:
    return ContextInputs(
        task=c.task,
        problem=rollout.problem,
        student_messages=rollout.messages,
        other_problems=problems,
        rollouts=[RolloutView(s.index, s.text, s.correct) for s in siblings],
        rollout_index=rollout.index,
        rng=random.Random(seed),
    )


def check_teacher_output(name: str, logprobs, steps: int, width: int) -> torch.Tensor:
    """The plugin boundary: a teacher's output must be a [T, ≥V] tensor of finite
    log-probabilities (−inf allowed: a token the teacher rules out)."""
    if not isinstance(logprobs, torch.Tensor):
        raise UsageError(f"teacher {name!r} returned {type(logprobs).__name__}, not a tensor of log-probabilities [T, V]")
    if logprobs.dim() != 2 or logprobs.shape[0] != steps or logprobs.shape[1] < width:
        raise UsageError(f"teacher {name!r} returned log-probabilities of shape {tuple(logprobs.shape)}; expected [{steps}, {width}] (one row per generated token)")
    if torch.isnan(logprobs).any() or torch.isposinf(logprobs).any():
        raise UsageError(f"teacher {name!r} returned NaN or +inf log-probabilities; check the teacher plugin")
    return logprobs


@dataclass
class Prepared:
    """A CandidateTeacher's per-rollout handle (its `preferred` [T] feeds the estimator)."""

    teacher: CandidateTeacher
    handle: object


def _teacher_failed(name: str, problem_id: str, exc: Exception) -> UsageError:
    """The plugin boundary: one line naming the teacher."""
    reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    return UsageError(f"teacher {name!r} failed on question {problem_id!r}: {type(exc).__name__}{': ' + reason if reason else ''}")


def teacher_logprobs(c: Components, inputs: ContextInputs, prompt_ids: list[int], generated_ids: list[int]) -> tuple[torch.Tensor, dict, list[str]]:
    """(the student's logits z [T, V] float32, {teacher: [T, V] log p_T, or a
    Prepared candidate teacher}, [teachers skipped: no context]).

    Teachers are asked in their order (contexts draw on one shared rng), but
    the model reads of PromptedTeachers wait until all prompts are known: one
    node_logits_many call per model then reads the rollout under every prompt
    on it, the student's first on its own model (which self-distillation
    teachers share)."""
    groups: dict[int, tuple] = {id(c.student): (c.student, [None], [prompt_ids])}  # model -> (lm, names, prompts)
    out, skipped = {}, []
    for name, teacher in c.teachers.items():
        if isinstance(teacher, CandidateTeacher):
            handle = teacher.prepare(inputs, generated_ids)
            if handle is None:
                skipped.append(name)
            else:
                out[name] = Prepared(teacher, handle)
            continue
        try:
            if isinstance(teacher, PromptedTeacher):
                prompt = teacher.prompt_ids(inputs)
                if prompt is not None:
                    lm, names, prompts = groups.setdefault(id(teacher.lm), (teacher.lm, [], []))
                    names.append(name)
                    prompts.append(prompt)
                    out[name] = None  # read below, in this order
                    continue
                logprobs = None
            else:
                logprobs = teacher.node_logprobs(inputs, generated_ids)
        except (UsageError, KeyboardInterrupt, MemoryError):
            raise
        except Exception as exc:
            raise _teacher_failed(name, inputs.problem.id, exc) from None
        if logprobs is None:
            skipped.append(name)
        else:
            out[name] = logprobs
    z = None
    for lm, names, prompts in groups.values():
        try:
            read = lm.node_logits_many(prompts, generated_ids)
        except (UsageError, KeyboardInterrupt, MemoryError):
            raise
        except Exception as exc:
            if names[0] is None:  # the student's own read
                raise
            raise _teacher_failed(",".join(names), inputs.problem.id, exc) from None
        for name, logits in zip(names, read):
            if name is None:
                z = logits.float()
            else:
                out[name] = torch.log_softmax(logits.float(), dim=-1)
    width = z.shape[-1]
    for name, logprobs in list(out.items()):
        if isinstance(logprobs, Prepared):
            continue
        logprobs = check_teacher_output(name, logprobs, len(generated_ids), width)
        if logprobs.shape[-1] != width:  # same tokenizer, padded differently
            logprobs = torch.log_softmax(logprobs[..., :width].float(), dim=-1)
        out[name] = logprobs.float()
    return z, out, skipped


# ----------------------------------------------------------------------------
# 2. The ideal vectors


def estimation_job(c: Components, rollout: Rollout, z: torch.Tensor, logprobs: dict, max_new_tokens: int, seed: int) -> EstimationJob:
    return EstimationJob(
        student=c.student,
        sampler=c.sampler,
        prompt_ids=rollout.prompt_ids,
        generated_ids=rollout.generated_ids,
        student_logits=z,
        teacher_preferred={name: lp.handle.preferred if isinstance(lp, Prepared) else lp.argmax(-1) for name, lp in logprobs.items()},
        verify=lambda text: c.task.verify(rollout.problem, text),
        max_new_tokens=max_new_tokens,
        seed=seed,
    )


def estimate_ideal(c: Components, job: EstimationJob):
    """Generator: the estimator's request batches, then its IdealEstimate. An
    estimator without a `steps` request generator samples by itself here."""
    steps = getattr(c.estimator, "steps", None)
    if steps is None:
        return c.estimator.estimate(job)
    return (yield from steps(job))


# ----------------------------------------------------------------------------
# 3. The teachers at the scored nodes


@dataclass
class ScoredTeachers:
    """Every teacher at the scored nodes.

    logprobs:  teacher -> [N, V] log p
    sampled:   teacher -> [N] log p of the sampled token's event, for CandidateTeachers
               (the string probability); objectives with reads == "sampled" use it
    mass:      teacher -> {"covered": [N], "left_out": [N]} for CandidateTeachers
    forwards:  extra teacher forwards spent by CandidateTeachers
    """

    logprobs: dict
    sampled: dict
    mass: dict
    forwards: int = 0


def scored_logprobs(c: Components, estimate: IdealEstimate, rollout: Rollout, z: torch.Tensor, logprobs: dict) -> ScoredTeachers:
    sel = torch.tensor([n.node for n in estimate.nodes])
    out = ScoredTeachers({}, {}, {})
    for name, lp in logprobs.items():
        if not isinstance(lp, Prepared):
            out.logprobs[name] = lp[sel]
            continue
        sampled = torch.tensor(rollout.generated_ids)[sel]
        lpi = torch.log_softmax(z[sel].float() / c.student.temperature, -1)
        scores = lp.teacher.score(lp.handle, [n.node for n in estimate.nodes], [n.candidates for n in estimate.nodes], sampled, lpi)
        out.logprobs[name] = check_teacher_output(name, scores.logprobs, len(sel), z.shape[-1]).float()
        out.sampled[name] = scores.sampled_logprobs.float()
        out.mass[name] = {"covered": scores.covered.float(), "left_out": scores.left_out.float()}
        out.forwards += int(scores.forwards)
    return out


def teacher_row(scored: ScoredTeachers, teacher: str, objective, sampled: torch.Tensor) -> torch.Tensor:
    """[N, V] what `objective` reads of `teacher`: the row, with the sampled
    token's own event for sampled-token objectives of a CandidateTeacher."""
    lp = scored.logprobs[teacher]
    if teacher in scored.sampled and getattr(objective, "reads", "distribution") == "sampled":
        lp = lp.clone()
        lp[torch.arange(len(sampled)), sampled] = scored.sampled[teacher]
    return lp


# ----------------------------------------------------------------------------
# 4. Vectors at the scored nodes


# Name of the pair "row scored against half h of the ideal estimate".
HALF_PAIR = "{}@half{}"


def split_half_scores(cos_rows: dict) -> tuple[dict, dict]:
    """({row: [N] cosines}, {row: ([N] against half 0, [N] against half 1)}) from
    the scores of every pair, so that half-scored pairs stay out of the rows."""
    halves = {}
    for name in cos_rows:
        if name.endswith("@half0") and HALF_PAIR.format(name[: -len("@half0")], 1) in cos_rows:
            row = name[: -len("@half0")]
            halves[row] = (cos_rows[name], cos_rows[HALF_PAIR.format(row, 1)])
    half_names = {HALF_PAIR.format(row, h) for row in halves for h in (0, 1)}
    return {name: v for name, v in cos_rows.items() if name not in half_names}, halves


@dataclass
class NodeVectors:
    """Every vector at the scored nodes, and which pairs are scored.

    nodes:    [N] scored node indices t
    sampled:  [N] the student's token at each
    probs:    [N, V] π at each
    vectors:  row name -> [N, V]; "ideal", "ideal_half0", "ideal_half1", each
              "teacher/objective", "rl_outcome"
    pairs:    scored row -> (vector a, vector b): cos(a, b) is the row's score;
              for each teacher row also HALF_PAIR.format(row, h) -> ("ideal_half<h>", row),
              the row scored against one independent half of â* (the per-token
              oracle's split-half selection, gadiag_core.scoring.oracle). The half
              vectors are already needed by noise_ceiling, so in params spaces these
              pairs cost entries of the same Gram matrix, no extra backward.
    """

    nodes: torch.Tensor
    sampled: torch.Tensor
    probs: torch.Tensor
    vectors: dict
    pairs: dict


def node_vectors(c: Components, rollout: Rollout, estimate: IdealEstimate, z: torch.Tensor, scored: ScoredTeachers) -> NodeVectors:
    tau = c.student.temperature
    width = z.shape[-1]
    sel = torch.tensor([n.node for n in estimate.nodes])
    sampled = torch.tensor(rollout.generated_ids)[sel]
    z_sel = z[sel]
    probs_sel = policy(z_sel, tau)
    vectors: dict[str, torch.Tensor] = {}
    for name, part in (("ideal", lambda n: n.ideal), ("ideal_half0", lambda n: n.ideal_halves[0]), ("ideal_half1", lambda n: n.ideal_halves[1])):
        dense = torch.zeros(len(sel), width)
        for row, node in enumerate(estimate.nodes):
            dense[row, node.candidates] = part(node).float()
        vectors[name] = dense

    # Distillation vectors b per teacher × objective, and the reference rows.
    pairs: dict[str, tuple[str, str]] = {}
    for tname in scored.logprobs:
        for oname, objective in c.objectives.items():
            row = f"{tname}/{oname}"
            vectors[row] = objective.vector(z_sel, teacher_row(scored, tname, objective, sampled), sampled, tau)
            pairs[row] = ("ideal", row)
            for half in (0, 1):
                pairs[HALF_PAIR.format(row, half)] = (f"ideal_half{half}", row)
    advantage = torch.tensor([float(rollout.correct) - n.value for n in estimate.nodes])
    vectors["rl_outcome"] = rl_outcome_vector(probs_sel, sampled, advantage, tau)
    pairs["rl_outcome"] = ("ideal", "rl_outcome")
    # Noise ceiling: agreement of the two independent halves of â*.
    pairs["noise_ceiling"] = ("ideal_half0", "ideal_half1")
    return NodeVectors(sel, sampled, probs_sel, vectors, pairs)


# ----------------------------------------------------------------------------
# Noise of the ideal vectors (logits space)


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
    gadiag_core.scoring.noise): per node ‖â‖² and the binomial estimate of ‖a*‖²
    (the energy that corrected aggregates use); per rollout the pooled corrected
    per-question cosine of each row; per token a 95% posterior interval of each
    row's full-vocabulary cosine."""
    a_sq = torch.stack([(n.ideal.double() ** 2).sum() for n in nodes])
    energy = torch.stack([node_energy(n, tau) for n in nodes])
    rows = [row for row, (a, _) in pairs.items() if a == "ideal"]
    question_corrected, intervals = {}, {row: [] for row in rows}
    # Each row's b on the node's candidates, divided by its full norm ‖b‖ [C]: with
    # the candidates' π, Q̂ and counts this is all a noise correction of the
    # cosine needs (gadiag_core.scoring.alignment recomputes them from records).
    b_unit = {row: [] for row in rows}
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
        unit = b_c / b_all.norm(dim=-1, keepdim=True).clamp_min(1e-300)
        for j, row in enumerate(rows):
            b_unit[row].append([float(x) for x in unit[j]])
        counts = node.counts.clamp(min=0)
        low, high, _ = noise_mod.cosine_interval(
            node.probs, node.q_hat, counts, b_c, b_all.norm(dim=-1), out_pb, out_pp, tau, seed=derive_seed(seed, "ci", node.node)
        )
        for j, row in enumerate(rows):
            intervals[row].append([float(low[j]), float(high[j])])
    return {"a_sq": a_sq, "energy": energy, "question_corrected": question_corrected, "intervals": intervals, "b_unit": b_unit, "temperature": tau}


# ----------------------------------------------------------------------------
# 5. Records


def token_records(
    c: Components, rollout: Rollout, estimate: IdealEstimate, nv: NodeVectors, cos_rows: dict, noise, scored: ScoredTeachers, cos_half: dict | None = None
) -> list[dict]:
    """One record per scored node (tokens.jsonl); `cos_half`: teacher row -> the
    cosines against each half of â* ([N], [N]), written as ``cos_half``."""
    gen = rollout.generated_ids
    decode = c.student.tokenizer.decode
    # Each teacher's three most likely tokens at the scored nodes (for reports).
    teacher_top = {}
    for tname, lp in scored.logprobs.items():
        top_p, top_k = lp.exp().topk(3, dim=-1)
        teacher_top[tname] = (top_k.tolist(), top_p.tolist())
    records = []
    for row, node in enumerate(estimate.nodes):
        t = node.node
        record = {
            "question": rollout.problem.id,
            "rollout": rollout.index,
            "node": t,
            "correct": rollout.correct,
            "token_id": gen[t],
            "token": decode([gen[t]]),
            "pi_token": float(nv.probs[row, nv.sampled[row]]),
            "pi_max": float(nv.probs[row].max()),
            "value": node.value,
            "covered_mass": node.covered_mass,
            "candidates": node.candidates.tolist(),
            "candidate_tokens": token_strings(c.student, node.candidates.tolist()),
            "candidate_pi": node.probs.tolist(),
            "q_hat": node.q_hat.tolist(),
            "counts": node.counts.tolist(),
            "cos": {name: float(values[row]) for name, values in cos_rows.items()},
        }
        if cos_half:
            record["cos_half"] = {name: [float(h0[row]), float(h1[row])] for name, (h0, h1) in cos_half.items()}
        if noise is not None:
            record["a_sq"] = float(noise["a_sq"][row])
            record["energy"] = float(noise["energy"][row])
            record["cos_ci"] = {name: bounds[row] for name, bounds in noise["intervals"].items()}
            record["b_cand"] = {name: units[row] for name, units in noise["b_unit"].items()}
            record["temperature"] = noise["temperature"]
        record["teacher_top"] = {
            tname: [[decode([k]), p] for k, p in zip(ids[row], probs[row])] for tname, (ids, probs) in teacher_top.items()
        }
        if scored.mass:  # teachers with another tokenizer: their mass on the candidates, and what the caps left out
            record["teacher_mass"] = {
                tname: {"covered": float(m["covered"][row]), "left_out": float(m["left_out"][row])} for tname, m in scored.mass.items()
            }
        records.append(record)
    return records


def diagnosis_steps(c: Components, rollout: Rollout, siblings: list[Rollout], problems: list[Problem], config):
    """Generator: yields the estimator's continuation requests and receives
    their outputs (gadiag_core.engine.scheduler), returns (token records,
    rollout record)."""
    seed = derive_seed(config.run.seed, "diagnose", rollout.problem.id, rollout.index)
    gen = rollout.generated_ids
    inputs = context_inputs(c, rollout, siblings, problems, seed)
    z, logprobs, skipped = teacher_logprobs(c, inputs, rollout.prompt_ids, gen)  # z [T, V]
    job = estimation_job(c, rollout, z, logprobs, config.student.max_new_tokens, seed)
    estimate = yield from estimate_ideal(c, job)
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

    scored = scored_logprobs(c, estimate, rollout, z, logprobs)
    if scored.forwards:
        rollout_record["teacher_forwards"] = scored.forwards
    nv = node_vectors(c, rollout, estimate, z, scored)
    space = config.run.space
    scores = alignment_scores(space, c.student, rollout.prompt_ids, gen, nv.nodes, nv.vectors, nv.pairs)
    cos_rows, cos_half = split_half_scores({row: per_node for row, (per_node, _) in scores.items()})
    rollout_record["question_cos"] = {row: per_question for row, (_, per_question) in scores.items() if row in cos_rows}
    noise = noise_terms(estimate.nodes, nv.probs, nv.vectors, nv.pairs, c.student.temperature, seed) if space == "logits" else None
    if noise is not None:
        rollout_record["question_cos_corrected"] = noise["question_corrected"]
    return token_records(c, rollout, estimate, nv, cos_rows, noise, scored, cos_half), rollout_record
