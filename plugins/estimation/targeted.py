"""Built-in ideal-gradient estimators (DESIGN §2): `targeted` and `uniform`.

Both return a*(u_t) = π_k (Q̂_k − V̂) / τ on a candidate set at the nodes they
score, under the value-neutral rule (tokens outside the set get Q = V, so a*
sums to zero; vectors.ideal_vector_on_candidates). Candidates at a node: the
student's top tokens up to `mass_threshold` (at least two, at most
`max_candidates`), each teacher's preferred token and the sampled token.

`uniform` (the naive baseline, kept for comparison): every screened node
(1 − π_max ≥ `screen_epsilon`) × every candidate × `continuations` rollouts
forced to start with the candidate. Cost T × K × M continuations.

`targeted` (the default) spends continuations only where they change the answer:

1. Screen. One forward pass gave π at every node; nodes with
   1 − π_max < ε are skipped (‖a*‖₁ ≤ 2(1 − π_max)/τ, reported as
   `screen_bound`).
2. Value backbone. Free (unforced) continuations estimate V(u_t) at a coarse
   grid of the eligible nodes (about `backbone_points` intervals); V(u_T) = R(y)
   is exact when the rollout ended (EOS or the length limit). V only jumps
   where the student is uncertain: V(u_{t+1}) − V(u_t) = Q(u_t, y_t) − V(u_t),
   and over y_t ~ π its expected size is E_y|Q_y − V| = τ‖a*‖₁ ≤ 2(1 − π_max).
   So a segment between two V-points whose values differ (|V̂_a − V̂_b| >
   `delta` and > `z` standard errors) is split at its middle eligible node,
   until it holds a single eligible node: that node is pivotal (it finds the
   nodes whose ideal vector is large, in proportion to it). A comparison with a
   gap above delta that is not yet significant first gets more samples at both
   ends (doubling, up to `value_growth` × continuations per point).
3. Targets. The pivotal nodes, largest jump first (at most `max_nodes`), each
   with its candidate set. A rollout with at most `direct_nodes` eligible nodes
   skips steps 2–3 (testing a node costs about as much as estimating it): its
   eligible nodes are targeted directly, the `max_nodes` most uncertain.
   Candidates whose continuation ends at once (an EOS id, or the last position
   the length limit allows) get Q exactly from the verifier (no sampling;
   counts 0, q_se 0); up to `free_candidates` such tokens (the most probable
   first) join every node's candidates for that reason alone.
4. Allocation. Each candidate first gets one sample in each half
   (forced continuations). Then rounds of continuations go to the
   (node, candidate) pairs with the largest reduction of the noise energy of â
   per sampled token, ‖M e_k‖² σ_k² / (n_k (n_k + 1)) / L_t (‖M e_k‖² ≈
   π_k², M the linear map Q̂ → â; σ_k² the per-sample variance; L_t the
   expected continuation length from node t), until the estimated relative
   error sqrt(N̂ / Ê‖a*‖²) of the rollout's ideal vector (Laplace variances,
   conservative) is at most `target_error`, or the pools hold `continuations`
   samples per candidate on average (per max(candidates, `rollout_floor`):
   see "Rollout floor" below), or a hard budget is reached.
   `allocation = "blind"` (the default) takes σ_k² = 1/4, the largest
   Bernoulli variance, for every candidate: where the samples go then depends
   on π, the costs and the paths the continuations take, never on their
   rewards, so each Q̂_k is a plain mean of n_k independent Bernoulli(Q_k)
   draws given the counts, and the binomial noise estimate N̂ that the
   headline removes from ‖â‖² is unbiased. `allocation = "energy"` uses each
   candidate's observed Q̃(1 − Q̃) (Laplace-smoothed): it spends a little more
   efficiently, but a candidate whose first rewards agree (Q̂ = 0 or 1, σ̂² = 0)
   gets fewer further samples and keeps its extreme Q̂, so ‖â‖² exceeds
   ‖a*_C‖² by more than N̂ and the headline stays shrunk toward 0. Measured on
   the exact environment (issue 14; benchmarks/leaderboard_accuracy.py,
   10 seeds, headline mean |error| / signed bias per split all, correct,
   incorrect):
       energy, continuations 4 (the default before; 1.00× tokens)
           0.012 / +0.005   0.021 / +0.008   0.017 / +0.003
       blind, continuations 4 (1.00×)
           0.015 / +0.005   0.021 / +0.001   0.021 / +0.007
       energy, continuations 5 (1.28×)
           0.013 / +0.006   0.017 / +0.009   0.020 / +0.003
       blind, continuations 5 (1.27×; the default)
           0.012 / +0.003   0.016 / +0.001   0.018 / +0.004
       blind, continuations 4, mass_threshold 0.95, max_candidates 6 (1.29×)
           0.010 / +0.003   0.017 / −0.002   0.017 / +0.008
   (That table was measured with the samplers' inverse-CDF draws, before
   Gumbel-max; on the current samplers, 10 seeds, blind at 5 continuations:
           0.015 / +0.002   0.021 / +0.004   0.022 / −0.000.)
   Blind allocation removes the bias of correct rollouts (+0.008 -> +0.001;
   +0.013 -> +0.004 on seeds 0–4, where the issue's table was measured);
   on those draws the fifth continuation per candidate brought the spread
   within the issue's 0.02 in every split (on the current ones it did not:
   see "Rollout floor and candidates" below). The early stop at `target_error` still reads the
   rewards; it stops only where the noise energy is below 1/16 of the signal
   (where the correction is small) and never fired on the exact environment.
   `allocation = "relative"` multiplies each node's gains by
   1 / (Ê_t + N̂_t + floor) (common.node_weight): the token mean of cosines
   counts every node once, and a unit of noise shrinks the cosine of a node
   with small ‖a*‖² most; it then stops when the mean over nodes of
   N̂ / (Ê + N̂) (common.relative_noise) is at most target_error². Measured
   on the exact environment (issue 14; `python benchmarks/leaderboard_accuracy.py
   --seeds 5 --budgets 4,6 [--set allocation=relative --tag relative]`, its
   table 4): it hardly changes the true noise at the scored nodes (mean
   N / (‖a*‖² + N) 0.523 -> 0.525 at 4 continuations, 0.446 -> 0.445 at 6;
   nodes with N ≥ ‖a*‖² 53% -> 50%, 43% -> 42%), because a rollout's budget
   cannot move to other rollouts and its 1–3 sampled nodes differ little in
   ‖a*‖². The headline's mean |error| per split moved by 0.002–0.006 at 4
   continuations and by 0.000–0.014 at 6 (correct rollouts 0.041 -> 0.027);
   with the noise itself unchanged those moves are not shown to be a gain
   (other estimator seeds were not tried), so it was not made the default.

Rollout floor and candidates (issue 14, on the current samplers). The
headline is the mean over rollouts of each rollout's noise-corrected pooled
cosine, so every rollout counts once. To first order (delta method) the
cosine of â = a* + ε with a fixed b has variance (1 − cos²) × (the variance
of ε across â's direction) / ‖a*‖²; with signal and noise spread over the
rollout's d sampled candidates, n samples each, that is about
(1 − cos²) σ² / (n d s²) (σ² per sample, s² the signal per candidate): it
falls with the rollout's total samples n·d, not with the samples per
candidate. Minimising the sum over rollouts at a fixed total gives every
rollout about the same samples (n d ∝ L^(−1/2), L the cost of one), where a
budget of `continuations` per candidate gives a rollout with few candidates
few samples. On the exact environment those are the short rollouts (EOS
after 1–2 tokens, 6% of them, all but a few incorrect): 1-node rollouts got
79 sampled tokens where full ones got 195, their per-rollout error had RMS
0.49 (2 nodes: 0.40; full: 0.18), and they made ~20% of the squared error
of the headline. `rollout_floor` budgets a rollout with fewer sampled
candidates than it as if it had that many (continuations × max(d,
rollout_floor) samples; the default 12 is below a full rollout's 15–17, so
full rollouts keep their budget). Like the rest of the blind allocation it
reads π and counts only, never rewards. What remained after that was
candidate truncation (tokens outside the candidates get Q = V̂; per token
−0.024 on incorrect rollouts' reverse_kl rows, mostly at the first node,
where the student is least sure), which no budget shrinks: the default
candidate set is the top tokens up to 0.95 of π, at most 5 (before 0.9, 4),
halving it (−0.024 -> −0.013), and tokens whose Q is exact for a verifier
call (EOS; every token at the length limit) join as `free_candidates`, which
removes the truncation at the last node at no sampled token. On the
exact environment (`python benchmarks/leaderboard_accuracy.py --seeds 10
--budgets 5,10`, 10 seeds) the headline's mean |error| went from 0.015 /
0.021 / 0.022 (all / correct / incorrect; blind, 5, 0.9 / 4, no floor) to
0.011 / 0.015 / 0.017 at 1.48× the former default's sampled tokens; each
part's share, fresh seeds and budget invariance are in that script's
docstring ("Variants").

Reuse. Every continuation is indexed by the path it takes along the rollout
and counted in every estimate it informs:
  * a continuation that reaches node t and draws its token k there (it started
    at s ≤ t and followed y_s … y_{t−1}) is a sample of Q(u_t, k), forced or not
    at t; if k was drawn (not forced) it is also a sample of V(u_t);
  * Q(u_t, y_t) = V(u_{t+1}): every free draw at u_{t+1} is a sample of it.
Conditional on the path up to (t, k), the rest of a continuation is drawn from
π, so each such reward is Bernoulli(Q(u_t, k)) and independent of the others:
pooled means are unbiased (tests/test_estimators.py checks it against the
exact environment). Two exceptions keep it so:
  * the rollout's own reward is never a sample (the rollout is given, with its
    outcome, so it is not a fair draw), except where it is the exact value:
    Q(u_{T−1}, y_{T−1}) = V(u_T) = R(y) for a finished rollout;
  * selection: the backbone continuations that decided which nodes are
    targeted are not reused in the Q̂ of the targeted nodes (they were chosen
    because their values differ, so reusing them inflates |Q̂_y − V̂|: a
    winner's curse; `gadiag-harness selfcheck` measured the bias of â at 0.31
    noise SDs with that reuse, 0.18 without, 0.12 for `uniform`). Q pools at targeted nodes hold the
    continuations drawn after the selection, and within them every reuse above
    applies (a forced continuation (t, y_t) is a free draw at u_{t+1}, …).
    `reuse_selection = true` reuses them anyway (cheaper, biased).

Halves. Each continuation belongs to one half (0/1), fixed when it is planned
from counts only (free ones by their sample index, forced ones to the emptier
half of their candidate); `q_halves` and `ideal_halves` use the two halves.

Budgets (hard: a sampler call is planned so that even if every continuation ran
to its length limit the caps hold): `max_tokens` and `max_continuations` per
rollout; `run_max_tokens` and `run_max_continuations` per run, spread evenly:
each rollout may spend run_cap / `rollouts_total` (the pipeline passes
`rollouts_total`), so a rollout's budget never depends on the order in which
rollouts run or on what others spent, and resumed runs give identical results.

Seeds come from (job seed, "free", t, m) and (job seed, "forced", t, k, m), m
the sample index in its stream: results do not depend on batching.

Extra per-node fields (`TargetedNodeEstimate`, also returned by `uniform`):
    q_var    [C] unbiased estimate of Var(Q̂_k) (Q̂(1−Q̂)/(n−1); 0 where exact):
             noise energy N̂ = gadiag_core.scoring.noise.noise_energy(probs, q_var, τ)
    q_se     [C] standard error of Q̂_k for intervals (Laplace-smoothed, never 0
             unless exact)
    exact    [C] bool, Q computed exactly by the verifier
    energy_binomial, energy_split   two unbiased estimates of ‖a*_C‖² (may be ≤ 0)
    norm_se  ‖â‖ noise: sqrt(N̂) with the Laplace variances
"""


