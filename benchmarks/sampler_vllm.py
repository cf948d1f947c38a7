"""The `vllm` sampler against the `prefix` sampler, on one workload, in one run.

The workload is benchmarks/sampler.py's (the estimator's): P chat prompts x C
forced candidate first tokens x M continuations, up to N new tokens, plain
temperature sampling; both samplers get the same requests (same seeds; the
two draw from different random streams, so their tokens differ). The two
take turns --repeats times and the median run of each is shown.

Reported: vLLM's start-up (`LLM(...)`, the first call: import not included),
and per sampler tokens/s per wall second and per CPU second. vLLM decodes in
two processes of its own (EngineCore, Worker), so its CPU seconds are those
of this process and all its children (psutil); the prefix sampler runs in
this process. vLLM's worker binds its OpenMP threads to the cores of
VLLM_CPU_OMP_THREADS_BIND (default: all of them); --threads sets the prefix
sampler's torch threads and, unless that variable is set, vLLM's binding to
as many cores (0..threads-1).

Needs vllm (run it in the vllm environment, README "Past one machine"):

    python benchmarks/sampler_vllm.py --threads 1                  # ~2 minutes
    python benchmarks/sampler_vllm.py --threads 2 --repeats 2      # ~6 minutes on 2 busy cores

Figures in README "Past one machine".
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sampler import build_workload, count_tokens, load_average  # noqa: E402


def cpu_seconds_with_children() -> float:
    """CPU seconds of this process and every live descendant (vLLM's engine
    and worker processes stay alive between calls)."""
    import psutil

    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.Error:
            pass
    return total


def timed(sample, lm, requests, temperature) -> tuple[int, float, float]:
    """(tokens, wall s, cpu s with children) of one sampler call."""
    wall, cpu = time.perf_counter(), cpu_seconds_with_children()
    outputs = sample(lm, requests, temperature)
    wall, cpu = time.perf_counter() - wall, cpu_seconds_with_children() - cpu
    return count_tokens(outputs, set(lm.eos_token_ids)), wall, cpu


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--threads", type=int, default=2, help="prefix sampler torch threads and vLLM's bound cores (default 2)")
    parser.add_argument("--prefixes", type=int, default=8)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--continuations", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each sampler, taking turns; the median is shown")
    parser.add_argument("--block-size", type=int, default=None, help="vLLM KV block size (default: vLLM's, 128 on CPU)")
    args = parser.parse_args(argv)

    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0" if args.threads == 1 else f"0-{args.threads - 1}")
    import torch

    torch.set_num_threads(args.threads)
    from gadiag_plugins.sampling import vllm as vllm_module
    from gadiag_plugins.sampling.prefix import PrefixSampler
    from gadiag_plugins.sampling.vllm import VllmSampler
    from gadiag_plugins.students.hf import load_lm

    load_before = load_average()
    lm = load_lm(args.model)
    groups, requests = build_workload(lm, args.prefixes, args.candidates, args.continuations, args.new_tokens, args.seed)
    prompt_lengths = [len(ids) for ids, _ in groups]

    vllm_sampler = VllmSampler(block_size=args.block_size)
    with_import = time.perf_counter()
    vllm_module.import_vllm()
    imported = time.perf_counter() - with_import
    warm = requests[:1]
    vllm_sampler.sample(lm, warm, args.temperature)  # starts the engine
    startup = vllm_module.last_startup_seconds
    prefix_sampler = PrefixSampler(threads=args.threads)
    prefix_sampler.sample(lm, warm, args.temperature)  # one-off weight preparation

    methods = [("prefix", prefix_sampler.sample), ("vllm", vllm_sampler.sample)]
    runs: dict[str, list] = {name: [] for name, _ in methods}
    for _ in range(args.repeats):
        for name, sample in methods:
            runs[name].append(timed(sample, lm, requests, args.temperature))
    load_after = load_average()

    print(f"model {args.model}, {lm.model.dtype}, threads {args.threads} (VLLM_CPU_OMP_THREADS_BIND={os.environ['VLLM_CPU_OMP_THREADS_BIND']}), temperature {args.temperature}")
    print(
        f"workload {args.prefixes} prefixes (prompts of {min(prompt_lengths)}-{max(prompt_lengths)} tokens) x {args.candidates} forced "
        f"candidates x {args.continuations} continuations x <= {args.new_tokens} tokens = {len(requests)} requests; "
        f"{args.repeats} run(s) each, taking turns, median shown"
    )
    print(f"load average (1/5/15 min) before {load_before}, after {load_after}; {os.cpu_count()} CPUs")
    print(f"vLLM start-up: import {imported:.1f} s, LLM(...) {startup:.1f} s (enforce_eager, block size {args.block_size or 'default'})")
    header = f"{'sampler':<10}{'tokens':>8}{'wall s':>8}{'cpu s':>8}{'tok/s':>8}{'tok/cpu-s':>10}{'x prefix':>10}   all runs tok/s"
    print(header)
    print("-" * len(header))
    base = None
    for name, _ in methods:
        results = sorted(runs[name], key=lambda r: r[0] / r[1])
        tokens, wall, cpu = results[len(results) // 2]
        rate = tokens / wall
        base = base or rate
        every = ", ".join(f"{t / w:.1f}" for t, w, _ in runs[name])
        print(f"{name:<10}{tokens:>8}{wall:>8.1f}{cpu:>8.1f}{rate:>8.1f}{tokens / max(cpu, 1e-9):>10.1f}{rate / base:>10.2f}   {every}")
    print(f"median tok/s over all runs: " + ", ".join(f"{n} {statistics.median(t / w for t, w, _ in runs[n]):.1f}" for n, _ in methods))


if __name__ == "__main__":
    main()
