"""Aggregates of alignment scores, per row (a teacher × objective, or a reference row).

The per-node and per-question cosines come from `gadiag_core.scoring.spaces`; the
aggregates are computed from the run's records alone, so `report` can redo
them from a run directory.

Headline means (issue 14). Monte-Carlo noise in â* shrinks every per-token
cosine toward 0, so the mean of raw token cosines is biased toward 0. In the
logits space each token record carries what a correction needs (the
candidates' π, Q̂ and counts, and each row's b on the candidates, `b_cand`),
and the headline token mean of a row is the mean of SIMEX values
(gadiag_core.scoring.noise.simex_cosine): the cosine recomputed at 1.5×, 2× and
3× the estimated noise and extrapolated back to zero noise. The mean of raw
cosines stays available (`*_raw`). The per-question headline is the rollout's
pooled cosine with the noise energy removed from ‖â‖² (binomial estimate,
`question_cos_corrected`), the raw one kept as `mean_question_raw`.

Intervals resample questions (a question's tokens are correlated) and are
computed on the corrected per-token values, whose spread includes the
estimator's noise; `ci_*_noise` is the half-width of the estimator-noise-only
interval (1.96 sqrt(Σ Var_n) / N, parametric bootstrap variances), which the
benchmark (benchmarks/leaderboard_accuracy.py) compares.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict

from gadiag_core.seeding import derive_seed

REFERENCE_ROWS = ("rl_outcome", "noise_ceiling")
SPLITS = ("all", "incorrect", "correct")
Z95 = 1.959963984540054


def _mean(values: list[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def _clip(value: float) -> float:
    return max(-1.0, min(1.0, value)) if math.isfinite(value) else float("nan")


def _corrected(parts: list[tuple[float, float, float]]) -> float:
    """Noise-corrected mean of (raw cosine, ‖â‖², Ê‖a*‖²) triples, clipped to [−1, 1]."""
    if not parts:
        return float("nan")
    import torch  # here, not at the top: `report` and `show` read records without torch

    from gadiag_core.scoring.noise import mean_cosine_global_correction

    raw, a_sq, energy = torch.tensor(parts, dtype=torch.float64).T
    return _clip(mean_cosine_global_correction(raw, a_sq, energy))


def bootstrap_ci(groups: dict[str, list[float]], draws: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the pooled mean, resampling whole
    questions (`groups`: question -> its values), so that the many correlated
    tokens of one question count as one draw. (nan, nan) with < 2 questions.
    Bounds are clipped to [−1, 1] (values may be extrapolated cosines)."""
    keys = [k for k, values in groups.items() if values]
    if len(keys) < 2:
        return float("nan"), float("nan")
    rng = random.Random(seed)
    sums = {k: (sum(groups[k]), len(groups[k])) for k in keys}
    means = []
    for _ in range(draws):
        total = count = 0
        for k in rng.choices(keys, k=len(keys)):
            total += sums[k][0]
            count += sums[k][1]
        means.append(total / count)
    means.sort()
    low = means[int((1 - level) / 2 * (draws - 1))]
    high = means[int((1 + level) / 2 * (draws - 1))]
    return _clip(low), _clip(high)


def corrected_token_cosines(record: dict) -> tuple[dict, dict]:
    """({row: SIMEX cosine}, {row: Monte-Carlo variance of the raw cosine}) of one
    token record; empty when the record has no `b_cand` (spaces other than
    logits, older runs). Seeded by the node, so `report` reproduces the run."""
    units = record.get("b_cand")
    if not units:
        return {}, {}
    rows = [row for row in units if row in record["cos"]]
    if not rows:
        return {}, {}
    import torch  # lazily, as in _corrected

    from gadiag_core.scoring.noise import simex_cosine

    seed = derive_seed("simex", record["question"], record["rollout"], record["node"])
    value, noise_var = simex_cosine(
        torch.tensor(record["candidate_pi"], dtype=torch.float64),
        torch.tensor(record["q_hat"], dtype=torch.float64),
        torch.tensor(record["counts"], dtype=torch.float64).clamp_min(0),
        torch.tensor([units[row] for row in rows], dtype=torch.float64),
        float(record.get("temperature", 1.0)),
        seed=seed,
    )
    return dict(zip(rows, value.tolist())), dict(zip(rows, noise_var.tolist()))


