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
   counts 0, q_se 0).
4. Adaptive allocation. Each candidate first gets one sample in each half
   (forced continuations). Then rounds of continuations go to the
   (node, candidate) pairs with the largest reduction of the noise energy of â
   per sampled token, ‖M e_k‖² Var(Q̂_k) / (n_k (n_k + 1)) / L_t (‖M e_k‖² ≈
   π_k², M the linear map Q̂ → â; L_t the expected continuation length from
   node t), until the estimated relative error sqrt(N̂ / Ê‖a*‖²) of the
   rollout's ideal vector (Laplace variances, conservative) is at most
   `target_error`, or the pools hold `continuations` samples per candidate on
   average, or a hard budget is reached.

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
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

import torch

from gadiag_core.errors import UsageError
from gadiag_core.interfaces import (
    ContinuationRequest,
    EstimationJob,
    GradientEstimator,
    IdealEstimate,
    NodeEstimate,
)
from gadiag_core.seeding import derive_seed
from gadiag_core.scoring.vectors import ideal_vector_on_candidates, policy, screen_bound

__all__ = [
    "candidate_tokens",
    "select_nodes",
    "TargetedNodeEstimate",
    "ContinuationPool",
    "Budget",
    "TargetedEstimator",
    "UniformEstimator",
]


# ----------------------------------------------------------------------------
# Shared pieces


def candidate_tokens(probs_t: torch.Tensor, mass_threshold: float, max_candidates: int, extra: list[int]) -> list[int]:
    """Student top tokens until their mass reaches `mass_threshold` (at least
    two, at most `max_candidates`), then the `extra` tokens (teachers' picks,
    the sampled token). One candidate alone would always give a* = 0: under the
    value-neutral rule its Q̂ is V̂."""
    top_probs, top_ids = probs_t.topk(min(max(2, max_candidates), probs_t.shape[-1]))
    chosen: list[int] = []
    mass = 0.0
    for p, k in zip(top_probs.tolist(), top_ids.tolist()):
        chosen.append(k)
        mass += p
        if mass >= mass_threshold and len(chosen) >= 2:
            break
    return list(dict.fromkeys(chosen + [int(k) for k in extra]))


def select_nodes(probs: torch.Tensor, epsilon: float, max_nodes: int | None) -> list[int]:
    """Nodes with 1 − π_max ≥ epsilon; the `max_nodes` most uncertain, in order."""
    spread = 1.0 - probs.max(-1).values
    eligible = (spread >= epsilon).nonzero().flatten()
    if max_nodes is not None and len(eligible) > max_nodes:
        keep = spread[eligible].topk(max_nodes).indices
        eligible = eligible[keep]
    return sorted(eligible.tolist())


def _laplace_var(successes: float, n: int) -> float:
    """Var of a mean of n Bernoulli draws, with Q̃ = (s + 1)/(n + 2): never 0."""
    q = (successes + 1.0) / (n + 2.0)
    return q * (1.0 - q) / max(n, 1)


def _unbiased_var(q: float, n: int) -> float:
    """Q̂(1 − Q̂)/(n − 1): unbiased for Var Q̂ = Q(1 − Q)/n (n ≥ 2); 1/4 for n ≤ 1."""
    return q * (1.0 - q) / (n - 1) if n > 1 else 0.25 / max(n, 1)


def _column_norms(probs: torch.Tensor, tau: float) -> torch.Tensor:
    """‖M e_k‖² for M = diag(π)(I − 1wᵀ)/τ: how much Var(Q̂_k) adds to E‖â‖².
    ≈ π_k² for small candidates; smaller for the dominant one (V̂ follows it)."""
    p = probs.double()
    w = p / p.sum().clamp_min(1e-300)
    return (p * p * (1 - 2 * w) + w * w * (p * p).sum()) / tau**2


