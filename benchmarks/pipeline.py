"""Pipeline throughput: the default job with rollouts diagnosed one after
another (`run.in_flight = 1`, the sequential driver) and with the scheduler
(`run.in_flight = K`: many rollouts in flight, their continuation requests
joining one running decoding batch), in this one process, on the same
configuration and seed.

Printed per way: wall time of the run, sampled tokens, time inside the
sampler, effective sampler tokens/s, sampler calls (session runs) and
requests per call, share of the time outside the sampler, redrawn draws, the
rows per decoding step (the batch the sampler actually decodes), prefix
tokens read by prefill passes and the seconds of a stream's joins; then the
ratios (sequential / scheduler), whether the records (rollouts, tokens,
questions) are byte-identical, how many rollouts' diagnoses differ, and the
largest move of a headline mean against its interval. Differently batched
matmuls round differently, which could flip a draw whose two best scores are
within ~1e-4; such draws are redone batch-free (plugins/sampling/canonical.py).

Then `benchmarks/sampler.py`'s prefix-sampler workload runs in this process
(32 to 160 requests) as the reference for the scheduler's effective sampler
rate (sampled tokens / seconds inside the sampler, joins and prefills
included), compared two ways:
- on the same batch sizes: every decoding step of the run (summary.json's
  `decode_steps_by_rows`) at the reference's seconds per step for that many
  rows, times the reference's own time outside its steps (its prompts'
  prefill). A run decodes small batches too (its first rollouts' tails, a
  question's last rounds, the end of the run), where a step costs more per
  row; this is the reference for that mix of batch sizes.
- at the mean rows per step: the reference's rate interpolated at the run's
  mean (each reference point is itself a mix of batch sizes, its requests
  finishing one by one).
A line per band of 32 rows gives the run's ms per step against the
reference's. The machine's speed drifts, so the reference runs right before
each scheduler run and once more at the end, and its figures are summed over
those passes.

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


ROWS_BUCKET = 8  # the reference's step costs are averaged over batch sizes 1-8, 9-16, ...
REFERENCE_PREFIXES = (2, 3, 4, 5, 6, 8, 10)  # x 16 requests


def reference_pass(config_path: str, threads: int) -> list[tuple]:
    """One pass of benchmarks/sampler.py's prefix-sampler workload in this
    process (same threads as the pipelines) at 2 to 10 prefixes: 32 to 160
    requests, ~26 to ~115 rows per step on average (every run's batch shrinks
    as its rows finish, so each covers batch sizes from its request count down
    to 1). Returns per request count (decoded rows, decoding steps, tokens,
    wall seconds, the sampler's steps_at_rows, draws redone and their seconds)."""
    if str(ROOT / "benchmarks") not in sys.path:
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
    runs = []
    for prefixes in REFERENCE_PREFIXES:
        _, requests = build_workload(lm, prefixes, 4, 4, new_tokens, 0)
        sampler = PrefixSampler(batch_size=128, threads=threads or torch.get_num_threads())
        tokens, wall, _ = run_sampler(sampler, lm, requests, temperature)
        runs.append((sampler.decoded_rows, sampler.decode_steps, tokens, wall, sampler.steps_at_rows, sampler.redraw.count, sampler.redraw.seconds))
    return runs


def sampler_reference(passes: list[list[tuple]]) -> dict:
    """The reference from passes of `reference_pass` (one right before each
    scheduler run and one at the end, so it brackets the scheduler in time on
    a machine whose speed drifts), each request count's figures summed over
    the passes:

    points:   [(mean rows per step, tokens/s)] per request count, by rows
    buckets:  [(mean rows, seconds per step)] over batch sizes 1-8, 9-16, ...
    overhead: wall time / decoding steps' time (prefill passes for the
              prompts, joins, Python)
    tokens, redraws, redraw_seconds: over all passes"""
    points, steps_at_rows, wall_total, step_total = [], {}, 0.0, 0.0
    for runs in zip(*passes):  # one request count, every pass
        rows, steps, tokens, wall = (sum(run[i] for run in runs) for i in range(4))
        points.append((rows / steps, tokens / wall))
        wall_total += wall
        for run in runs:
            for rows_in_step, (n, seconds) in run[4].items():
                at = steps_at_rows.setdefault((rows_in_step - 1) // ROWS_BUCKET, [0, 0, 0.0])
                at[0], at[1], at[2] = at[0] + n, at[1] + rows_in_step * n, at[2] + seconds
                step_total += seconds
    buckets = [(row_steps / n, seconds / n) for _, (n, row_steps, seconds) in sorted(steps_at_rows.items())]
    every = [run for runs in passes for run in runs]
    return {"points": sorted(points), "buckets": buckets, "overhead": wall_total / step_total,
            "tokens": sum(run[2] for run in every), "redraws": sum(run[5] for run in every), "redraw_seconds": sum(run[6] for run in every)}


def interpolate(points: list[tuple[float, float]], x: float) -> float:
    """Linear between the two points around x (sorted by x; beyond them the nearest two)."""
    if len(points) == 1:
        return points[0][1]
    i = next((j for j in range(len(points) - 2) if x <= points[j + 1][0]), len(points) - 2)
    (x0, y0), (x1, y1) = points[i], points[i + 1]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 != x0 else y0


def matched_reference(reference: dict, stats: dict) -> float:
    """The reference's seconds for a run's own step mix: each of the run's
    decoding steps at the reference's seconds per step for that batch size,
    times the reference's overhead outside its steps. The run's effective
    rate over the reference's rate for the same mix is this over the run's
    sampler seconds."""
    steps = sum(n * interpolate(reference["buckets"], rows) for rows, n, _ in stats["decode_steps_by_rows"])
    return steps * reference["overhead"]


def compare_steps(reference: dict, stats: dict) -> str:
    """Per batch size (in bands of 32 rows): the run's steps, its ms per step
    and the reference's, so a slow band shows."""
    bands: dict[int, list] = {}
    for rows, n, seconds in stats["decode_steps_by_rows"]:
        band = bands.setdefault((rows - 1) // 32, [0, 0.0, 0.0])
        band[0], band[1], band[2] = band[0] + n, band[1] + seconds, band[2] + n * interpolate(reference["buckets"], rows)
    return "; ".join(f"{32 * b + 1}-{32 * b + 32} rows: {n} steps, {1000 * own / n:.0f} vs {1000 * ref / n:.0f} ms" for b, (n, own, ref) in sorted(bands.items()))


def describe(reference: dict) -> str:
    seen = ", ".join(f"{v:.0f} tok/s at {r:.1f} rows/step" for r, v in reference["points"])
    return (f"{seen}; wall / decoding steps {reference['overhead']:.3f}; {reference['redraws']} draws redone in "
            f"{reference['redraw_seconds']:.1f} s over {reference['tokens']} tokens")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "harness.toml"))
    p.add_argument("--questions", type=int, help="override run.questions")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    p.add_argument("--in-flight", type=int, help="rollouts in flight for the scheduler (default: run.in_flight's default)")
    p.add_argument("--repeats", type=int, default=0, help="more sequential/scheduler pairs, for the drift")
    p.add_argument("--prompt-cache-off", action="store_true", help="also run the scheduler with node_logits' prompt cache off (first in each set)")
    p.add_argument("--reference-only", type=float, metavar="ROWS", help="only the sampler benchmark, at this many rows per step")
    p.add_argument("--no-reference", action="store_true", help="skip the sampler benchmark (a pass right before each scheduler run and one at the end)")
    args = p.parse_args()
    if args.in_flight is None:
        from gadiag_core.config import RunOptions

        args.in_flight = RunOptions().in_flight
    base = ["--config", args.config, "--threads", str(args.threads)]
    if args.questions:
        base += ["--questions", str(args.questions)]

    if args.reference_only:
        reference = sampler_reference([reference_pass(args.config, args.threads)])
        print(f"at {args.reference_only:.1f} rows/step: {interpolate(reference['points'], args.reference_only):.0f} tok/s; {describe(reference)}")
        return 0
    print(f"load average before: {load_average()}  (cores: {os.cpu_count()})")
    passes, rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for pair in range(1 + args.repeats):
            ways = [("sequential", 1, True), (f"scheduler ({args.in_flight})", args.in_flight, True)]
            if args.prompt_cache_off:
                ways.insert(0, ("sched, no cache", args.in_flight, False))
            for label, in_flight, cache in ways:
                if label.startswith("scheduler") and not args.no_reference:
                    passes.append(reference_pass(args.config, args.threads))  # right before each scheduler run, and once at the end
                stats, wall, records, means = run_once(base + ["--set", f"run.in_flight={in_flight}"], Path(tmp) / f"{pair}-{in_flight}-{cache}", cache)
                rows.append((pair, label, stats, wall, records, means))
                print(f"  pair {pair} {label}: {wall:.1f} s", file=sys.stderr)
    print(f"load average after:  {load_average()}")
    header = f"{'pair':>4}  {'way':<16} {'wall s':>8} {'tokens':>7} {'sampler s':>9} {'tok/s':>7} {'calls':>6} {'batch':>6} {'outside':>8} {'redraws':>7} {'redraw s':>8} {'rows/step':>9} {'prefill tok':>11} {'join s':>6}"
    print(header)
    for pair, label, s, wall, _, _ in rows:
        print(
            f"{pair:>4}  {label:<16} {wall:8.1f} {s['sampled_tokens']:7d} {s['sampler_seconds']:9.1f} "
            f"{s['tokens_per_second'] or 0:7.0f} {s['sampler_calls']:6d} {s['mean_batch_size'] or 0:6.1f} {100 * (s['share_outside_sampler'] or 0):7.0f}% {s.get('redrawn_draws', 0):7d} {s.get('redraw_seconds', 0):8.1f} {s.get('mean_rows_per_step') or 0:9.1f} {s.get('prefix_tokens_encoded', 0):11d} {s.get('join_seconds', 0):6.1f}"
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
        passes.append(reference_pass(args.config, args.threads))
        reference = sampler_reference(passes)
        print(f"sampler benchmark in this process (32 to 160 requests, before and after the pipelines): {describe(reference)}")
        for pair, label, stats, *_ in rows:
            if not label.startswith("scheduler"):
                continue
            at_mean = interpolate(reference["points"], stats["mean_rows_per_step"])
            matched = stats["sampled_tokens"] / matched_reference(reference, stats)
            rate = stats["tokens_per_second"]
            print(f"pair {pair} {label}: effective sampler rate {rate:.0f} tok/s = {100 * rate / matched:.0f}% of the reference's "
                  f"{matched:.0f} tok/s on the same batch sizes (its {stats['decode_steps']} steps at the reference's seconds per step), "
                  f"{100 * rate / at_mean:.0f}% of its {at_mean:.0f} tok/s at the mean {stats['mean_rows_per_step']:.1f} rows/step")
            print(f"  by batch size, run vs reference: {compare_steps(reference, stats)}")
        print(f"load average now {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
