"""Aggregates of alignment scores, per row (a teacher × objective, or a reference row).

The per-node and per-question cosines come from `gadiag_core.scoring.spaces`; the
aggregates are computed from the run's records alone, so `report` can redo
them from a run directory.

Headline means (issue 14). A rollout's alignment is its pooled cosine: the
cosine of its per-node vectors stacked over its scored nodes (DESIGN, "per
question"). Monte-Carlo noise in â* inflates ‖â‖² and shrinks every cosine
toward 0, so the headline per rollout removes the binomial noise energy from
‖â‖² summed over the rollout's nodes (`question_cos_corrected`, written by the
run; the raw pooled cosine where that sum is ≤ 0 or no correction exists), and
a row's `mean_all` / `mean_incorrect` / `mean_correct` are the means of these
per-rollout values over all / incorrect / correct rollouts (`mean_*_raw`: the
same means of raw pooled cosines). Summed over a rollout's nodes the energy
estimate is stable enough to divide by, where a per-token correction is not.
Measured against `--estimator exact` on the enumerable toy environment
(benchmarks/leaderboard_accuracy.py, 5 seeds, default budget) these means are
off by 0.010 / 0.014 / 0.019 on average (all / incorrect / correct), the token
means below by 0.024 / 0.029 / 0.036. That holds for estimators whose noise
estimate is unbiased: `targeted`'s default `blind` allocation never looks at
the rewards (with the reward-driven `energy` allocation the noise energy is
underestimated and correct rollouts keep a bias of +0.014, 0.025 off).

The token means stay available: `token_*` is the mean over scored nodes of
SIMEX per-token cosines (gadiag_core.scoring.noise.simex_cosine: the cosine
recomputed at 1.5×, 2× and 3× the estimated noise and extrapolated back to zero
noise), `token_*_raw` the mean of raw per-token cosines, `token_*_global` the
raw mean times one energy factor for the row.

Intervals resample questions (a question's rollouts and tokens are
correlated) and are computed on the corrected values, whose spread includes
the estimator's noise; `ci_token_*_noise` is the half-width of the
estimator-noise-only interval of the token mean (1.96 sqrt(Σ Var_n) / N,
parametric bootstrap variances).
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


def rollout_value(record: dict, row: str) -> tuple[float, float]:
    """(headline, raw) per-rollout cosine of one row in one rollout record: the
    rollout's pooled cosine (`question_cos`) and its noise-corrected value
    (`question_cos_corrected`: the binomial noise energy removed from ‖â‖²),
    which falls back to the raw one where the corrected value is undefined
    (summed energy ≤ 0) or absent (spaces other than logits, exact runs)."""
    raw = record.get("question_cos", {}).get(row)
    if raw is None or not math.isfinite(raw):
        return float("nan"), float("nan")
    head = record.get("question_cos_corrected", {}).get(row)
    return (head if head is not None and math.isfinite(head) else raw), raw


def aggregate(token_records: list[dict], rollout_records: list[dict]) -> dict[str, dict]:
    """Per row: the headline means (`mean_{all,incorrect,correct}`: per-rollout
    noise-corrected cosines averaged over the rollouts of the split, see the
    module docstring) with 95% bootstrap intervals over questions and the raw
    means; the token means (`token_*`: SIMEX, raw, the former global factor)
    with their intervals; shares of tokens where it helps (raw cos > 0) and
    hurts (< 0), and the number of scored nodes."""
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

    # Per-rollout values: row -> split -> question -> values (headline, raw).
    rollouts = defaultdict(lambda: {s: defaultdict(list) for s in SPLITS})
    rollouts_raw = defaultdict(lambda: {s: defaultdict(list) for s in SPLITS})
    for i, record in enumerate(rollout_records):
        question = record.get("question", f"rollout-{i}")
        split = "correct" if record.get("correct") else "incorrect"
        seen.update(record.get("question_cos", {}))
        for row in record.get("question_cos", {}):
            head, value = rollout_value(record, row)
            if not math.isfinite(value):
                continue
            for s in ("all", split):
                rollouts[row][s][question].append(head)
                rollouts_raw[row][s][question].append(value)

    summary = {}
    for row in sorted(seen):
        values = raw[row]["all"]
        n = len(values)
        entry = {}
        for s in SPLITS:
            per_rollout = [v for vs in rollouts[row][s].values() for v in vs]
            entry[f"mean_{s}"] = _clip(_mean(per_rollout))
            entry[f"mean_{s}_raw"] = _mean([v for vs in rollouts_raw[row][s].values() for v in vs])
            entry[f"ci_{s}"] = bootstrap_ci(rollouts[row][s])
            entry[f"rollouts_{s}"] = len(per_rollout)
            pooled = [v for vs in head_q[row][s].values() for v in vs]
            entry[f"token_{s}"] = _clip(_mean(pooled))
            entry[f"token_{s}_raw"] = _mean(raw[row][s])
            entry[f"ci_token_{s}"] = bootstrap_ci(head_q[row][s])
            count = len(noise_var[row][s])
            entry[f"ci_token_{s}_noise"] = Z95 * math.sqrt(sum(noise_var[row][s])) / count if count else float("nan")
            entry[f"token_{s}_global"] = _corrected(noise_parts[row][s])  # one energy factor for the row
        entry.update(
            helps=sum(v > 0 for v in values) / n if n else float("nan"),
            hurts=sum(v < 0 for v in values) / n if n else float("nan"),
            nodes=n,
            nodes_incorrect=len(raw[row]["incorrect"]),
            nodes_correct=len(raw[row]["correct"]),
        )
        summary[row] = entry
    return summary