@dataclass
class TargetedNodeEstimate(NodeEstimate):
    """NodeEstimate plus the noise information the pipeline needs for standard
    errors and noise-corrected cosines (see the module docstring)."""

    q_var: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    q_se: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    exact: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))
    energy_binomial: float = math.nan
    energy_split: float = math.nan
    norm_se: float = math.nan


def _node_estimate(t: int, cands: list[int], probs_t: torch.Tensor, stats: list[tuple], tau: float) -> TargetedNodeEstimate:
    """Assemble a node's estimate from per-candidate stats
    (q_hat, q_half0, q_half1, n, exact, successes)."""
    cand = torch.tensor(cands, dtype=torch.long)
    cand_probs = probs_t[cand]
    q_hat = torch.tensor([s[0] for s in stats], dtype=torch.float64)
    halves = torch.tensor([[s[1] for s in stats], [s[2] for s in stats]], dtype=torch.float64)
    counts = torch.tensor([s[3] for s in stats], dtype=torch.long)
    exact = torch.tensor([s[4] for s in stats], dtype=torch.bool)
    q_var = torch.tensor([0.0 if s[4] else _unbiased_var(s[0], s[3]) for s in stats], dtype=torch.float64)
    q_se = torch.tensor([0.0 if s[4] else math.sqrt(_laplace_var(s[5], s[3])) for s in stats], dtype=torch.float64)
    ideal, value = ideal_vector_on_candidates(cand_probs.double(), q_hat, tau)
    ideal_h, _ = ideal_vector_on_candidates(cand_probs.double().expand(2, -1), halves, tau)
    cols = _column_norms(cand_probs, tau)
    noise = float((cols * q_var).sum())
    return TargetedNodeEstimate(
        node=t,
        candidates=cand,
        probs=cand_probs,
        q_hat=q_hat.float(),
        q_halves=halves.float(),
        counts=counts,
        value=float(value),
        covered_mass=float(cand_probs.sum()),
        ideal=ideal.float(),
        ideal_halves=ideal_h.float(),
        q_var=q_var,
        q_se=q_se,
        exact=exact,
        energy_binomial=float((ideal * ideal).sum()) - noise,
        energy_split=float((ideal_h[0] * ideal_h[1]).sum()),
        norm_se=math.sqrt(float((cols * q_se * q_se).sum())),
    )


# ----------------------------------------------------------------------------
# Budgets


@dataclass
class Budget:
    """Hard caps for one rollout; None = no cap. A plan fits when even its
    worst case (every continuation runs to its length limit) stays within."""

    max_tokens: Optional[float] = None
    max_continuations: Optional[float] = None
    tokens: int = 0
    continuations: int = 0

    def fits(self, worst_tokens: int, count: int = 1) -> bool:
        if self.max_continuations is not None and self.continuations + count > self.max_continuations:
            return False
        if self.max_tokens is not None and self.tokens + worst_tokens > self.max_tokens:
            return False
        return True

    def trim(self, plans: list, worst) -> list:
        """The longest prefix-in-priority subset of `plans` that fits (a plan
        that does not fit is skipped; cheaper later ones may still fit)."""
        kept, tokens, count = [], 0, 0
        for plan in plans:
            w = worst(plan)
            if self.fits(tokens + w, count + 1):
                kept.append(plan)
                tokens += w
                count += 1
        return kept

    def exhausted(self, cheapest: int = 1) -> bool:
        return not self.fits(cheapest, 1)


# ----------------------------------------------------------------------------
# The continuation pool: every continuation of one rollout and what it informs


@dataclass
class _Plan:
    start: int
    forced: Optional[int]
    index: int  # sample index in its stream (the seed)
    half: int


@dataclass
class _Cont:
    start: int
    forced: Optional[int]
    tokens: list[int]
    reward: float
    half: int


