"""Rollout-sampler benchmark: the `prefix` sampler, the `batched` sampler and
Hugging Face `generate` on one continuation workload, plus the matmul roofline.

The workload is the estimator's: P prefixes (chat prompts of short word problems) ×
C candidate first tokens (the student's top tokens there, forced) × M
continuations each, up to N new tokens (the forced one included), plain
temperature sampling. Every method runs in this one process on the same torch
thread count.

Each rate is given per wall second and per CPU second of this process
(`time.process_time`). On a machine shared with other busy processes the
wall rates depend on how much of a core each method happened to get; the CPU
rates leave that out (with one torch thread, a CPU second is a second on a
core), so compare methods, and the roofline, by the CPU columns there.

`generate` and `batched` are slow, so by default they run on the first
--subset prefixes only (the per-call shapes are those of the full workload:
one `generate` call per prefix with the C candidate inputs × M returned
sequences; `batched` rows in batches of 32); `prefix` runs on the full
workload and, for a like-for-like row, on the same subset. --full runs
everything on the full workload.

Tokens/s counts generated tokens up to and including EOS (forced ones
included). GFLOP/s is tokens × 2 × (weights of every Linear layer, the output
head included) / seconds, leaving out attention scores: decode matmul work
only. The roofline is the best fp32 GEMM rate measured here on the same
thread count (model-shaped and square products, the best of several tries,
before and after the samplers), per wall and per CPU second.

    python benchmarks/sampler.py --threads 1      # about 3 minutes on one busy core
    python benchmarks/sampler.py --threads 2 --full --repeats 3   # about 8 minutes
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def load_average() -> str:
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


class Clock:
    """Wall and process-CPU seconds of a block (CPU time leaves out the time
    other processes hold the cores; with one torch thread it is time on a core)."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


def gemm_roofline(hidden: int, inner: int, vocab: int, repeats: int = 5) -> tuple[float, float]:
    """Best measured fp32 GEMM rate over model-shaped and square products, as
    (GFLOP per wall second, GFLOP per CPU second)."""
    shapes = [(256, hidden, inner), (256, inner, hidden), (128, hidden, vocab), (1024, 1024, 1024)]
    best_wall = best_cpu = 0.0
    for m, k, n in shapes:
        a = torch.randn(m, k)
        b = torch.randn(k, n)
        a @ b  # warm-up
        for _ in range(repeats):
            with Clock() as clock:
                a @ b
            best_wall = max(best_wall, 2 * m * k * n / clock.wall / 1e9)
            best_cpu = max(best_cpu, 2 * m * k * n / max(clock.cpu, 1e-9) / 1e9)
    return best_wall, best_cpu


def linear_flops_per_token(model) -> int:
    """2 × the weights of every Linear layer (output head included, counted once)."""
    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            total += module.weight.numel()
    return 2 * total


# Fixed questions (not the `math` task's, so that edits to the task do not move the benchmark).
QUESTIONS = [
    "A baker makes 24 rolls in the morning and 17 in the afternoon. He sells 29. How many rolls are left?",
    "What is 13 times 7, minus 18?",
    "Tom has 3 boxes with 12 pencils each. He gives away 9 pencils. How many pencils does he have now?",
    "A train travels 45 km every hour. How far does it travel in 6 hours?",
    "What is the sum of all whole numbers from 1 to 12?",
    "Sara reads 14 pages a day. How many pages has she read after 9 days?",
    "A rectangle is 8 cm wide and 15 cm long. What is its area in square centimetres?",
    "What is 256 divided by 8, plus 17?",
]
INSTRUCTION = "Solve the problem step by step, briefly. End with 'The answer is N.' where N is a number.\n\nProblem: "


def build_workload(lm, prefixes: int, candidates: int, continuations: int, new_tokens: int, seed: int):
    """(prefix ids, candidate ids) per prefix and the ContinuationRequests, prefix-major."""
    from gadiag_core.interfaces import ContinuationRequest

    groups = []
    for p in range(prefixes):
        question = QUESTIONS[p % len(QUESTIONS)] + ("" if p < len(QUESTIONS) else f" (variant {p // len(QUESTIONS)})")
        ids = lm.encode_messages([{"role": "user", "content": INSTRUCTION + question}])
        with torch.inference_mode():
            logits = lm.model(input_ids=torch.tensor([ids]), logits_to_keep=1).logits[0, -1]
        cands = logits.topk(candidates).indices.tolist()
        groups.append((ids, cands))
    requests = []
    for p, (ids, cands) in enumerate(groups):
        for c, k in enumerate(cands):
            for m in range(continuations):
                requests.append(ContinuationRequest(tuple(ids), new_tokens, int(k), seed=seed * 1_000_003 + (p * candidates + c) * continuations + m))
    return groups, requests


