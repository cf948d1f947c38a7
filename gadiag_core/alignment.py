"""Alignment scores in the `logits` space, and their aggregates.

Per token: cos(a*(u_t), b(u_t)). For an untied output head this equals the
cosine of the head's parameter gradients exactly (DESIGN §1).

Per question (one rollout): the logits of different nodes are different
coordinates of the logits space, so the rollout's vectors are the
concatenations over its targeted nodes, and

    cos_q = Σ_t ⟨a_t, b_t⟩ / ( sqrt(Σ_t ‖a_t‖²) · sqrt(Σ_t ‖b_t‖²) ).

(In a parameter space, issue 6, the sum Σ_t Jᵀv_t replaces the concatenation.)

Aggregates per row (a teacher × objective, or a reference row) are computed
from the records alone, so `report` can redo them from a run directory.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

REFERENCE_ROWS = ("rl_outcome", "noise_ceiling")


def sparse_dot(idx: torch.Tensor, vals: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """⟨a, b⟩ per row for a given sparsely: idx [N, C] (−1 = padding), vals [N, C];
    dense b [N, V]. Returns [N]."""
    safe = idx.clamp(min=0)
    gathered = dense.gather(-1, safe).double()
    return (gathered * vals.double() * (idx >= 0)).sum(-1)


def question_cosine(dots: torch.Tensor, a_sq: torch.Tensor, b_sq: torch.Tensor) -> float:
    """Concatenated cosine from per-node dots and squared norms (all [N])."""
    denominator = math.sqrt(float(a_sq.sum())) * math.sqrt(float(b_sq.sum()))
    return float(dots.sum()) / denominator if denominator > 0 else float("nan")


def _mean(values: list[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def aggregate(token_records: list[dict], rollout_records: list[dict]) -> dict[str, dict]:
    """Per row: mean token alignment on all / incorrect / correct rollouts, mean
    per-question alignment, shares of tokens where it helps (cos > 0) and hurts
    (cos < 0), and the number of scored nodes."""
    tokens = defaultdict(lambda: {"all": [], "incorrect": [], "correct": []})
    for record in token_records:
        split = "correct" if record["correct"] else "incorrect"
        for row, value in record["cos"].items():
            if value is not None and math.isfinite(value):
                tokens[row]["all"].append(value)
                tokens[row][split].append(value)
    questions = defaultdict(list)
    for record in rollout_records:
        for row, value in record.get("question_cos", {}).items():
            questions[row].append(value)

    summary = {}
    for row in sorted(set(tokens) | set(questions)):
        values = tokens[row]["all"]
        n = len(values)
        summary[row] = {
            "mean_all": _mean(values),
            "mean_incorrect": _mean(tokens[row]["incorrect"]),
            "mean_correct": _mean(tokens[row]["correct"]),
            "mean_question": _mean(questions[row]),
            "helps": sum(v > 0 for v in values) / n if n else float("nan"),
            "hurts": sum(v < 0 for v in values) / n if n else float("nan"),
            "nodes": n,
            "nodes_incorrect": len(tokens[row]["incorrect"]),
            "nodes_correct": len(tokens[row]["correct"]),
        }
    return summary