class ContinuationPool:
    """All continuations sampled along one rollout, indexed by the path each
    one takes (see the module docstring, "Reuse").

    through[(t, k)]  continuations that reach node t and take token k there
    free[t]          continuations that reach node t and draw their token there
    """

    def __init__(self, job: EstimationJob, reuse: bool = True):
        self.job = job
        self.y = [int(i) for i in job.generated_ids]
        self.T = len(self.y)
        self.tau = job.student.temperature
        self.reuse = reuse
        self.eos = set(int(e) for e in job.student.eos_token_ids)
        self.conts: list[_Cont] = []
        self.through: dict[tuple[int, int], list[int]] = defaultdict(list)
        self.free: dict[int, list[int]] = defaultdict(list)
        self.next_index: dict[tuple, int] = defaultdict(int)
        self.started_at: dict[int, list[int]] = defaultdict(list)
        self.tokens = 0
        self.q_floor = 0  # Q pools use continuations numbered q_floor and later
        self._verdicts: dict[str, float] = {}

    # -- rewards and exact values ------------------------------------------

    def verify_ids(self, ids: list[int]) -> float:
        text = self.job.student.decode(ids)
        value = self._verdicts.get(text)
        if value is None:
            value = float(self.job.verify(text))
            self._verdicts[text] = value
        return value

    def finished(self) -> bool:
        """Did the rollout end by the sampler's own rules (EOS or the limit)?"""
        return self.T > 0 and (self.y[-1] in self.eos or self.T >= self.job.max_new_tokens)

    def is_terminal(self, t: int, k: int) -> bool:
        """Does a continuation from node t that takes k end at once?"""
        return int(k) in self.eos or t + 1 >= self.job.max_new_tokens

    def exact_q(self, t: int, k: int) -> float:
        return self.verify_ids(self.y[:t] + [int(k)])

    def worst_tokens(self, t: int) -> int:
        return max(1, self.job.max_new_tokens - t)

    def expected_tokens(self, t: int) -> float:
        """Mean length of continuations started at t so far, else the rollout's
        remaining length (the cost model of the allocation; not a cap)."""
        started = self.started_at.get(t)
        if started:
            return max(1.0, sum(len(self.conts[c].tokens) for c in started) / len(started))
        return float(max(1, min(self.worst_tokens(t), self.T - t + 1)))

    # -- planning ----------------------------------------------------------

    def plan_free(self, t: int) -> _Plan:
        key = ("free", t)
        m = self.next_index[key]
        self.next_index[key] += 1
        return _Plan(t, None, m, m % 2)

    def plan_forced(self, t: int, k: int, half: int) -> _Plan:
        key = ("forced", t, int(k))
        m = self.next_index[key]
        self.next_index[key] += 1
        return _Plan(t, int(k), m, half)

    def unplan(self, plans: list[_Plan]) -> None:
        """Give back sample indices of plans that will not run (budget), in
        reverse order, so that index streams stay contiguous."""
        for plan in reversed(plans):
            key = ("free", plan.start) if plan.forced is None else ("forced", plan.start, plan.forced)
            if self.next_index[key] == plan.index + 1:
                self.next_index[key] -= 1

    def run(self, plans: list[_Plan]) -> None:
        if not plans:
            return
        job = self.job
        requests = []
        for plan in plans:
            key = ("free", plan.start) if plan.forced is None else ("forced", plan.start, plan.forced)
            requests.append(
                ContinuationRequest(
                    prefix_ids=tuple(job.prompt_ids + self.y[: plan.start]),
                    max_new_tokens=self.worst_tokens(plan.start),
                    forced_first=plan.forced,
                    seed=derive_seed(job.seed, *key, plan.index),
                )
            )
        outputs = job.sampler.sample(job.student, requests, self.tau)
        for plan, out in zip(plans, outputs):
            out = [int(i) for i in out]
            reward = self.verify_ids(self.y[: plan.start] + out)
            cid = len(self.conts)
            self.conts.append(_Cont(plan.start, plan.forced, out, reward, plan.half))
            self.started_at[plan.start].append(cid)
            self.tokens += len(out)
            self._index(cid)

    def _index(self, cid: int) -> None:
        c = self.conts[cid]
        for j, token in enumerate(c.tokens):
            t = c.start + j
            if t >= self.T:
                break
            self.through[(t, token)].append(cid)
            if j > 0 or c.forced is None:
                self.free[t].append(cid)
            if not self.reuse or token != self.y[t]:
                break

    # -- estimates ---------------------------------------------------------

    def q_samples(self, t: int, k: int) -> list[int]:
        """Continuations whose reward is a sample of Q(u_t, k) (those numbered
        `q_floor` or later: see TargetedEstimator, "selection")."""
        own = self.through.get((t, int(k)), [])
        if self.q_floor:
            own = [c for c in own if c >= self.q_floor]
        if self.reuse and int(k) == self.y[t] and t + 1 < self.T:
            nxt = [c for c in self.free.get(t + 1, []) if c >= self.q_floor]
            if nxt:
                return sorted(set(own) | set(nxt))
        if not self.reuse:
            # Only continuations started here for this token (no reuse at all).
            return [c for c in own if self.conts[c].start == t and (self.conts[c].forced == int(k) or self.conts[c].forced is None)]
        return own

    def v_samples(self, t: int) -> list[int]:
        if not self.reuse:
            return [c for c in self.free.get(t, []) if self.conts[c].start == t]
        return self.free.get(t, [])

    def stats(self, cids: list[int]) -> tuple[float, float, float, int, int, int, float]:
        """(mean, mean half 0, mean half 1, n, n half 0, n half 1, successes)."""
        n = len(cids)
        s = sum(self.conts[c].reward for c in cids)
        h = [[], []]
        for c in cids:
            h[self.conts[c].half].append(self.conts[c].reward)
        mean = s / n if n else math.nan
        m0 = sum(h[0]) / len(h[0]) if h[0] else math.nan
        m1 = sum(h[1]) / len(h[1]) if h[1] else math.nan
        return mean, m0, m1, n, len(h[0]), len(h[1]), s