from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Optional

import torch

from gadiag_core.interfaces import EstimationJob, IdealEstimate
from gadiag_core.scoring.vectors import policy, screen_bound
from gadiag_plugins.estimation import TargetedOptions
from gadiag_plugins.estimation.common import (
    Budget,
    CandidateStats,
    ContinuationPool,
    _column_norms,
    _laplace_var,
    _node_estimate,
    _Plan,
    _ScreenedEstimator,
    candidate_tokens,
    node_weight,
    relative_noise,
    select_nodes,
)


@dataclass
class _Gain:
    """One (node, candidate) pair in the greedy allocation.

    weight: ‖M e_k‖² σ² (σ² the per-sample variance the allocation assumes,
    `allocation_variance`) times the node's scale; n samples so far;
    cost: expected tokens of one more continuation from node t."""

    weight: float
    n: int
    cost: float
    t: int
    k: int
    n_half0: int
    n_half1: int

    def priority(self) -> float:
        """Marginal noise reduction per token of one more sample: w / (n (n + 1)) / L."""
        return self.weight / (max(self.n, 1) * (self.n + 1)) / self.cost

    def take(self) -> int:
        """Count one more sample, in the emptier half; returns that half."""
        half = 0 if self.n_half0 <= self.n_half1 else 1
        self.n += 1
        if half == 0:
            self.n_half0 += 1
        else:
            self.n_half1 += 1
        return half


