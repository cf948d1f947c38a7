"""Run-like records on the exact environment, so that the leaderboard's own
aggregates (gadiag_core.scoring.alignment) can be checked against exact values
(gadiag_core.certify.leaderboard).

`environment_records(env, estimator, vectors, seed)` runs the estimator on every
rollout of the exact environment (gadiag_tasks.toy_env, passed in) and returns
the token and rollout records a pipeline run in the logits space would write
(the fields the aggregates read), and the same records with the exact a* in
place of â, over the same nodes.
"""

from __future__ import annotations

import math

import torch

from gadiag_core.engine.diagnose import node_energy
from gadiag_core.scoring import noise
from gadiag_core.scoring.vectors import cosine

ZERO_NORM = 1e-9  # ‖a*‖ below this is zero up to rounding: no direction


def _pooled(dots: list[float], a_sq: list[float], b_sq: list[float]) -> float:
    return noise.pooled_cosine(torch.tensor(dots), torch.tensor(a_sq), torch.tensor(b_sq)) if dots else math.nan


def environment_records(env, estimator, vectors: dict, seed: int) -> tuple[list, list, list, list, int]:
    """(tokens, rollouts, exact tokens, exact rollouts, sampled tokens) for one
    estimator replicate `seed` over every rollout of `env`.

    vectors: (rollout index, 'teacher/objective') -> b [T, V] (certify.estimators.objective_vectors).
    """
    tau = env.student.temperature
    rows = sorted({row for (_, row) in vectors})
    tokens, rollouts, exact_tokens, exact_rollouts = [], [], [], []
    sampled_tokens = 0
    for ri, rollout in enumerate(env.rollouts):
        estimate = estimator.estimate(env.job(rollout, seed))
        sampled_tokens += int(estimate.budget.get("sampled_tokens", 0))
        base = {"question": rollout.problem.id, "rollout": rollout.index, "correct": rollout.correct}
        parts = {row: {"dot": [], "a_sq": [], "energy": [], "b_sq": [], "dot_x": [], "a_sq_x": []} for row in rows}
        for node in estimate.nodes:
            t = node.node
            cand = node.candidates.long()
            a = torch.zeros(rollout.exact_ideal.shape[-1], dtype=torch.float64)
            a[cand] = node.ideal.double()
            a_exact = rollout.exact_ideal[t].double()
            b = torch.stack([vectors[(ri, row)][t] for row in rows])  # [P, V]
            b_norm = b.norm(dim=-1)
            raw = cosine(a.expand(len(rows), -1), b)
            exact = cosine(a_exact.expand(len(rows), -1), b) if float(a_exact.norm()) > ZERO_NORM else None
            energy = float(node_energy(node, tau))
            record = dict(
                base, node=t, candidate_pi=node.probs.tolist(), q_hat=node.q_hat.tolist(),
                counts=node.counts.clamp(min=0).tolist(), temperature=tau,
                a_sq=float((a * a).sum()), energy=energy,
                cos={row: float(raw[j]) for j, row in enumerate(rows)},
                b_cand={row: (b[j, cand] / b_norm[j].clamp_min(1e-300)).tolist() for j, row in enumerate(rows)},
            )
            tokens.append(record)
            exact_tokens.append(dict(base, node=t, cos={row: (float(exact[j]) if exact is not None else None) for j, row in enumerate(rows)}))
            for j, row in enumerate(rows):
                p = parts[row]
                p["dot"].append(float(a @ b[j]))
                p["a_sq"].append(record["a_sq"])
                p["energy"].append(energy)
                p["b_sq"].append(float(b_norm[j] ** 2))
                p["dot_x"].append(float(a_exact @ b[j]))
                p["a_sq_x"].append(float(a_exact @ a_exact))
        rollouts.append(dict(
            base,
            question_cos={row: _pooled(p["dot"], p["a_sq"], p["b_sq"]) for row, p in parts.items()},
            question_cos_corrected={row: _pooled(p["dot"], p["energy"], p["b_sq"]) for row, p in parts.items()},
        ))
        exact_rollouts.append(dict(base, question_cos={row: _pooled(p["dot_x"], p["a_sq_x"], p["b_sq"]) for row, p in parts.items()}))
    return tokens, rollouts, exact_tokens, exact_rollouts, sampled_tokens