def count_tokens(outputs, eos: set[int]) -> int:
    total = 0
    for out in outputs:
        n = len(out)
        for i, t in enumerate(out):
            if t in eos:
                n = i + 1
                break
        total += n
    return total


def run_generate(lm, groups, continuations: int, new_tokens: int, temperature: float) -> tuple[int, float]:
    """One `generate` call per prefix: its C forced-candidate inputs (same
    length, no padding) × M returned sequences, plain temperature sampling."""
    eos = set(lm.eos_token_ids)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.eos_token_ids[0]
    tokens, wall, cpu = 0, 0.0, 0.0
    for p, (ids, cands) in enumerate(groups):
        inputs = torch.tensor([ids + [k] for k in cands])
        torch.manual_seed(p)
        with Clock() as clock, torch.inference_mode():
            out = lm.model.generate(
                input_ids=inputs,
                attention_mask=torch.ones_like(inputs),
                do_sample=True,
                temperature=temperature,
                top_k=0,
                top_p=1.0,
                num_return_sequences=continuations,
                max_new_tokens=new_tokens - 1,
                eos_token_id=sorted(eos),
                pad_token_id=pad,
            )
        wall, cpu = wall + clock.wall, cpu + clock.cpu
        # The forced token counts as a generated position, as for the samplers.
        tokens += count_tokens([row[len(ids) :] for row in out.tolist()], eos)
    return tokens, wall, cpu


# (requests, rows per decoding step) of every prefix-sampler run: the batch it
# actually decoded, to set against a pipeline's `mean_rows_per_step`.
ROWS_PER_STEP: list[tuple[int, float]] = []