def allocation_variance(stats: CandidateStats, allocation: str) -> float:
    """The per-sample variance σ² of one candidate's rewards that the greedy
    allocation assumes (a float in (0, 1/4]).

    blind:            1/4, the largest Bernoulli variance, whatever the rewards
                      say: the counts then never depend on the rewards, so Q̂ is
                      unbiased given them and so is the binomial noise estimate
                      (module docstring, step 4)
    energy, relative: Q̃(1 − Q̃), Q̃ = (s + 1)/(n + 2) the Laplace-smoothed mean
                      of the candidate's rewards so far (never 0)
    """
    if allocation == "blind":
        return 0.25
    return _laplace_var(stats.successes, stats.n) * max(stats.n, 1)


class TargetedEstimator(_ScreenedEstimator):
    """Value backbone with bisection, pivotal nodes, adaptive allocation, reuse.

    Options (harness.toml [estimator]; defaults in parentheses):
      screen_epsilon (0.05)   skip nodes with 1 − π_max below this
      mass_threshold (0.95)   candidates: student top tokens up to this mass …
      max_candidates (5)      … at most this many, plus teachers' picks and the sampled token
      continuations (5)       free continuations per backbone point, and the mean
                              number of samples per candidate the allocation may reach
      max_nodes (6)           most pivotal nodes scored per rollout (None: all)
      backbone_points (4)     initial grid: about this many intervals over the eligible nodes
      delta (0.1)             a segment is pivotal if its end values differ by more …
      z (1.5)                 … and by more than z standard errors of the difference
      value_growth (2.0)      unsure comparisons: up to this × continuations per V-point
      target_error (0.25)     stop when the estimated relative RMS error of the
                              rollout's ideal vector is at most this (0: never early)
      allocation (blind)      blind: greedy on the noise energy of the rollout's â, with
                              every candidate's per-sample variance taken as 1/4 (the
                              counts never depend on the rewards: see step 4);
                              energy: the same with each candidate's observed variance;
                              relative: energy, each node's gains divided by its Ê + N̂
      energy_floor (0.05)     relative: added to Ê + N̂, in units of the node's one-sample noise
      free_candidates (16)    also candidates: up to this many tokens whose Q is exact
                              (EOS; every token at the length limit), by π: no samples
      rollout_floor (12)      the pools may hold continuations × max(sampled candidates, this)
                              samples: a short rollout gets about the samples of a full one
                              (each rollout's cosine counts once; step 4). 0: no floor
      max_tokens, max_continuations                per-rollout hard caps (None)
      run_max_tokens, run_max_continuations        per-run hard caps, spread evenly
      rollouts_total          rollouts in the run (needed by the run caps)
      reuse (true)            count every continuation in every estimate it informs
      reuse_selection (false) also reuse the selection samples at targeted nodes (biased)
      max_rounds (4)          sampler calls of the allocation phase (each one costs a
                              decode pass on a real model: few, geometric rounds)
      direct_nodes (16)       rollouts with at most this many eligible nodes skip
                              the backbone: their eligible nodes (the max_nodes most
                              uncertain) are targeted directly (0: always bisect).
                              16 from benchmarks/estimator_cost.py section D: on
                              the default student's short rollouts (8 eligible
                              nodes on average) the backbone reached rel_err
                              0.17 where direct targeting reached 0.08
    """

    name = "targeted"
    description = "value backbone + bisection to pivotal nodes, adaptive pi^2 Var allocation, continuation reuse, hard budgets"

    options_class = TargetedOptions

    def __init__(self, rollouts_total: int | None = None, **options):
        """Options: TargetedOptions (plugins/estimation/__init__.py), checked there."""
        self._set_options(options, rollouts_total)
        # Totals over the estimator's lifetime (one run), for reporting only:
        # they never influence what a rollout does.
        self.spent = {"rollouts": 0, "continuations": 0, "sampled_tokens": 0}

    # -- the value backbone ------------------------------------------------

    def _value(self, pool: ContinuationPool, t: int, exact_end: Optional[float]) -> tuple[float, float, int]:
        """(V̂(u_t), its variance (Laplace), n). Node T is exact when finished."""
        if t == pool.T:
            return float(exact_end), 0.0, 0
        cids = pool.v_samples(t)
        n = len(cids)
        if n == 0:
            return math.nan, math.inf, 0
        s = sum(pool.conts[c].reward for c in cids)
        return s / n, _laplace_var(s, n), n

    def _test(self, va, vb) -> str:
        """'yes': the values differ (gap > delta and > z standard errors);
        'unsure': gap > delta but not significant; 'no': gap ≤ delta."""
        (a, var_a, _), (b, var_b, _) = va, vb
        if math.isnan(a) or math.isnan(b):
            return "no"
        gap = abs(a - b)
        if gap <= self.delta:
            return "no"
        return "yes" if gap > self.z * math.sqrt(var_a + var_b) else "unsure"

    def _top_up_free(self, pool: ContinuationPool, wanted: dict[int, int], budget: Budget) -> list[_Plan]:
        """Free continuations so that node t has wanted[t] free visits."""
        plans = []
        for t in sorted(wanted):
            if t >= pool.T:
                continue
            missing = wanted[t] - len(pool.v_samples(t))
            plans.extend(pool.plan_free(t) for _ in range(max(0, missing)))
        kept = budget.trim(plans, lambda p: pool.worst_tokens(p.start))
        pool.unplan([p for p in plans if p not in kept])
        return kept

    def _backbone(self, pool: ContinuationPool, budget: Budget, exact_end, eligible: list[int]):
        """Generator: bisection over the eligible nodes (V only jumps where the student is
        uncertain: E|ΔV| = τ‖a*‖₁ ≤ 2(1 − π_max)). V-points sit at eligible
        nodes and at the end; a segment [a, b) that differs is split at its
        middle eligible node until it holds one: that node is pivotal. An
        unsure comparison (gap > delta, not significant) first gets more
        samples at both ends (doubling, up to value_growth × continuations).
        Returns (values, pivotal [(node, gap)], unresolved [(nodes, gap)], points)."""
        T = pool.T
        stride = max(1, math.ceil(len(eligible) / self.backbone_points))
        points = set(eligible[::stride])
        if exact_end is not None:
            points.add(T)
        elif eligible[-1] + 1 < T:
            points.add(eligible[-1] + 1)
        cap = max(self.continuations, int(round(self.value_growth * self.continuations)))
        yield from self._spend(pool, budget, self._top_up_free(pool, {p: self.continuations for p in points}, budget))
        pivotal, unresolved = [], []
        while True:
            ordered = sorted(points)
            values = {t: self._value(pool, t, exact_end) for t in ordered}
            wanted: dict[int, int] = {}
            pivotal, unresolved = [], []
            for a, b in zip(ordered, ordered[1:]):
                inside = [e for e in eligible if a <= e < b]
                if not inside:
                    continue
                verdict = self._test(values[a], values[b])
                gap = abs(values[a][0] - values[b][0])
                if verdict == "unsure":
                    grow = [p for p in (a, b) if p < T and values[p][2] < cap]
                    for p in grow:
                        wanted[p] = max(wanted.get(p, 0), min(cap, 2 * values[p][2]))
                    if not grow and len(inside) == 1:
                        pass
                elif verdict == "yes":
                    if len(inside) == 1:
                        pivotal.append((inside[0], gap))
                    else:
                        mid = inside[len(inside) // 2]
                        wanted[mid] = max(wanted.get(mid, 0), self.continuations)
                        unresolved.append((inside, gap))
            if not wanted or budget.exhausted(1):
                break
            plans = self._top_up_free(pool, wanted, budget)
            new = {p for p in wanted if p not in points}
            points |= new
            if not plans and not new:
                break
            yield from self._spend(pool, budget, plans)
        return values, pivotal, unresolved, len(points)

    def _spend(self, pool: ContinuationPool, budget: Budget, plans: list[_Plan]):
        """Generator: run `plans` and charge them to the budget."""
        before = pool.tokens
        yield from pool.run(plans)
        budget.tokens += pool.tokens - before
        budget.continuations += len(plans)

    # -- targets -------------------------------------------------------------

    def _targets(self, spread, pivotal, unresolved) -> list[int]:
        """Pivotal nodes, largest jump first; an unresolved differing segment
        (budget) contributes its most uncertain node. At most max_nodes."""
        scored = [(gap, float(spread[t]), t) for t, gap in pivotal]
        for inside, gap in unresolved:
            t = max(inside, key=lambda i: float(spread[i]))
            scored.append((gap, float(spread[t]), t))
        scored.sort(reverse=True)
        chosen = []
        for _, _, t in scored:
            if t not in chosen:
                chosen.append(t)
        if self.max_nodes is not None:
            chosen = chosen[: self.max_nodes]
        return sorted(chosen)

    # -- allocation ----------------------------------------------------------

    def _stats(self, pool: ContinuationPool, t: int, cands: list[int]) -> list[CandidateStats]:
        """Each candidate's statistics: exact where the continuation ends at once."""
        return [
            CandidateStats.known(pool.exact_q(t, k)) if pool.is_terminal(t, k) else pool.stats(pool.q_samples(t, k))
            for k in cands
        ]

    def _allocate(self, pool: ContinuationPool, budget: Budget, targets: list[tuple[int, list[int]]], probs):
        """Generator: forced continuations for the targeted candidates; returns rounds run.
        Long on purpose: the two phases share the pool, the budget and the gains."""
        tau = pool.tau
        cols = {t: _column_norms(probs[t, torch.tensor(c)], tau) for t, c in targets}
        nonexact = [(t, i, k) for t, cands in targets for i, k in enumerate(cands) if not pool.is_terminal(t, k)]
        cap = self.continuations * max(len(nonexact), self.rollout_floor)
        # 1. One sample in each half for every candidate that lacks one.
        plans = []
        for t, i, k in nonexact:
            st = pool.stats(pool.q_samples(t, k))
            if st.n_half0 == 0:
                plans.append(pool.plan_forced(t, k, 0))
            if st.n_half1 == 0:
                plans.append(pool.plan_forced(t, k, 1))
        kept = budget.trim(plans, lambda p: pool.worst_tokens(p.start))
        pool.unplan([p for p in plans if p not in kept])
        yield from self._spend(pool, budget, kept)
        rounds = 1 if kept else 0
        # 2. Rounds of greedy allocation.
        while rounds < self.max_rounds and nonexact:
            pooled = 0
            energy_noise, energy_signal = 0.0, 0.0
            gains = []
            relative = []  # per node: estimated N / (E + N) (allocation "relative")
            for t, cands in targets:
                stats = self._stats(pool, t, cands)
                scale = 1.0
                if all(s.exact or s.n > 0 for s in stats):
                    # Conservative: Laplace variances (never 0) for the noise energy.
                    node = _node_estimate(t, cands, probs[t], stats, tau)
                    energy_noise += node.norm_se**2
                    energy_signal += float(node.ideal.double().pow(2).sum()) - node.norm_se**2
                    if self.allocation == "relative":
                        scale = node_weight(node, float(cols[t].sum()) / 4, self.energy_floor)
                        relative.append(relative_noise(node))
                else:
                    energy_signal = math.nan
                cost = pool.expected_tokens(t)
                for i, (k, st) in enumerate(zip(cands, stats)):
                    if st.exact:
                        continue
                    pooled += st.n
                    var = allocation_variance(st, self.allocation)
                    gains.append(_Gain(float(cols[t][i]) * var * scale, st.n, cost, t, k, st.n_half0, st.n_half1))
            if self.target_error > 0:
                if self.allocation != "relative":
                    if energy_signal > 0 and energy_noise <= self.target_error**2 * energy_signal:
                        break
                elif relative and len(relative) == len(targets) and sum(relative) / len(relative) <= self.target_error**2:
                    break
            room = cap - pooled
            if room <= 0 or budget.exhausted(1):
                break
            # Geometric rounds (each one sees the previous results), but large
            # enough to reach the cap within max_rounds.
            size = max(len(nonexact), pooled // 2, math.ceil(room / (self.max_rounds - rounds)))
            size = min(size, room)
            # Greedy by marginal noise reduction per token: w σ² / (n (n + 1)) / L
            # (blind: σ² = 1/4, so the order depends on π, costs and counts only).
            chosen = []
            heap = [(-g.priority(), j) for j, g in enumerate(gains)]
            heapq.heapify(heap)
            while heap and len(chosen) < size:
                _, j = heapq.heappop(heap)
                g = gains[j]
                chosen.append(pool.plan_forced(g.t, g.k, g.take()))
                heapq.heappush(heap, (-g.priority(), j))
            kept = budget.trim(chosen, lambda p: pool.worst_tokens(p.start))
            pool.unplan([p for p in chosen if p not in kept])
            if not kept:
                break
            yield from self._spend(pool, budget, kept)
            rounds += 1
        return rounds

    # -- the estimate --------------------------------------------------------

    def steps(self, job: EstimationJob):
        """Request generator (see common.drive): yields batches of continuation
        requests, receives their outputs, returns the IdealEstimate.
        Long on purpose: the steps of the module docstring, in order, sharing one pool and one budget."""
        tau = job.student.temperature
        probs = policy(job.student_logits.float(), tau)
        bound = screen_bound(probs, tau)
        spread = 1.0 - probs.max(-1).values
        T = probs.shape[0]
        budget = Budget(self.token_cap, self.continuation_cap)
        pool = ContinuationPool(job, reuse=self.reuse)
        info = {
            "continuations": 0,
            "sampled_tokens": 0,
            "nodes_screened": int(T),
            "nodes_eligible": int((spread >= self.screen_epsilon).sum()),
            "nodes_targeted": 0,
            "value_points": 0,
            "pivotal_segments": 0,
            "backbone_continuations": 0,
            "backbone_tokens": 0,
            "allocation_rounds": 0,
            "direct": 0,
            "exact_candidates": 0,
            "reused_samples": 0,
            "covered_mass_sum": 0.0,
        }
        if T == 0 or info["nodes_eligible"] == 0:
            return IdealEstimate(nodes=[], screen_bound=bound, budget=info)

        exact_end = pool.verify_ids(pool.y) if pool.finished() else None
        eligible = (spread >= self.screen_epsilon).nonzero().flatten().tolist()
        if len(eligible) <= self.direct_nodes:
            # Few uncertain nodes: testing each one would cost about as much as
            # estimating it, so target them directly (the most uncertain first).
            nodes = select_nodes(probs, self.screen_epsilon, self.max_nodes)
            info["direct"] = 1
        else:
            values, pivotal, unresolved, n_points = yield from self._backbone(pool, budget, exact_end, eligible)
            info.update(
                value_points=n_points,
                pivotal_segments=len(pivotal) + len(unresolved),
                backbone_continuations=len(pool.conts),
                backbone_tokens=pool.tokens,
            )
            nodes = self._targets(spread, pivotal, unresolved)
        if not self.reuse_selection:
            pool.q_floor = len(pool.conts)
        targets = []
        for t in nodes:
            extra = [int(pref[t]) for pref in job.teacher_preferred.values()] + [pool.y[t]]
            cands = candidate_tokens(probs[t], self.mass_threshold, self.max_candidates, extra)
            # Tokens whose Q is exact (no sampling) join for free: less truncation.
            cands += [k for k in pool.terminal_tokens(t, probs[t], self.free_candidates) if k not in cands]
            targets.append((t, cands))
        info["allocation_rounds"] = (yield from self._allocate(pool, budget, targets, probs)) if targets else 0

        estimates = []
        for t, cands in targets:
            stats = self._stats(pool, t, cands)
            if not all(s.both_halves for s in stats):
                continue  # the budget did not allow both halves for every candidate
            estimates.append(_node_estimate(t, cands, probs[t], stats, tau))
            for i, k in enumerate(cands):
                if stats[i].exact:
                    info["exact_candidates"] += 1
                else:
                    # Samples not started at t for k itself: what reuse gave for free.
                    info["reused_samples"] += sum(
                        1 for c in pool.q_samples(t, k) if not (pool.conts[c].start == t and pool.conts[c].forced == k)
                    )
        info.update(
            continuations=len(pool.conts),
            sampled_tokens=pool.tokens,
            nodes_targeted=len(estimates),
            covered_mass_sum=sum(e.covered_mass for e in estimates),
        )
        self.spent["rollouts"] += 1
        self.spent["continuations"] += len(pool.conts)
        self.spent["sampled_tokens"] += pool.tokens
        return IdealEstimate(nodes=estimates, screen_bound=bound, budget=info)

