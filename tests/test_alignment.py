"""Aggregates: means per split, helps/hurts shares, bootstrap intervals over questions."""

import math

from gadiag_core.scoring.alignment import aggregate, bootstrap_ci


def record(question, correct, value):
    return {"question": question, "correct": correct, "cos": {"t/o": value}}


def test_aggregate_splits_and_shares():
    tokens = [record("q1", True, 0.5), record("q1", True, -0.1), record("q2", False, 0.9), record("q2", False, float("nan"))]
    rollouts = [
        {"question": "q1", "correct": True, "question_cos": {"t/o": 0.2}, "question_cos_corrected": {"t/o": 0.25}},
        {"question": "q2", "correct": False, "question_cos": {"t/o": 0.4}, "question_cos_corrected": {"t/o": float("nan")}},
        {"question": "q2", "correct": False, "question_cos": {"t/o": 0.1}},
    ]
    row = aggregate(tokens, rollouts)["t/o"]
    # Headline: per-rollout values (corrected; the raw one where the correction is undefined or absent).
    assert math.isclose(row["mean_all"], (0.25 + 0.4 + 0.1) / 3)
    assert math.isclose(row["mean_correct"], 0.25) and math.isclose(row["mean_incorrect"], 0.25)
    assert math.isclose(row["mean_all_raw"], (0.2 + 0.4 + 0.1) / 3)
    assert row["rollouts_all"] == 3 and row["rollouts_correct"] == 1
    low, high = row["ci_all"]
    assert low <= row["mean_all"] <= high
    # Token means: every scored node alike.
    assert math.isclose(row["token_all"], (0.5 - 0.1 + 0.9) / 3)
    assert math.isclose(row["token_correct"], 0.2) and math.isclose(row["token_incorrect"], 0.9)
    assert row["nodes"] == 3 and math.isclose(row["helps"], 2 / 3) and math.isclose(row["hurts"], 1 / 3)
    low, high = row["ci_token_all"]
    assert low <= row["token_all"] <= high


def test_bootstrap_ci_brackets_the_mean_and_shrinks_with_questions():
    narrow_groups = {f"q{i}": [0.3 + 0.1 * ((i % 3) - 1)] for i in range(200)}
    wide_groups = {f"q{i}": [0.3 + 0.1 * ((i % 3) - 1)] for i in range(6)}
    n_low, n_high = bootstrap_ci(narrow_groups)
    w_low, w_high = bootstrap_ci(wide_groups)
    assert n_low < 0.3 < n_high and w_low <= 0.3 <= w_high
    assert (n_high - n_low) < (w_high - w_low)
    assert all(math.isnan(v) for v in bootstrap_ci({"only": [0.1, 0.2]}))
