"""The per-token oracle (gadiag_core.scoring.oracle): split-half selection is
unbiased where every teacher is equal in truth, the same-half oracle is not,
a real per-token advantage is found, and the switch rate / winner counts."""

from __future__ import annotations

import math

import pytest
import torch

from gadiag_core.scoring import oracle


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def synthetic_halves(n_questions=60, nodes=20, rows=6, dim=40, noise=1.5, better=None, seed=0):
    """Cosines of `rows` teachers against two independent noisy halves of a true
    ideal vector a* at each node.

    Every teacher is b_r = a* + e_r with e_r orthogonal to a* and of the same
    norm, so cos(a*, b_r) is the same for every r at every node: all teachers
    are equal in truth. With `better` = a list of rows, each node draws one of
    them (or none, with the same chance) and that row's e_r shrinks there: the
    truly best row changes from node to node."""
    gen = torch.Generator().manual_seed(seed)
    N = n_questions * nodes
    a = _unit(torch.randn(N, dim, generator=gen, dtype=torch.float64))
    e = torch.randn(N, rows, dim, generator=gen, dtype=torch.float64)
    e = e - (e * a[:, None]).sum(-1, keepdim=True) * a[:, None]  # orthogonal to a*
    e = _unit(e) * 1.2
    if better is not None:
        which = torch.randint(0, len(better) + 1, (N,), generator=gen)
        for k, row in enumerate(better):
            e[which == k, row] *= 0.3
    b = a[:, None] + e  # [N, R, dim]
    halves = [a + noise * torch.randn(N, dim, generator=gen, dtype=torch.float64) / math.sqrt(dim) for _ in range(2)]
    c0, c1 = (torch.nn.functional.cosine_similarity(h[:, None], b, dim=-1) for h in halves)
    truth = torch.nn.functional.cosine_similarity(a[:, None], b, dim=-1)
    group = torch.arange(N) // nodes
    return c0, c1, truth, group


def test_split_half_oracle_is_unbiased_when_all_teachers_are_equal():
    c0, c1, truth, group = synthetic_halves()
    assert torch.allclose(truth, truth[:, :1].expand_as(truth))  # equal in truth, at every node
    cross = oracle.crossfit_oracle(c0, c1)
    same = oracle.same_half_oracle(c0, c1)
    candidates = oracle.single_candidates(c0, c1)
    n = torch.tensor(float(len(c0)), dtype=torch.float64)
    single, _, _ = oracle.crossfit_single(c0.sum(0), c1.sum(0), n, candidates)
    ci = oracle.bootstrap_headroom(group, cross, same, c0, c1, candidates, draws=400)
    headroom = float(cross.mean() - single)
    low, high = ci["headroom"]
    # The split-half headroom is ~0 and its interval contains 0 ...
    assert low <= 0.0 <= high, (headroom, ci["headroom"])
    assert abs(headroom) < 0.01
    # ... while picking and scoring on the same half claims a clear gain.
    same_single = 0.5 * (c0.mean(0).max() + c1.mean(0).max())
    biased = float(same.mean() - same_single)
    assert biased > 0.05
    assert ci["same_half_headroom"][0] > high


def test_split_half_oracle_finds_a_real_per_token_advantage():
    c0, c1, truth, group = synthetic_halves(better=[2, 3, 4])
    cross = oracle.crossfit_oracle(c0, c1)
    candidates = oracle.single_candidates(c0, c1)
    ci = oracle.bootstrap_headroom(group, cross, oracle.same_half_oracle(c0, c1), c0, c1, candidates, draws=400)
    assert ci["headroom"][0] > 0.0  # picking the truly best row per node gains, and the split-half oracle sees it
    # ... and no more than a perfect per-node choice would (the true headroom).
    true_headroom = float(truth.max(-1).values.mean() - truth.mean(0).max())
    n = torch.tensor(float(len(c0)), dtype=torch.float64)
    single, _, _ = oracle.crossfit_single(c0.sum(0), c1.sum(0), n, candidates)
    assert 0.0 < float(cross.mean() - single) < true_headroom


def test_pick_ignores_nan_and_single_candidates_need_every_node():
    c = torch.tensor([[0.1, float("nan"), 0.3], [float("nan"), 0.5, 0.2]])
    assert oracle.pick(c).tolist() == [2, 1]
    assert oracle.single_candidates(c, c).tolist() == [False, False, True]
    assert oracle.usable_nodes(c, torch.full_like(c, float("nan"))).tolist() == [False, False]