# ----------------------------------------------------------------------------
# Option handling


def _per_rollout_cap(per_rollout, per_run, rollouts_total, what: str):
    caps = []
    if per_rollout is not None:
        caps.append(float(per_rollout))
    if per_run is not None:
        if not rollouts_total:
            raise UsageError(f"estimator: run_max_{what} needs rollouts_total (the number of rollouts in the run)")
        caps.append(float(per_run) / int(rollouts_total))
    return min(caps) if caps else None


def _check_positive(name: str, value, allow_none: bool = True):
    if value is None and allow_none:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise UsageError(f"estimator option {name} must be a positive number, got {value!r}")
    return value


# ----------------------------------------------------------------------------
# uniform


class _ScreenedEstimator(GradientEstimator):
    """Options every sampling estimator here shares: screening, candidates,
    samples per candidate, node cap and hard budgets (validated once)."""

    def _common_options(
        self,
        screen_epsilon,
        mass_threshold,
        max_candidates,
        continuations,
        max_nodes,
        max_tokens,
        max_continuations,
        run_max_tokens,
        run_max_continuations,
        rollouts_total,
    ) -> None:
        if not 0 <= screen_epsilon < 1:
            raise UsageError("estimator option screen_epsilon must be in [0, 1)")
        if not isinstance(continuations, int) or continuations < 2:
            raise UsageError("estimator option continuations must be >= 2 (an integer: two halves for the noise estimate)")
        if not isinstance(max_candidates, int) or max_candidates < 2:
            raise UsageError("estimator option max_candidates must be an integer >= 2")
        if max_nodes is not None and (not isinstance(max_nodes, int) or max_nodes < 1):
            raise UsageError("estimator option max_nodes must be a positive integer")
        for name, value in (
            ("max_tokens", max_tokens),
            ("max_continuations", max_continuations),
            ("run_max_tokens", run_max_tokens),
            ("run_max_continuations", run_max_continuations),
            ("rollouts_total", rollouts_total),
        ):
            _check_positive(name, value)
        self.screen_epsilon = float(screen_epsilon)
        self.mass_threshold = float(mass_threshold)
        self.max_candidates = int(max_candidates)
        self.continuations = int(continuations)
        self.max_nodes = max_nodes
        self.token_cap = _per_rollout_cap(max_tokens, run_max_tokens, rollouts_total, "tokens")
        self.continuation_cap = _per_rollout_cap(max_continuations, run_max_continuations, rollouts_total, "continuations")


