"""Pipeline throughput: the default job with rollouts diagnosed one after
another (`run.in_flight = 1`, the sequential driver) and with the scheduler
(`run.in_flight = K`: many rollouts in flight, their continuation requests
joining one running decoding batch), in this one process, on the same
configuration and seed.

Printed per way: wall time of the run, sampled tokens, time inside the
sampler, effective sampler tokens/s, sampler calls (session runs) and
requests per call, share of the time outside the sampler, redrawn draws, and
the rows per decoding step (the batch the sampler actually decodes); then the
ratios (sequential / scheduler), whether the records (rollouts, tokens,
questions) are byte-identical, how many rollouts' diagnoses differ, and the
largest move of a headline mean against its interval. Differently batched
matmuls round differently, which could flip a draw whose two best scores are
within ~1e-4; such draws are redone batch-free (plugins/sampling/canonical.py).

    python benchmarks/pipeline.py                       # the README's default job (harness.toml)
    python benchmarks/pipeline.py --questions 2 --threads 1   # a quick look
    python benchmarks/pipeline.py --threads 1 --prompt-cache-off   # also the scheduler without
                                                        # node_logits' prompt cache (first in each set)

Wall time depends on the machine's load: the load average is printed before
and after, and the two ways run back to back (sequential first, then the
scheduler, then --repeats more pairs) so a drift shows in the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECORDS = ("rollouts.jsonl", "tokens.jsonl", "questions.jsonl")


def load_average() -> str:
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def run_once(argv: list[str], run_dir: Path, prompt_cache: bool = True) -> tuple[dict, float, dict, dict]:
    from rich.console import Console

    from gadiag_core.commands.run import resolve_config
    from gadiag_core.engine.pipeline import run
    from gadiag_plugins.students import hf

    entries = hf.PROMPT_CACHE_ENTRIES
    hf.PROMPT_CACHE_ENTRIES = entries if prompt_cache else 0

    config, registry = resolve_config(argv + ["--run-dir", str(run_dir)])
    start = time.perf_counter()
    try:
        with open(os.devnull, "w") as quiet:
            _, summary = run(config, registry, Console(file=quiet, stderr=False))
    finally:
        hf.PROMPT_CACHE_ENTRIES = entries
    wall = time.perf_counter() - start
    return summary["throughput"], wall, {name: (run_dir / name).read_bytes() for name in RECORDS}, summary["rows"]


def compare(seq: tuple, sched: tuple) -> str:
    """How far apart the two ways' records are: rollouts whose diagnosis differs
    (float rounding of differently batched matmuls can flip a sampled token),
    and the largest change of a headline mean against its interval."""
    a = seq[4]["questions.jsonl"].decode().splitlines()
    b = sched[4]["questions.jsonl"].decode().splitlines()
    differ = sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b))
    worst = ""
    rows_a, rows_b = seq[5], sched[5]
    moves = []
    for row, ra in rows_a.items():
        rb = rows_b.get(row, {})
        ma, mb, ci = ra.get("mean_all"), rb.get("mean_all"), ra.get("ci_all") or [None, None]
        if None in (ma, mb) or None in ci:
            continue
        half = (ci[1] - ci[0]) / 2
        moves.append((abs(mb - ma) / half if half > 0 else float("inf"), row, mb - ma, half))
    if moves:
        ratio, row, delta, half = max(moves)
        worst = f"; largest headline move {row} {delta:+.3f} against a ±{half:.3f} interval ({ratio:.2f} of its half-width)"
    return f"rollouts whose diagnosis differs: {differ} of {len(a)}{worst}"


def sampler_reference(config_path: str, threads: int, rows_per_step: float, repeats: int = 2) -> str:
    """benchmarks/sampler.py's prefix-sampler workload, run here in this
    process after the pipelines (same load, same threads): 2 to 6 prefixes
    (32, 48, 64, 80 and 96 requests, which decode ~26, ~41, ~56, ~70 and ~83
    rows per step), the best of `repeats` runs each, and its rate interpolated
    (linearly in rows per step) at the pipeline's own rows per step. Returns
    (a line for the table, that rate)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch
    from sampler import build_workload, run_sampler

    from gadiag_core.config import load_toml
    from gadiag_plugins.sampling.prefix import PrefixSampler
    from gadiag_plugins.students.hf import load_lm

    student = load_toml(config_path).get("student", {})
    new_tokens, temperature = student.get("max_new_tokens", 64), student.get("temperature", 1.0)
    if threads:
        torch.set_num_threads(threads)
    lm = load_lm(student.get("model", "smollm2-135m-instruct"))
    points = []
    for prefixes in (2, 3, 4, 5, 6):
        _, requests = build_workload(lm, prefixes, 4, 4, new_tokens, 0)
        best = None
        for _ in range(repeats):
            sampler = PrefixSampler(batch_size=128, threads=threads or torch.get_num_threads())
            tokens, wall, _ = run_sampler(sampler, lm, requests, temperature)
            rate = (sampler.decoded_rows / sampler.decode_steps, tokens / wall)
            best = rate if best is None or rate[1] > best[1] else best
        points.append(best)
    # Linear between the two points around rows_per_step (beyond them: the nearest two).
    i = next((j for j in range(len(points) - 2) if rows_per_step <= points[j + 1][0]), len(points) - 2)
    (r0, v0), (r1, v1) = points[i], points[i + 1]
    at = v0 + (v1 - v0) * (rows_per_step - r0) / (r1 - r0) if r1 != r0 else v0
    seen = ", ".join(f"{v:.0f} tok/s at {r:.1f} rows/step" for r, v in points)
    return f"sampler benchmark in this process (32 to 96 requests): {seen}; at the scheduler's {rows_per_step:.1f} rows/step {at:.0f} tok/s", at


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "harness.toml"))
    p.add_argument("--questions", type=int, help="override run.questions")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    p.add_argument("--in-flight", type=int, help="rollouts in flight for the scheduler (default: run.in_flight's default)")
    p.add_argument("--repeats", type=int, default=0, help="more sequential/scheduler pairs, for the drift")
    p.add_argument("--prompt-cache-off", action="store_true", help="also run the scheduler with node_logits' prompt cache off (first in each set)")
    p.add_argument("--reference-only", type=float, metavar="ROWS", help="only the sampler benchmark, at this many rows per step")
    p.add_argument("--no-reference", action="store_true", help="skip the sampler benchmark at the scheduler's rows per step (run after the pairs)")
    args = p.parse_args()
    if args.in_flight is None:
        from gadiag_core.config import RunOptions

        args.in_flight = RunOptions().in_flight
    base = ["--config", args.config, "--threads", str(args.threads)]
    if args.questions:
        base += ["--questions", str(args.questions)]

    if args.reference_only:
        print(sampler_reference(args.config, args.threads, args.reference_only)[0])
        return 0
    print(f"load average before: {load_average()}  (cores: {os.cpu_count()})")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for pair in range(1 + args.repeats):
            ways = [("sequential", 1, True), (f"scheduler ({args.in_flight})", args.in_flight, True)]
            if args.prompt_cache_off:
                ways.insert(0, ("sched, no cache", args.in_flight, False))
            for label, in_flight, cache in ways:
                stats, wall, records, means = run_once(base + ["--set", f"run.in_flight={in_flight}"], Path(tmp) / f"{pair}-{in_flight}-{cache}", cache)
                rows.append((pair, label, stats, wall, records, means))
                print(f"  pair {pair} {label}: {wall:.1f} s", file=sys.stderr)
    print(f"load average after:  {load_average()}")
    header = f"{'pair':>4}  {'way':<16} {'wall s':>8} {'tokens':>7} {'sampler s':>9} {'tok/s':>7} {'calls':>6} {'batch':>6} {'outside':>8} {'redraws':>7} {'rows/step':>9}"
    print(header)
    for pair, label, s, wall, _, _ in rows:
        print(
            f"{pair:>4}  {label:<16} {wall:8.1f} {s['sampled_tokens']:7d} {s['sampler_seconds']:9.1f} "
            f"{s['tokens_per_second'] or 0:7.0f} {s['sampler_calls']:6d} {s['mean_batch_size'] or 0:6.1f} {100 * (s['share_outside_sampler'] or 0):7.0f}% {s.get('redrawn_draws', 0):7d} {s.get('mean_rows_per_step') or 0:9.1f}"
        )
    for pair in range(1 + args.repeats):
        *uncached, seq, sched = [r for r in rows if r[0] == pair]
        for off in uncached:
            print(f"pair {pair}: prompt cache: wall without/with {off[3] / sched[3]:.2f}×; {compare(off, sched)}")
        print(
            f"pair {pair}: wall ratio sequential/scheduler {seq[3] / sched[3]:.2f}×, "
            f"sampler tokens/s ratio {(sched[2]['tokens_per_second'] or 0) / max(seq[2]['tokens_per_second'] or 1e-9, 1e-9):.2f}×, "
            f"records identical: {json.dumps(seq[4] == sched[4])}"
        )
        print(f"pair {pair}: {compare(seq, sched)}")
    if not args.no_reference:
        sched_stats = [r[2] for r in rows if r[1].startswith("scheduler")]
        rows_per_step = sum(s["mean_rows_per_step"] for s in sched_stats) / len(sched_stats)
        rate = sum(s["tokens_per_second"] for s in sched_stats) / len(sched_stats)
        line, reference = sampler_reference(args.config, args.threads, rows_per_step)
        print(line)
        print(f"scheduler's effective sampler rate {rate:.0f} tok/s = {100 * rate / reference:.0f}% of it (load average now {load_average()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
