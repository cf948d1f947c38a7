"""How much a sampler's logits move with the batching, and what it does to draws.

    python benchmarks/draw_stability.py [--model smollm2-135m-instruct] [--repeats 20]

The workload: 4 chat prompts, each with its greedy 40-token answer cut at 3
points (12 prefixes), 4 continuations of each (48 requests, 30 new tokens).
The `prefix` sampler runs them all in one call and then one request per call;
every logits row the decoding loop draws from is recorded under the row's
(seed, step), and the rows both runs reached are compared:

1. logit rounding: max and median |Δlogit| per row;
2. inverse-CDF draws (the samplers' rule before Gumbel-max): the largest
   shift of a CDF edge, and the share of draws (fresh uniforms, --repeats per
   row) whose uniform lies within 1e-4 of an edge of its token's interval;
3. Gumbel-max draws (draw.py; fresh noise, --repeats per row): how many
   draws the two runs' logits decide differently with no redraw, and the
   share of gaps under 1e-3 (the default redraw margin: the draws redone
   batch-free, canonical.py) and under 3e-3;
4. with redraws on (the default), whether the two runs' continuations agree,
   and how many draws each run redid.

The figures quoted in plugins/sampling/draw.py and canonical.py come from
this script (one thread).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from gadiag_core.interfaces import ContinuationRequest

PROMPTS = [
    "What is 17 times 23? Think step by step.",
    "Solve for x: 3x + 5 = 20.",
    "A train travels 60 km in 45 minutes. What is its speed in km/h?",
    "What is the sum of the first 10 odd numbers?",
]


def workload(lm) -> list[ContinuationRequest]:
    requests = []
    for q, text in enumerate(PROMPTS):
        ids = lm.encode_messages([{"role": "user", "content": text}])
        answer = lm.model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False)[0].tolist()
        for cut in (5, 20, 35):
            for c in range(4):
                requests.append(ContinuationRequest(tuple(answer[: len(ids) + cut]), 30, None, seed=1000 * q + 10 * cut + c))
    return requests


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--repeats", type=int, default=20, help="fresh uniforms / noise per recorded row")
    args = p.parse_args()
    torch.set_num_threads(1)
    from gadiag_plugins.sampling.prefix import PrefixSampler
    from gadiag_plugins.students.hf import load_lm

    lm = load_lm(args.model)
    requests = workload(lm)
    print(f"load average: {'/'.join(f'{x:.2f}' for x in os.getloadavg())}; {len(requests)} requests")

    # Every logits row the decoding loop draws from, per (request seed, step).
    seen: dict[str, dict] = {}
    outputs = {}
    for tag, batches in (("together", [requests]), ("alone", [[r] for r in requests])):
        table = seen.setdefault(tag, {})
        steps: dict[int, int] = {}

        def record(seeds, logits, _table=table, _steps=steps):
            for b, seed in enumerate(seeds):
                _steps[seed] = _steps.get(seed, -1) + 1
                _table[(seed, _steps[seed])] = logits[b].clone()

        sampler = PrefixSampler(threads=1)
        sampler.on_draw = record
        start = time.perf_counter()
        outs = [out for batch in batches for out in sampler.sample(lm, batch, 1.0)]
        outputs[tag] = (outs, sampler.redraw.count, time.perf_counter() - start)

    a, b = seen["together"], seen["alone"]
    keys = [k for k in a if k in b]
    dlogit = torch.stack([(a[k] - b[k]).abs().max() for k in keys])
    print(f"rows compared: {len(keys)}")
    print(f"1. |Δlogit| per row: max {dlogit.max():.2e}, median {dlogit.median():.2e}")

    gen = torch.Generator().manual_seed(0)
    edge_shift, near, flips, gaps = [], 0, 0, []
    for k in keys:
        za, zb = a[k].double(), b[k].double()
        ca, cb = torch.softmax(za, -1).cumsum(-1), torch.softmax(zb, -1).cumsum(-1)
        edge_shift.append(float((ca - cb).abs().max()))
        u = torch.rand(args.repeats, generator=gen, dtype=torch.float64)
        ids = torch.searchsorted(ca, u.unsqueeze(-1)).squeeze(-1).clamp(max=len(ca) - 1)
        upper = ca[ids]
        lower = torch.where(ids > 0, ca[(ids - 1).clamp(min=0)], torch.zeros_like(u))
        near += int((torch.minimum(u - lower, upper - u) < 1e-4).sum())
        g = -torch.log(-torch.log(torch.rand((args.repeats, len(za)), generator=gen, dtype=torch.float64)))
        sa, sb = za + g, zb + g
        flips += int((sa.argmax(-1) != sb.argmax(-1)).sum())
        top = sa.topk(2, dim=-1).values
        gaps.append(top[:, 0] - top[:, 1])
    gaps = torch.cat(gaps)
    draws = len(keys) * args.repeats
    edge = torch.tensor(edge_shift)
    print(f"2. inverse CDF: edge shift max {edge.max():.2e}, median {edge.median():.2e}; draws within 1e-4 of an edge {100 * near / draws:.2f}% of {draws}")
    print(f"3. Gumbel-max: draws decided differently without redraws {flips} of {draws}; gaps < 1e-3 {100 * float((gaps < 1e-3).double().mean()):.3f}%, < 3e-3 {100 * float((gaps < 3e-3).double().mean()):.3f}%")
    (ta, ra, sa_), (tb, rb, sb_) = outputs["together"], outputs["alone"]
    same = sum(x == y for x, y in zip(ta, tb))
    print(f"4. with redraws: continuations equal together vs alone {same} of {len(ta)}; redraws {ra} together ({sa_:.1f} s), {rb} alone ({sb_:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