class UniformEstimator(_ScreenedEstimator):
    """Every screened node × every candidate × `continuations` forced rollouts."""

    name = "uniform"
    description = "naive baseline: every screened node x every candidate x M forced-first continuations"

    def __init__(
        self,
        screen_epsilon: float = 0.05,
        mass_threshold: float = 0.9,
        max_candidates: int = 4,
        continuations: int = 4,
        max_nodes: int | None = None,
        max_tokens: float | None = None,
        max_continuations: float | None = None,
        run_max_tokens: float | None = None,
        run_max_continuations: float | None = None,
        rollouts_total: int | None = None,
    ):
        """Budgets (the same options as `targeted`, hard in the same worst-case
        sense): nodes are kept, most uncertain first, while all their
        continuations fit; a node that does not fit is dropped whole."""
        self._common_options(
            screen_epsilon, mass_threshold, max_candidates, continuations, max_nodes,
            max_tokens, max_continuations, run_max_tokens, run_max_continuations, rollouts_total,
        )

    def estimate(self, job: EstimationJob) -> IdealEstimate:
        tau = job.student.temperature
        probs = policy(job.student_logits.float(), tau)
        bound = screen_bound(probs, tau)
        nodes = select_nodes(probs, self.screen_epsilon, self.max_nodes)
        pool = ContinuationPool(job, reuse=False)
        budget = Budget(self.token_cap, self.continuation_cap)
        spread = 1.0 - probs.max(-1).values
        kept, tokens, count = [], 0, 0
        for t in sorted(nodes, key=lambda i: -float(spread[i])):
            extra = [int(pref[t]) for pref in job.teacher_preferred.values()] + [int(job.generated_ids[t])]
            cands = candidate_tokens(probs[t], self.mass_threshold, self.max_candidates, extra)
            n = len(cands) * self.continuations
            if budget.fits(tokens + n * pool.worst_tokens(t), count + n):
                kept.append((t, cands))
                tokens += n * pool.worst_tokens(t)
                count += n
        plan_nodes, plans = sorted(kept), []
        for t, cands in plan_nodes:
            for k in cands:
                for m in range(self.continuations):
                    plans.append(pool.plan_forced(t, k, m % 2))
        pool.run(plans)
        estimates = []
        for t, cands in plan_nodes:
            stats = []
            for k in cands:
                mean, m0, m1, n, _, _, s = pool.stats(pool.q_samples(t, k))
                stats.append((mean, m0, m1, n, False, s))
            estimates.append(_node_estimate(t, cands, probs[t], stats, tau))
        budget = {
            "continuations": len(pool.conts),
            "sampled_tokens": pool.tokens,
            "nodes_screened": int(probs.shape[0]),
            "nodes_eligible": int((1.0 - probs.max(-1).values >= self.screen_epsilon).sum()),
            "nodes_targeted": len(estimates),
            "covered_mass_sum": sum(e.covered_mass for e in estimates),
        }
        return IdealEstimate(nodes=estimates, screen_bound=bound, budget=budget)


# ----------------------------------------------------------------------------
# targeted


