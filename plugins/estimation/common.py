"""What the sampling estimators share (uniform.py, targeted.py): candidate
sets, node screening, per-candidate statistics, the continuation pool that
indexes every continuation by the estimates it informs, hard budgets, and the
options every estimator takes. targeted.py's docstring explains the reuse
rules the pool implements.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

import torch

from gadiag_core.errors import UsageError
from gadiag_core.interfaces import ContinuationRequest, EstimationJob, GradientEstimator, IdealEstimate, NodeEstimate
from gadiag_core.options import as_dict, build_options
from gadiag_core.scoring.vectors import ideal_vector_on_candidates
from gadiag_core.seeding import derive_seed


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


def node_weight(node, scale: float, floor: float) -> float:
    """Allocation `relative`: how much one unit of noise energy at this node costs
    the token mean of cosines.

    The cosine of â = a* + noise is shrunk toward 0 by about N / (2 E) while the
    noise energy N is small against E = ‖a*‖², and by 1 − sqrt(E / (E + N)) in
    general; each node counts once in the token mean, so a unit of N costs
    more where E is small. With Ê = ‖â‖² − N̂ (binomial, unbiased variances),
    N̂_L the noise energy with Laplace variances and `scale` the node's own unit
    of energy (Σ_k ‖M e_k‖² / 4: one sample per candidate at Q = 1/2):

        weight = 1 / (max(Ê, 0) + N̂_L + floor · scale)

    (the noise term keeps a node whose Ê is ≤ 0 from taking every sample).
    Returns a positive float, the multiplier of the node's candidates' gains.
    """
    energy = max(node.energy_binomial, 0.0)
    return 1.0 / (energy + node.norm_se**2 + max(floor * scale, 1e-300))


def relative_noise(node) -> float:
    """N̂_L / (max(Ê, 0) + N̂_L) in [0, 1]: the share of the node's ‖â‖² that is
    noise (N̂_L with Laplace variances, Ê = ‖â‖² − N̂ binomial); 1 where Ê ≤ 0."""
    energy = max(node.energy_binomial, 0.0)
    noise = node.norm_se**2
    return noise / (energy + noise) if energy + noise > 0 else 0.0


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


@dataclass
class CandidateStats:
    """What the pooled continuations say about Q(u_t, k) for one candidate k.

    q, q_half0, q_half1:  Q̂ from all samples and from each half (NaN without samples)
    n, n_half0, n_half1:  sample counts
    successes:            rewards summed over the n samples
    exact:                Q is known exactly (the continuation ends at once): no samples
    """

    q: float
    q_half0: float
    q_half1: float
    n: int
    n_half0: int
    n_half1: int
    successes: float
    exact: bool = False

    @classmethod
    def known(cls, q: float) -> "CandidateStats":
        return cls(q, q, q, 0, 0, 0, 0.0, exact=True)

    @property
    def both_halves(self) -> bool:
        return self.exact or (self.n_half0 > 0 and self.n_half1 > 0)


def _node_estimate(t: int, cands: list[int], probs_t: torch.Tensor, stats: list[CandidateStats], tau: float) -> TargetedNodeEstimate:
    """Assemble a node's estimate from its candidates' statistics."""
    cand = torch.tensor(cands, dtype=torch.long)
    cand_probs = probs_t[cand]
    q_hat = torch.tensor([s.q for s in stats], dtype=torch.float64)
    halves = torch.tensor([[s.q_half0 for s in stats], [s.q_half1 for s in stats]], dtype=torch.float64)
    counts = torch.tensor([s.n for s in stats], dtype=torch.long)
    exact = torch.tensor([s.exact for s in stats], dtype=torch.bool)
    q_var = torch.tensor([0.0 if s.exact else _unbiased_var(s.q, s.n) for s in stats], dtype=torch.float64)
    q_se = torch.tensor([0.0 if s.exact else math.sqrt(_laplace_var(s.successes, s.n)) for s in stats], dtype=torch.float64)
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

    def terminal_tokens(self, t: int, probs_t: torch.Tensor, limit: int) -> list[int]:
        """The `limit` most probable tokens at node t whose continuation ends at
        once (every token at the length limit, else the EOS ids): their Q is
        exact for one verifier call, without sampling."""
        if limit <= 0:
            return []
        if t + 1 >= self.job.max_new_tokens:
            return probs_t.topk(min(limit, probs_t.shape[-1])).indices.tolist()
        eos = [k for k in self.eos if 0 <= k < probs_t.shape[-1]]
        return sorted(eos, key=lambda k: (-float(probs_t[k]), k))[:limit]

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

    def run(self, plans: list[_Plan]):
        """Generator: yields the continuation requests of `plans` (a list of
        ContinuationRequest), receives their outputs, and indexes them.
        Estimators call it with `yield from`; see `drive`."""
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
        outputs = yield requests
        for plan, out in zip(plans, outputs):
            out = [int(i) for i in out]
            reward = self.verify_ids(self.y[: plan.start] + out)
            cid = len(self.conts)
            self.conts.append(_Cont(plan.start, plan.forced, out, reward, plan.half))
            self.started_at[plan.start].append(cid)
            self.tokens += len(out)
            self._index(cid)

    def run_now(self, plans: list[_Plan]) -> None:
        """`run` with the job's own sampler, at once (tests, benchmarks)."""
        drive(self.run(plans), self.job)

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

    def stats(self, cids: list[int]) -> "CandidateStats":
        """Pooled statistics of the rewards of continuations `cids`."""
        n = len(cids)
        s = sum(self.conts[c].reward for c in cids)
        h = [[], []]
        for c in cids:
            h[self.conts[c].half].append(self.conts[c].reward)
        mean = s / n if n else math.nan
        m0 = sum(h[0]) / len(h[0]) if h[0] else math.nan
        m1 = sum(h[1]) / len(h[1]) if h[1] else math.nan
        return CandidateStats(mean, m0, m1, n, len(h[0]), len(h[1]), s)


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


# ----------------------------------------------------------------------------
# The base of the sampling estimators


def drive(steps, job: EstimationJob):
    """Run an estimator's request generator to the end, one sampler call per
    request batch (the sequential driver; gadiag_core.engine.scheduler batches
    the requests of many rollouts instead). Returns the generator's result."""
    try:
        requests = next(steps)
        while True:
            requests = steps.send(job.sampler.sample(job.student, requests, job.student.temperature))
    except StopIteration as stop:
        return stop.value


class _ScreenedEstimator(GradientEstimator):
    """Options every sampling estimator here shares: screening, candidates,
    samples per candidate, node cap and hard budgets. They are checked once,
    by the options dataclass the estimator registers (plugins/estimation/__init__.py),
    also when the class is built directly."""

    options_class: type = None

    def estimate(self, job: EstimationJob) -> IdealEstimate:
        """The ideal vectors, sampling through job.sampler one batch at a time."""
        return drive(self.steps(job), job)

    def _set_options(self, options: dict, rollouts_total) -> object:
        o = build_options(self.options_class, options, f"estimator {self.name!r}")
        if rollouts_total is not None and (isinstance(rollouts_total, bool) or not isinstance(rollouts_total, int) or rollouts_total < 1):
            raise UsageError(f"estimator {self.name!r}: rollouts_total must be a positive integer, got {rollouts_total!r}")
        for key, value in as_dict(o).items():
            setattr(self, key, value)
        self.token_cap = _per_rollout_cap(o.max_tokens, o.run_max_tokens, rollouts_total, "tokens")
        self.continuation_cap = _per_rollout_cap(o.max_continuations, o.run_max_continuations, rollouts_total, "continuations")
        return o
