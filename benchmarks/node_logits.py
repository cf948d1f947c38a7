"""node_logits: the model's own forward against the sampler's hand-written decoder.

    python benchmarks/node_logits.py [--model smollm2-135m-instruct] [--threads 1] [--repeats 10]

A student's and each model teacher's logits at every node of a rollout come
from `HFCausalLM.node_logits(prompt, generated)`: the prompt from its cache,
then one pass over the generated tokens. The workload: 6 teacher-like prompts
(a question with and without a reference solution, chat template) × a
48-token answer, each pass timed --repeats times, alternating the two ways
in one process (prompt caches warm in both). Printed: seconds per call for
each way, their ratio, and the largest |Δlogit| between them.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

QUESTIONS = [
    "What is 17 times 23?",
    "Solve for x: 3x + 5 = 20.",
    "A train travels 60 km in 45 minutes. What is its speed in km/h?",
]
SOLUTION = "Reference solution: work it out step by step, then give the number."


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from gadiag_plugins.students.hf import load_lm

    lm = load_lm(args.model)
    prompts = [lm.encode_messages([{"role": "user", "content": q + extra}]) for q in QUESTIONS for extra in ("", " " + SOLUTION)]
    answer = lm.model.generate(torch.tensor([prompts[0]]), max_new_tokens=48, min_new_tokens=48, do_sample=False)[0, len(prompts[0]) :].tolist()
    print(f"load average {'/'.join(f'{x:.2f}' for x in os.getloadavg())}; threads {args.threads}; "
          f"{len(prompts)} prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens × {len(answer)} generated")

    decoder = lm._decoder()
    if decoder is None:
        print(f"{args.model}: no hand-written decoder for this architecture; node_logits uses the model's forward")
        return 0

    def forward_way():
        lm._arch = False  # the model's own forward
        try:
            return [lm.node_logits(q, answer) for q in prompts]
        finally:
            lm._arch = decoder

    def decoder_way():
        return [lm.node_logits(q, answer) for q in prompts]

    ways = {"forward": forward_way, "decoder": decoder_way}
    outputs = {name: way() for name, way in ways.items()}  # warm: prompt caches, packing
    seconds = {name: 0.0 for name in ways}
    for _ in range(args.repeats):
        for name, way in ways.items():
            start = time.perf_counter()
            way()
            seconds[name] += time.perf_counter() - start
    calls = args.repeats * len(prompts)
    diff = max(float((a - b).abs().max()) for a, b in zip(outputs["forward"], outputs["decoder"]))
    for name in ways:
        print(f"{name:8s} {1000 * seconds[name] / calls:7.1f} ms per call")
    print(f"decoder speed-up {seconds['forward'] / seconds['decoder']:.2f}x; largest |Δlogit| {diff:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
