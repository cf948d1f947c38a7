"""The `batched` sampler with and without shared prefixes, on one process.

The workload is the estimator's on a plain-prompt student (by default
Gemma-3-270M on the math task, three worked examples): per question, one
sampled rollout (up to --new-tokens tokens), then at each of --nodes nodes of
it (prompt + generated[:t], evenly spread) the student's top --candidates
tokens forced × --continuations continuations, up to --new-tokens - t new
tokens each. The same requests go to the sampler as it was ("before": every
prefix encoded whole, finished rows kept in the decoding batch), with shared
starts encoded once ("shared") and as it is ("after": shared starts, finished
rows dropped), taking turns --repeats times; the load average is printed
before and after, and the rows whose continuations differ (float rounding
moving a draw) are counted.

    OMP_NUM_THREADS=1 python benchmarks/batched_sharing.py --threads 1
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sampler import load_average  # noqa: E402  (benchmarks/sampler.py)


def build_requests(lm, task, questions: int, nodes: int, candidates: int, continuations: int, new_tokens: int, seed: int):
    from gadiag_core.interfaces import ContinuationRequest
    from gadiag_plugins.sampling.batched import BatchedSampler

    prompts = [lm.encode_messages(task.student_messages(p)) for p in task.problems(questions, seed)]
    rollouts = BatchedSampler().sample(lm, [ContinuationRequest(tuple(ids), new_tokens, None, seed=seed + q) for q, ids in enumerate(prompts)], 1.0)
    requests = []
    for q, (ids, rollout) in enumerate(zip(prompts, rollouts)):
        for k in range(nodes):
            t = k * len(rollout) // nodes
            prefix = ids + rollout[:t]
            with torch.inference_mode():
                logits = lm.model(input_ids=torch.tensor([prefix]), logits_to_keep=1).logits[0, -1]
            for c, token in enumerate(logits.topk(candidates).indices.tolist()):
                for m in range(continuations):
                    requests.append(ContinuationRequest(tuple(prefix), new_tokens - t, int(token), seed=((seed * 100 + q) * 100 + k) * 1000 + c * 100 + m))
    return prompts, requests


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--task", default="math")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--questions", type=int, default=2)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--continuations", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=128, help="rows per batch (default: the prefix sampler's, which hands Gemma to this one)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    from gadiag_core.interfaces import RunContext
    from gadiag_core.registry import load_registry
    from gadiag_plugins.sampling.batched import BatchedSampler
    from gadiag_plugins.students.hf import load_lm

    load_before = load_average()
    lm = load_lm(args.model)
    # The task as a run builds it for this student (plain prompts: three worked examples).
    task = load_registry().create("task", args.task, run=RunContext(student=lm))
    prompts, requests = build_requests(lm, task, args.questions, args.nodes, args.candidates, args.continuations, args.new_tokens, args.seed)
    BatchedSampler().sample(lm, requests[:1], 1.0)  # warm-up

    samplers = {
        "before": lambda: BatchedSampler(batch_size=args.batch_size, share_prefix=False, drop_done=False),
        "shared": lambda: BatchedSampler(batch_size=args.batch_size, drop_done=False),
        "after": lambda: BatchedSampler(batch_size=args.batch_size),
    }
    times = {name: [] for name in samplers}
    outputs, encoded = {}, {}
    for _ in range(args.repeats):
        for name, make in samplers.items():
            sampler = make()
            start = time.perf_counter()
            outputs[name] = sampler.sample(lm, requests, 1.0)
            times[name].append(time.perf_counter() - start)
            encoded[name] = sampler.prefix_tokens_encoded
    load_after = load_average()
    tokens = sum(map(len, outputs["after"]))
    differ = {name: sum(a != b for a, b in zip(out, outputs["before"])) for name, out in outputs.items() if name != "before"}
    median = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    print(f"model {args.model} ({lm.prompt_format} prompts), task {args.task}, torch threads {torch.get_num_threads()}, batch size {args.batch_size}")
    print(
        f"workload {args.questions} questions (prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens) x {args.nodes} nodes "
        f"x {args.candidates} forced candidates x {args.continuations} continuations = {len(requests)} requests, <= {args.new_tokens} new tokens; "
        f"{tokens} tokens sampled; {args.repeats} run(s) each, taking turns, median shown"
    )
    print(f"load average (1/5/15 min) before {load_before}, after {load_after}; {os.cpu_count()} CPUs")
    for name in samplers:
        change = f"  {median['before'] / median[name]:.2f}x, rows differing from before: {differ[name]} of {len(requests)}" if name != "before" else ""
        print(f"{name:<7} {median[name]:8.1f} s  {tokens / median[name]:6.1f} tokens/s  prefix tokens encoded {encoded[name]:>6}{change}")


if __name__ == "__main__":
    main()
