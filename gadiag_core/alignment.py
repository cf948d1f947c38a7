"""Aggregates of alignment scores, per row (a teacher × objective, or a reference row).

The per-node and per-question cosines come from `gadiag_core.spaces`; the
aggregates are computed from the run's records alone, so `report` can redo
them from a run directory.
"""

from __future__ import annotations

import math
from collections import defaultdict

REFERENCE_ROWS = ("rl_outcome", "noise_ceiling")


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
