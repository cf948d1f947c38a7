"""Aggregates of alignment scores, per row (a teacher × objective, or a reference row).

The per-node and per-question cosines come from `gadiag_core.scoring.spaces`; the
aggregates are computed from the run's records alone, so `report` can redo
them from a run directory.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict


REFERENCE_ROWS = ("rl_outcome", "noise_ceiling")


def _mean(values: list[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def _corrected(parts: list[tuple[float, float, float]]) -> float:
    """Noise-corrected mean of (raw cosine, ‖â‖², Ê‖a*‖²) triples, clipped to [−1, 1]."""
    if not parts:
        return float("nan")
    import torch  # here, not at the top: `report` and `show` read records without torch

    from gadiag_core.scoring.noise import mean_cosine_global_correction

    raw, a_sq, energy = torch.tensor(parts, dtype=torch.float64).T
    value = mean_cosine_global_correction(raw, a_sq, energy)
    return max(-1.0, min(1.0, value)) if math.isfinite(value) else float("nan")


def bootstrap_ci(groups: dict[str, list[float]], draws: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the pooled mean, resampling whole
    questions (`groups`: question -> its values), so that the many correlated
    tokens of one question count as one draw. (nan, nan) with < 2 questions."""
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
    return low, high


def aggregate(token_records: list[dict], rollout_records: list[dict]) -> dict[str, dict]:
    """Per row: mean token alignment on all / incorrect / correct rollouts (with
    95% bootstrap intervals over questions), mean per-question alignment, shares
    of tokens where it helps (cos > 0) and hurts (cos < 0), and the number of
    scored nodes."""
    tokens = defaultdict(lambda: {"all": [], "incorrect": [], "correct": []})
    by_question = defaultdict(lambda: {"all": defaultdict(list), "incorrect": defaultdict(list), "correct": defaultdict(list)})
    for record in token_records:
        split = "correct" if record["correct"] else "incorrect"
        for row, value in record["cos"].items():
            if value is not None and math.isfinite(value):
                tokens[row]["all"].append(value)
                tokens[row][split].append(value)
                by_question[row]["all"][record["question"]].append(value)
                by_question[row][split][record["question"]].append(value)
    questions, questions_corrected = defaultdict(list), defaultdict(list)
    for record in rollout_records:
        for row, value in record.get("question_cos", {}).items():
            questions[row].append(value)
        for row, value in record.get("question_cos_corrected", {}).items():
            questions_corrected[row].append(value)
    # Noise correction of token means (gadiag_core.scoring.noise.mean_cosine_global_correction):
    # one shrinkage factor per row and split, from Σ‖â‖² / Σ Ê‖a*‖² over its nodes.
    noise_parts = defaultdict(lambda: {"all": [], "incorrect": [], "correct": []})
    for record in token_records:
        if "energy" not in record:
            continue
        split = "correct" if record["correct"] else "incorrect"
        for row, value in record["cos"].items():
            if value is not None and math.isfinite(value) and row != "noise_ceiling":
                part = (value, record["a_sq"], record["energy"])
                noise_parts[row]["all"].append(part)
                noise_parts[row][split].append(part)

    summary = {}
    for row in sorted(set(tokens) | set(questions)):
        values = tokens[row]["all"]
        n = len(values)
        summary[row] = {
            "mean_all": _mean(values),
            "mean_incorrect": _mean(tokens[row]["incorrect"]),
            "mean_correct": _mean(tokens[row]["correct"]),
            "ci_all": bootstrap_ci(by_question[row]["all"]),
            "ci_incorrect": bootstrap_ci(by_question[row]["incorrect"]),
            "ci_correct": bootstrap_ci(by_question[row]["correct"]),
            "mean_question": _mean(questions[row]),
            "mean_question_corrected": _mean(questions_corrected[row]),
            "mean_all_corrected": _corrected(noise_parts[row]["all"]),
            "mean_incorrect_corrected": _corrected(noise_parts[row]["incorrect"]),
            "mean_correct_corrected": _corrected(noise_parts[row]["correct"]),
            "helps": sum(v > 0 for v in values) / n if n else float("nan"),
            "hurts": sum(v < 0 for v in values) / n if n else float("nan"),
            "nodes": n,
            "nodes_incorrect": len(tokens[row]["incorrect"]),
            "nodes_correct": len(tokens[row]["correct"]),
        }
    return summary