def test_crossfit_oracle_by_hand():
    c0 = torch.tensor([[0.9, 0.1], [0.0, 0.4]])
    c1 = torch.tensor([[0.2, 0.5], [0.3, 0.8]])
    # node 0: half0 picks row 0 -> c1 = 0.2; half1 picks row 1 -> c0 = 0.1; mean 0.15
    # node 1: half0 picks row 1 -> c1 = 0.8; half1 picks row 1 -> c0 = 0.4; mean 0.6
    assert oracle.crossfit_oracle(c0, c1).tolist() == pytest.approx([0.15, 0.6])
    assert oracle.same_half_oracle(c0, c1).tolist() == pytest.approx([0.7, 0.6])


def test_switch_rate_counts_changes_within_rollouts_only():
    winners = torch.tensor([0, 0, 1, 1, 2, 2, 0])
    rollout = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    # pairs inside rollouts: (0,0) (0,1) | (1,2) | (2,0): 3 changes of 4 pairs
    assert oracle.switch_rate(winners, rollout) == (3, 4)
    assert oracle.switch_rate(torch.tensor([1]), torch.tensor([0])) == (0, 0)


def _record(question, rollout, node, correct, halves, full):
    return {
        "question": question,
        "rollout": rollout,
        "node": node,
        "correct": correct,
        "cos": {**full, "rl_outcome": 0.0},
        "cos_half": halves,
    }


def test_oracle_summary_from_records():
    records = [
        _record("q1", 0, 0, True, {"a/r": [0.5, 0.4], "b/r": [0.1, 0.2]}, {"a/r": 0.45, "b/r": 0.15}),
        _record("q1", 0, 3, True, {"a/r": [0.1, 0.0], "b/r": [0.6, 0.5]}, {"a/r": 0.05, "b/r": 0.55}),
        _record("q2", 0, 1, False, {"a/r": [0.3, 0.3], "b/r": [0.2, 0.1]}, {"a/r": 0.3, "b/r": 0.15}),
        _record("q2", 1, 2, False, {"a/r": [0.2, None], "b/r": [0.4, 0.3]}, {"a/r": 0.25, "b/r": 0.35}),
    ]
    s = oracle.oracle_summary(records, draws=50)
    assert s["rows"] == ["a/r", "b/r"]
    assert s["single_candidates"] == ["b/r"]  # a/r is undefined against half 1 at one node
    assert s["nodes"] == 4
    assert s["switch_rate"] == 1.0 and (s["switches"], s["pairs"]) == (1, 1)
    assert s["wins"] == {"a/r": 2, "b/r": 2}
    assert s["question_winners"] == {"q1": {"a/r": 1, "b/r": 1}, "q2": {"a/r": 1, "b/r": 1}}
    assert s["all"]["best_single"] == "b/r"
    # oracle by hand: node values 0.45 (picks a,a), 0.55 (b,b), 0.3 (a,a), node 4:
    # half0 picks b -> c1 0.3; half1 picks b (a is NaN) -> c0 0.4; 0.35. Mean 0.4125.
    assert s["all"]["oracle"] == pytest.approx(0.4125)
    # the only candidate b/r, against half 1 (0.2 0.5 0.1 0.3) and half 0 (0.1 0.6 0.2 0.4)
    assert s["all"]["single"] == pytest.approx((0.2 + 0.5 + 0.1 + 0.3 + 0.1 + 0.6 + 0.2 + 0.4) / 8)
    assert s["all"]["headroom"] == pytest.approx(0.4125 - 0.3)
    assert s["incorrect"]["nodes"] == 2 and s["correct"]["nodes"] == 2
    assert oracle.oracle_summary([{"question": "q", "cos": {"a": 0.1}, "correct": True}]) is None


def test_split_half_scores_keeps_half_pairs_out_of_the_rows():
    from gadiag_core.engine.diagnose import HALF_PAIR, split_half_scores

    a = torch.tensor([0.1, 0.2])
    scores = {
        "t/o": a,
        HALF_PAIR.format("t/o", 0): a + 1,
        HALF_PAIR.format("t/o", 1): a + 2,
        "noise_ceiling": a * 0,
        "rl_outcome": a * 3,
    }
    rows, halves = split_half_scores(scores)
    assert list(rows) == ["t/o", "noise_ceiling", "rl_outcome"]
    assert list(halves) == ["t/o"]
    assert torch.equal(halves["t/o"][0], a + 1) and torch.equal(halves["t/o"][1], a + 2)