def aggregate(token_records: list[dict], rollout_records: list[dict]) -> dict[str, dict]:
    """Per row: the headline mean token alignment on all / incorrect / correct
    rollouts (noise-corrected where the records allow, see the module
    docstring) with 95% bootstrap intervals over questions, the raw means, the
    per-question alignment (corrected and raw) with its interval, shares of
    tokens where it helps (raw cos > 0) and hurts (< 0), and the number of
    scored nodes."""
    raw = defaultdict(lambda: {s: [] for s in SPLITS})
    head_q = defaultdict(lambda: {s: defaultdict(list) for s in SPLITS})  # row -> split -> question -> values
    noise_var = defaultdict(lambda: {s: [] for s in SPLITS})
    noise_parts = defaultdict(lambda: {s: [] for s in SPLITS})
    seen = set()  # every row named in a record, scored or not (its entry then holds NaN)
    for record in token_records:
        split = "correct" if record["correct"] else "incorrect"
        seen.update(record["cos"])
        if not any(v is not None and math.isfinite(v) for v in record["cos"].values()):
            continue
        corrected, variances = corrected_token_cosines(record)
        for row, value in record["cos"].items():
            if value is None or not math.isfinite(value):
                continue
            head = corrected.get(row, value)
            for s in ("all", split):
                raw[row][s].append(value)
                head_q[row][s][record["question"]].append(head)
                noise_var[row][s].append(variances.get(row, 0.0))
                if "energy" in record and row != "noise_ceiling":
                    noise_parts[row][s].append((value, record["a_sq"], record["energy"]))

    questions, questions_raw = defaultdict(lambda: defaultdict(list)), defaultdict(lambda: defaultdict(list))
    for i, record in enumerate(rollout_records):
        question = record.get("question", f"rollout-{i}")
        corrected = record.get("question_cos_corrected", {})
        seen.update(record.get("question_cos", {}))
        for row, value in record.get("question_cos", {}).items():
            if value is None or not math.isfinite(value):
                continue
            questions_raw[row][question].append(value)
            head = corrected.get(row, value)
            if head is not None and math.isfinite(head):
                questions[row][question].append(head)

    summary = {}
    for row in sorted(seen):
        values = raw[row]["all"]
        n = len(values)
        entry = {}
        for s in SPLITS:
            pooled = [v for vs in head_q[row][s].values() for v in vs]
            entry[f"mean_{s}"] = _clip(_mean(pooled))
            entry[f"mean_{s}_raw"] = _mean(raw[row][s])
            entry[f"ci_{s}"] = bootstrap_ci(head_q[row][s])
            count = len(noise_var[row][s])
            entry[f"ci_{s}_noise"] = Z95 * math.sqrt(sum(noise_var[row][s])) / count if count else float("nan")
            entry[f"mean_{s}_corrected"] = _corrected(noise_parts[row][s])  # the former global correction
        q_values = [v for vs in questions[row].values() for v in vs]
        entry.update(
            mean_question=_clip(_mean(q_values)),
            mean_question_raw=_mean([v for vs in questions_raw[row].values() for v in vs]),
            ci_question=bootstrap_ci(questions[row]),
            mean_question_corrected=_clip(_mean(q_values)),
            helps=sum(v > 0 for v in values) / n if n else float("nan"),
            hurts=sum(v < 0 for v in values) / n if n else float("nan"),
            nodes=n,
            nodes_incorrect=len(raw[row]["incorrect"]),
            nodes_correct=len(raw[row]["correct"]),
        )
        summary[row] = entry
    return summary