def run_sampler(sampler, lm, requests, temperature: float) -> tuple[int, float, float]:
    with Clock() as clock:
        outputs = sampler.sample(lm, requests, temperature)
    if getattr(sampler, "decode_steps", 0):
        ROWS_PER_STEP.append((len(requests), sampler.decoded_rows / sampler.decode_steps))
    return count_tokens(outputs, set(lm.eos_token_ids)), clock.wall, clock.cpu


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for everything (default 1)")
    parser.add_argument("--prefixes", type=int, default=8)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--continuations", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=128, help="prefix sampler batch size")
    parser.add_argument("--subset", type=int, default=2, help="prefixes that generate and batched run on")
    parser.add_argument("--full", action="store_true", help="run generate and batched on the full workload too")
    parser.add_argument("--skip-generate", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each method, taking turns; the median run is shown")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    from gadiag_plugins.students.hf import load_lm
    from gadiag_plugins.sampling.batched import BatchedSampler
    from gadiag_plugins.sampling.prefix import PrefixSampler

    load_before = load_average()
    lm = load_lm(args.model)
    config = lm.model.config
    flops = linear_flops_per_token(lm.model)
    groups, requests = build_workload(lm, args.prefixes, args.candidates, args.continuations, args.new_tokens, args.seed)
    subset = len(groups) if args.full else min(args.subset, len(groups))
    per_prefix = args.candidates * args.continuations
    sub_groups, sub_requests = groups[:subset], requests[: subset * per_prefix]
    prompt_lengths = [len(ids) for ids, _ in groups]

    roof_before = gemm_roofline(config.hidden_size, config.intermediate_size, config.vocab_size)

    # One-off per model: fused and (on CPU, fp32) oneDNN-packed weights, kept with the model.
    from gadiag_plugins.sampling.llama_decoder import _Arch

    arch = _Arch.of(lm.model)
    with Clock() as packing:
        if arch is not None:
            arch.prepare(lm.model)
    # Warm-up: first calls pay one-off costs.
    warm = requests[:1]
    PrefixSampler(threads=args.threads).sample(lm, warm, args.temperature)
    BatchedSampler().sample(lm, warm, args.temperature)

    # Each method runs --repeats times, the methods taking turns, and the
    # table keeps each method's median run (by tokens/s): the host's speed
    # drifts by several percent over minutes, and taking turns lets every
    # method see the same drift.
    methods = []
    if not args.skip_generate:
        run_generate(lm, groups[:1], 1, 4, args.temperature)  # warm-up
        methods.append(("generate", len(sub_requests), lambda: run_generate(lm, sub_groups, args.continuations, args.new_tokens, args.temperature)))
    methods.append(("batched (32)", len(sub_requests), lambda: run_sampler(BatchedSampler(batch_size=32), lm, sub_requests, args.temperature)))
    if subset < len(groups):
        methods.append((f"prefix ({args.batch_size})", len(sub_requests), lambda: run_sampler(PrefixSampler(batch_size=args.batch_size, threads=args.threads), lm, sub_requests, args.temperature)))
    methods.append((f"prefix ({args.batch_size})", len(requests), lambda: run_sampler(PrefixSampler(batch_size=args.batch_size, threads=args.threads), lm, requests, args.temperature)))
    runs = [[] for _ in methods]
    for _ in range(args.repeats):
        for i, (_, _, run) in enumerate(methods):
            runs[i].append(run())
    rows = []
    for (name, n, _), results in zip(methods, runs):
        results.sort(key=lambda r: r[0] / r[1])  # (tokens, wall, cpu) by tokens per wall second
        rows.append((name, n, *results[len(results) // 2]))

    roof_after = gemm_roofline(config.hidden_size, config.intermediate_size, config.vocab_size)
    roof_wall = max(roof_before[0], roof_after[0])
    roof_cpu = max(roof_before[1], roof_after[1])
    load_after = load_average()

    print(f"model {args.model}, {flops / 1e9:.3f} GFLOP/token, {lm.model.dtype}, torch threads {torch.get_num_threads()}, temperature {args.temperature}")
    print(
        f"workload {args.prefixes} prefixes (prompts of {min(prompt_lengths)}-{max(prompt_lengths)} tokens) x {args.candidates} forced candidates "
        f"x {args.continuations} continuations x <= {args.new_tokens} tokens; generate and batched on {subset} of the prefixes; "
        f"{args.repeats} run(s) of each method, taking turns, median shown"
    )
    print(f"load average (1/5/15 min) before {load_before}, after {load_after}; {os.cpu_count()} CPUs")
    print(f"prefix sampler one-off weight preparation (not in the table): {packing.wall:.2f} s wall, {packing.cpu:.2f} s cpu")
    print(
        f"matmul roofline {roof_wall:.1f} GFLOP/s wall, {roof_cpu:.1f} GFLOP per CPU-s "
        f"(best GEMM, before: {roof_before[0]:.1f}/{roof_before[1]:.1f}, after: {roof_after[0]:.1f}/{roof_after[1]:.1f})"
    )
    print("wall: per second of elapsed time; cpu: per second this process ran on a core (other load left out)")
    base = rows[0] if not args.skip_generate else None
    header = (
        f"{'method':<14}{'requests':>9}{'tokens':>8}{'wall s':>8}{'cpu s':>8}{'tok/s':>8}{'tok/cpu-s':>10}"
        f"{'GFLOP/s':>9}{'%roof':>7}{'GFLOP/cpu-s':>12}{'%roof':>7}{'x gen wall':>11}{'x gen cpu':>10}"
    )
    print(header)
    print("-" * len(header))
    for name, n, tokens, wall, cpu in rows:
        rate_wall, rate_cpu = tokens / wall, tokens / max(cpu, 1e-9)
        g_wall, g_cpu = rate_wall * flops / 1e9, rate_cpu * flops / 1e9
        if base:
            x_wall = f"{rate_wall / (base[2] / base[3]):.2f}"
            x_cpu = f"{rate_cpu / (base[2] / max(base[4], 1e-9)):.2f}"
        else:
            x_wall = x_cpu = "-"
        print(
            f"{name:<14}{n:>9}{tokens:>8}{wall:>8.1f}{cpu:>8.1f}{rate_wall:>8.1f}{rate_cpu:>10.1f}"
            f"{g_wall:>9.1f}{100 * g_wall / roof_wall:>6.1f}%{g_cpu:>12.1f}{100 * g_cpu / roof_cpu:>6.1f}%{x_wall:>11}{x_cpu:>10}"
        )
    seen = sorted(set((n, round(r, 1)) for n, r in ROWS_PER_STEP))
    if seen:
        print("prefix sampler rows per decoding step: " + ", ".join(f"{r} at {n} requests" for n, r in seen))

if __name__ == "__main__":
    main()
