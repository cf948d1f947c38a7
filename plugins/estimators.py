"""Built-in ideal-gradient estimators (DESIGN §2).

`targeted`: screen nodes with the bound 2(1 − π_max)/τ, target the nodes where
the student is least certain (at most `max_nodes`), and at each one estimate
Q(u_t, k) for a candidate set — the student's top tokens up to
`mass_threshold` (at most `max_candidates`), each teacher's preferred token and
the sampled token — from `continuations` rollouts that start with k. Tokens
outside the set are value-neutral (Q = V), which keeps a* summing to zero.
"""

from __future__ import annotations

import torch

from gadiag_core import hookimpl
from gadiag_core.interfaces import (
    ContinuationRequest,
    EstimationJob,
    GradientEstimator,
    IdealEstimate,
    NodeEstimate,
)
from gadiag_core.seeding import derive_seed
from gadiag_core.vectors import ideal_vector_on_candidates, policy, screen_bound


def candidate_tokens(probs_t: torch.Tensor, mass_threshold: float, max_candidates: int, extra: list[int]) -> list[int]:
    """Student top tokens until their mass reaches `mass_threshold` (at least
    two, at most `max_candidates`), then the `extra` tokens (teachers' picks,
    the sampled token). One candidate alone would always give a* = 0: under the
    value-neutral rule its Q̂ is V̂."""
    top_probs, top_ids = probs_t.topk(max(2, max_candidates))
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


class TargetedEstimator(GradientEstimator):
    name = "targeted"
    description = "screened nodes x candidate tokens x M forced-first continuations"

    def __init__(
        self,
        screen_epsilon: float = 0.05,
        mass_threshold: float = 0.9,
        max_candidates: int = 4,
        continuations: int = 4,
        max_nodes: int | None = 8,
    ):
        if not 0 <= screen_epsilon < 1:
            raise ValueError("screen_epsilon must be in [0, 1)")
        if continuations < 2:
            raise ValueError("continuations must be >= 2 (two halves for the noise estimate)")
        self.screen_epsilon = screen_epsilon
        self.mass_threshold = mass_threshold
        self.max_candidates = max_candidates
        self.continuations = continuations
        self.max_nodes = max_nodes

    def estimate(self, job: EstimationJob) -> IdealEstimate:
        tau = job.student.temperature
        probs = policy(job.student_logits.float(), tau)  # [T, V]
        bound = screen_bound(probs, tau)  # [T]
        nodes = select_nodes(probs, self.screen_epsilon, self.max_nodes)

        # One request per (node, candidate, sample); all sampled in one call so
        # the sampler can batch across nodes and candidates.
        plan: list[tuple[int, list[int]]] = []
        requests: list[ContinuationRequest] = []
        for t in nodes:
            extra = [int(pref[t]) for pref in job.teacher_preferred.values()] + [job.generated_ids[t]]
            cands = candidate_tokens(probs[t], self.mass_threshold, self.max_candidates, extra)
            plan.append((t, cands))
            prefix = tuple(job.prompt_ids + job.generated_ids[:t])
            for k in cands:
                for m in range(self.continuations):
                    requests.append(
                        ContinuationRequest(
                            prefix_ids=prefix,
                            max_new_tokens=job.max_new_tokens - t,
                            forced_first=k,
                            seed=derive_seed(job.seed, "continuation", t, k, m),
                        )
                    )
        continuations = job.sampler.sample(job.student, requests, tau) if requests else []

        # Rewards, in request order: node-major, then candidate, then sample.
        rewards = iter(
            float(job.verify(job.student.decode(list(req.prefix_ids[len(job.prompt_ids):]) + cont)))
            for req, cont in zip(requests, continuations)
        )
        estimates = []
        M = self.continuations
        for t, cands in plan:
            r = torch.tensor([[next(rewards) for _ in range(M)] for _ in cands])  # [C, M]
            halves = torch.stack([r[:, 0::2].mean(-1), r[:, 1::2].mean(-1)])  # [2, C]
            cand = torch.tensor(cands)
            cand_probs = probs[t, cand]
            q_hat = r.mean(-1)
            ideal, value = ideal_vector_on_candidates(cand_probs, q_hat, tau)
            ideal_h, _ = ideal_vector_on_candidates(cand_probs.expand(2, -1), halves, tau)
            estimates.append(
                NodeEstimate(
                    node=t,
                    candidates=cand,
                    probs=cand_probs,
                    q_hat=q_hat,
                    q_halves=halves,
                    counts=torch.full((len(cands),), M),
                    value=float(value),
                    covered_mass=float(cand_probs.sum()),
                    ideal=ideal,
                    ideal_halves=ideal_h,
                )
            )
        budget = {
            "continuations": len(requests),
            "sampled_tokens": sum(len(c) for c in continuations),
            "nodes_screened": int(probs.shape[0]),
            "nodes_eligible": int((1.0 - probs.max(-1).values >= self.screen_epsilon).sum()),
            "nodes_targeted": len(nodes),
        }
        return IdealEstimate(nodes=estimates, screen_bound=bound, budget=budget)


@hookimpl
def register_estimators(register):
    register("targeted", TargetedEstimator, TargetedEstimator.description)
