"""The `uniform` estimator (the naive baseline, kept for comparison): every
screened node × every candidate × `continuations` forced-first continuations.
Cost T × K × M continuations; see targeted.py for what it is compared with.
"""

from __future__ import annotations

from gadiag_core.interfaces import EstimationJob, IdealEstimate
from gadiag_core.scoring.vectors import policy, screen_bound
from gadiag_plugins.estimation import UniformOptions
from gadiag_plugins.estimation.common import Budget, ContinuationPool, _node_estimate, _ScreenedEstimator, candidate_tokens, select_nodes


class UniformEstimator(_ScreenedEstimator):
    """Every screened node × every candidate × `continuations` forced rollouts."""

    name = "uniform"
    description = "naive baseline: every screened node x every candidate x M forced-first continuations"

    options_class = UniformOptions

    def __init__(self, rollouts_total: int | None = None, **options):
        """Options: UniformOptions. Budgets (the same options as `targeted`, hard in the same worst-case
        sense): nodes are kept, most uncertain first, while all their
        continuations fit; a node that does not fit is dropped whole."""
        self._set_options(options, rollouts_total)

    def steps(self, job: EstimationJob):
        """Request generator (see common.drive): one batch, every continuation at once."""
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
        yield from pool.run(plans)
        estimates = []
        for t, cands in plan_nodes:
            stats = [pool.stats(pool.q_samples(t, k)) for k in cands]
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
