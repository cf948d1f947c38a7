"""The chain environment: a Markov "chain of thought" whose success
probability is known exactly, by dynamic programming, at any length (exact Q
and a* at horizon 128 … 512, where the toy environment's enumeration cannot go).

    env = ChainEnvironment(horizon=128, problems=8, decisions=6, tolerance=1)
    for r in env.rollouts:
        r.exact_q, r.exact_ideal     # [T, V] exact Q(u_t, k) and a*(u_t)
        r.teacher_logprobs           # "informed", "noisy" -> [T, V]
        env.job(r, seed)             # an EstimationJob for any estimator

Most tokens are near-certain filler (π_max 0.985), a share of the rest are
stylistic choices between equivalent tokens (uncertain, so not screened out,
but harmless: a* ≈ 0), and a fixed number of decisions change the odds: a
problem is solved when enough decisions drew a "good" token (6 or 7). Used by
benchmarks/estimator_cost.py (sections B–C) and tests/test_estimators.py.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass

import torch

from gadiag_core.interfaces import ContinuationRequest, EstimationJob, RolloutSampler
from gadiag_core.scoring.vectors import ideal_vector
from gadiag_core.seeding import derive_seed
from gadiag_tasks.toy_env import ToyRollout

CHAIN_VOCAB = 10
FILLER = (0, 1, 2, 3, 4, 5)
GOOD = (6, 7)
BAD = (8, 9)


class ChainLM:
    """A 'student' whose next-token distribution depends only on the position
    of the problem's chain (kinds: filler, style, decision). Enough of the
    CausalLM surface for the estimators: temperature, eos_token_ids, decode,
    vocab_size. Prompt ids: one id ≥ CHAIN_VOCAB naming the problem."""

    name = "chain"
    temperature = 1.0
    eos_token_ids: list[int] = []
    vocab_size = CHAIN_VOCAB

    def __init__(self):
        self.problems: dict[int, "ChainProblem"] = {}

    def decode(self, ids) -> str:
        return "".join(str(int(i)) for i in ids if int(i) < CHAIN_VOCAB)


@dataclass
class ChainProblem:
    pid: int
    horizon: int
    kinds: list[str]
    probs: torch.Tensor  # [H, V] float64
    cdf: list[list[float]]
    needed: int  # good decisions needed to succeed

    def verify(self, text: str) -> bool:
        return sum(text.count(str(g)) for g in GOOD) >= self.needed


def make_chain_problem(
    pid: int, horizon: int, decisions: int, seed: int, style_share: float = 0.25, tolerance: int = 1, good: tuple = (0.55, 0.9)
) -> ChainProblem:
    rng = random.Random(f"chain-{seed}-{pid}-{horizon}")
    positions = list(range(horizon))
    rng.shuffle(positions)
    decide = set(positions[:decisions])
    rest = positions[decisions:]
    style = set(rest[: int(round(style_share * len(rest)))])
    kinds, rows = [], []
    for t in range(horizon):
        p = torch.zeros(CHAIN_VOCAB, dtype=torch.float64)
        if t in decide:
            kinds.append("decision")
            g = rng.uniform(*good)
            p[6], p[7] = 0.6 * g, 0.4 * g
            p[8], p[9] = 0.7 * (1 - g - 0.02), 0.3 * (1 - g - 0.02)
            for k in FILLER:
                p[k] = 0.02 / len(FILLER)
        elif t in style:
            kinds.append("style")
            a, b, c = rng.sample(FILLER, 3)
            w = sorted([rng.uniform(0.2, 1.0) for _ in range(3)], reverse=True)
            s = sum(w)
            p[:] = 0.01 / (CHAIN_VOCAB - 3)
            p[a], p[b], p[c] = (0.99 * x / s for x in w)
        else:
            kinds.append("filler")
            f = rng.choice(FILLER)
            p[:] = 0.003 / (CHAIN_VOCAB - len(FILLER))
            for k in FILLER:
                p[k] = 0.012 / (len(FILLER) - 1)
            p[f] = 0.985
        rows.append(p / p.sum())
    probs = torch.stack(rows)
    cdf = [list(itertools_accumulate(r.tolist())) for r in probs]
    return ChainProblem(pid, horizon, kinds, probs, cdf, needed=max(1, decisions - tolerance))


def itertools_accumulate(xs):
    total = 0.0
    for x in xs:
        total += x
        yield total


class ChainSampler(RolloutSampler):
    """Exact temperature-1 sampling from ChainLM, one seeded generator per request."""

    name = "chain"

    def __init__(self):
        self.tokens_generated = 0

    def sample(self, lm: ChainLM, requests: list[ContinuationRequest], temperature: float) -> list[list[int]]:
        out = []
        for r in requests:
            problem = lm.problems[r.prefix_ids[0]]
            t = len(r.prefix_ids) - 1
            rng = random.Random(r.seed)
            ids = []
            for step in range(r.max_new_tokens):
                if t >= problem.horizon:
                    break
                if step == 0 and r.forced_first is not None:
                    k = int(r.forced_first)
                    rng.random()
                else:
                    cdf = problem.cdf[t]
                    k = min(bisect.bisect_right(cdf, rng.random() * cdf[-1]), CHAIN_VOCAB - 1)
                ids.append(k)
                t += 1
            out.append(ids)
            self.tokens_generated += len(ids)
        return out


# The chain environment's rollouts carry the toy environment's fields.
ExactRollout = ToyRollout


class ChainEnvironment:
    def __init__(
        self, horizon: int = 128, problems: int = 8, decisions: int = 6, seed: int = 0, tolerance: int = 1, good=(0.55, 0.9), style_share: float = 0.25
    ):
        from gadiag_tasks.toy_env import informed_logprobs

        self.student = ChainLM()
        self.sampler = ChainSampler()
        self.max_new_tokens = horizon
        self.seed = seed
        self.rollouts: list[ExactRollout] = []
        self.teachers = ("informed", "noisy")
        gen = torch.Generator().manual_seed(derive_seed(seed, "chain-teachers", horizon) % 2**62)
        for i in range(problems):
            prob = make_chain_problem(i, horizon, decisions, seed, style_share, tolerance, good)
            pid = CHAIN_VOCAB + i
            self.student.problems[pid] = prob
            # Exact V by dynamic programming over (t, good count).
            good_mask = torch.zeros(CHAIN_VOCAB, dtype=torch.long)
            good_mask[list(GOOD)] = 1
            values = [None] * (horizon + 1)
            values[horizon] = torch.tensor([1.0 if s >= prob.needed else 0.0 for s in range(horizon + 2)], dtype=torch.float64)
            qs = [None] * horizon
            for t in range(horizon - 1, -1, -1):
                nxt = values[t + 1]
                idx = (torch.arange(horizon + 1).unsqueeze(1) + good_mask.unsqueeze(0)).clamp(max=horizon + 1)
                q = nxt[idx]  # [S, V]
                qs[t] = q
                values[t] = torch.cat([(q * prob.probs[t]).sum(-1), nxt[-1:]])
            rollout_rng = random.Random(derive_seed(seed, "chain-rollout", i))
            gen_ids = self.sampler.sample(
                self.student, [ContinuationRequest((pid,), horizon, seed=rollout_rng.getrandbits(62))], 1.0
            )[0]
            s, q_rows = 0, []
            for t, k in enumerate(gen_ids):
                q_rows.append(qs[t][s])
                s += int(good_mask[k])
            q = torch.stack(q_rows)
            probs = prob.probs[: len(gen_ids)]
            r = ExactRollout(
                problem=prob,
                index=0,
                prompt_ids=[pid],
                generated_ids=gen_ids,
                correct=prob.verify(self.student.decode(gen_ids)),
                student_logits=probs.log().float(),
                exact_probs=probs,
                exact_q=q,
                exact_ideal=ideal_vector(probs, q, 1.0),
            )
            r.teacher_logprobs = {
                "informed": informed_logprobs(probs, q, gen),
                "noisy": informed_logprobs(probs, q, gen, beta=0.0, sigma=1.0),
            }
            self.rollouts.append(r)

    def job(self, r: ExactRollout, seed: int) -> EstimationJob:
        prob = r.problem
        return EstimationJob(
            student=self.student,
            sampler=self.sampler,
            prompt_ids=list(r.prompt_ids),
            generated_ids=list(r.generated_ids),
            student_logits=r.student_logits,
            teacher_preferred={name: lp.argmax(-1) for name, lp in r.teacher_logprobs.items()},
            verify=lambda text, _p=prob: _p.verify(text),
            max_new_tokens=self.max_new_tokens,
            seed=derive_seed(self.seed, "chain-estimator", prob.pid, seed),
        )