class TargetedEstimator(_ScreenedEstimator):
    """Value backbone with bisection, pivotal nodes, adaptive allocation, reuse.

    Options (harness.toml [estimator]; defaults in parentheses):
      screen_epsilon (0.05)   skip nodes with 1 − π_max below this
      mass_threshold (0.9)    candidates: student top tokens up to this mass …
      max_candidates (4)      … at most this many, plus teachers' picks and the sampled token
      continuations (4)       free continuations per backbone point, and the mean
                              number of samples per candidate the allocation may reach
      max_nodes (6)           most pivotal nodes scored per rollout (None: all)
      backbone_points (4)     initial grid: about this many intervals over the eligible nodes
      delta (0.1)             a segment is pivotal if its end values differ by more …
      z (1.5)                 … and by more than z standard errors of the difference
      value_growth (2.0)      unsure comparisons: up to this × continuations per V-point
      target_error (0.25)     stop when the estimated relative RMS error of the
                              rollout's ideal vector is at most this (0: never early)
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

    def __init__(
        self,
        screen_epsilon: float = 0.05,
        mass_threshold: float = 0.9,
        max_candidates: int = 4,
        continuations: int = 4,
        max_nodes: int | None = 6,
        backbone_points: int = 4,
        delta: float = 0.1,
        z: float = 1.5,
        target_error: float = 0.25,
        max_tokens: float | None = None,
        max_continuations: float | None = None,
        run_max_tokens: float | None = None,
        run_max_continuations: float | None = None,
        rollouts_total: int | None = None,
        reuse: bool = True,
        max_rounds: int = 4,
        value_growth: float = 2.0,
        reuse_selection: bool = False,
        direct_nodes: int = 16,
    ):
        self._common_options(
            screen_epsilon, mass_threshold, max_candidates, continuations, max_nodes,
            max_tokens, max_continuations, run_max_tokens, run_max_continuations, rollouts_total,
        )
        if not isinstance(backbone_points, int) or backbone_points < 1:
            raise UsageError("estimator option backbone_points must be a positive integer")
        if delta < 0 or z < 0 or target_error < 0:
            raise UsageError("estimator options delta, z and target_error must be >= 0")
        self.backbone_points = int(backbone_points)
        self.delta = float(delta)
        self.z = float(z)
        self.target_error = float(target_error)
        self.reuse = bool(reuse)
        self.max_rounds = int(max_rounds)
        self.value_growth = float(value_growth)
        self.reuse_selection = bool(reuse_selection)
        if not isinstance(direct_nodes, int) or direct_nodes < 0:
            raise UsageError("estimator option direct_nodes must be an integer >= 0")
        self.direct_nodes = direct_nodes
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
        """Bisection over the eligible nodes (V only jumps where the student is
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
        self._spend(pool, budget, self._top_up_free(pool, {p: self.continuations for p in points}, budget))
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
            self._spend(pool, budget, plans)
        return values, pivotal, unresolved, len(points)

    def _spend(self, pool: ContinuationPool, budget: Budget, plans: list[_Plan]) -> None:
        before = pool.tokens
        pool.run(plans)
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

    def _stats(self, pool: ContinuationPool, t: int, cands: list[int]) -> list[tuple]:
        """Per candidate: (q_hat, q_half0, q_half1, n, exact, successes, n0, n1)."""
        out = []
        for k in cands:
            if pool.is_terminal(t, k):
                q = pool.exact_q(t, k)
                out.append((q, q, q, 0, True, 0.0, 0, 0))
            else:
                mean, m0, m1, n, n0, n1, s = pool.stats(pool.q_samples(t, k))
                out.append((mean, m0, m1, n, False, s, n0, n1))
        return out

    def _allocate(self, pool: ContinuationPool, budget: Budget, targets: list[tuple[int, list[int]]], probs) -> int:
        """Forced continuations for the targeted candidates; returns rounds run."""
        tau = pool.tau
        cols = {t: _column_norms(probs[t, torch.tensor(c)], tau) for t, c in targets}
        nonexact = [(t, i, k) for t, cands in targets for i, k in enumerate(cands) if not pool.is_terminal(t, k)]
        cap = self.continuations * len(nonexact)
        # 1. One sample in each half for every candidate that lacks one.
        plans = []
        for t, i, k in nonexact:
            st = pool.stats(pool.q_samples(t, k))
            n0, n1 = st[4], st[5]
            if n0 == 0:
                plans.append(pool.plan_forced(t, k, 0))
            if n1 == 0:
                plans.append(pool.plan_forced(t, k, 1))
        kept = budget.trim(plans, lambda p: pool.worst_tokens(p.start))
        pool.unplan([p for p in plans if p not in kept])
        self._spend(pool, budget, kept)
        rounds = 1 if kept else 0
        # 2. Rounds of greedy allocation.
        while rounds < self.max_rounds and nonexact:
            pooled = 0
            energy_noise, energy_signal = 0.0, 0.0
            gains = []
            for t, cands in targets:
                stats = self._stats(pool, t, cands)
                if all(s[4] or s[3] > 0 for s in stats):
                    # Conservative: Laplace variances (never 0) for the noise energy.
                    node = _node_estimate(t, cands, probs[t], [s[:6] for s in stats], tau)
                    energy_noise += node.norm_se**2
                    energy_signal += float(node.ideal.double().pow(2).sum()) - node.norm_se**2
                else:
                    energy_signal = math.nan
                cost = pool.expected_tokens(t)
                for i, k in enumerate(cands):
                    q, _, _, n, exact, s, n0, n1 = stats[i]
                    if exact:
                        continue
                    pooled += n
                    var = _laplace_var(s, n) * max(n, 1)  # per-sample variance Q̃(1 − Q̃)
                    gains.append([float(cols[t][i]) * var, n, cost, t, k, n0, n1])
            if self.target_error > 0 and energy_signal > 0 and energy_noise <= self.target_error**2 * energy_signal:
                break
            room = cap - pooled
            if room <= 0 or budget.exhausted(1):
                break
            # Geometric rounds (each one sees the previous results), but large
            # enough to reach the cap within max_rounds.
            size = max(len(nonexact), pooled // 2, math.ceil(room / (self.max_rounds - rounds)))
            size = min(size, room)
            # Greedy by marginal noise reduction per token: w σ² / (n (n + 1)) / L.
            chosen = []
            heap = [(-(g[0] / (max(g[1], 1) * (g[1] + 1)) / g[2]), j) for j, g in enumerate(gains)]
            heapq.heapify(heap)
            while heap and len(chosen) < size:
                _, j = heapq.heappop(heap)
                g = gains[j]
                half = 0 if g[5] <= g[6] else 1
                chosen.append(pool.plan_forced(g[3], g[4], half))
                g[1] += 1
                if half == 0:
                    g[5] += 1
                else:
                    g[6] += 1
                heapq.heappush(heap, (-(g[0] / (g[1] * (g[1] + 1)) / g[2]), j))
            kept = budget.trim(chosen, lambda p: pool.worst_tokens(p.start))
            pool.unplan([p for p in chosen if p not in kept])
            if not kept:
                break
            self._spend(pool, budget, kept)
            rounds += 1
        return rounds

    # -- the estimate --------------------------------------------------------

    def estimate(self, job: EstimationJob) -> IdealEstimate:
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
            values, pivotal, unresolved, n_points = self._backbone(pool, budget, exact_end, eligible)
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
            targets.append((t, candidate_tokens(probs[t], self.mass_threshold, self.max_candidates, extra)))
        info["allocation_rounds"] = self._allocate(pool, budget, targets, probs) if targets else 0

        estimates = []
        for t, cands in targets:
            stats = self._stats(pool, t, cands)
            if any(not s[4] and (s[6] == 0 or s[7] == 0) for s in stats):
                continue  # the budget did not allow both halves for every candidate
            estimates.append(_node_estimate(t, cands, probs[t], [s[:6] for s in stats], tau))
            for i, k in enumerate(cands):
                if stats[i][4]:
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

