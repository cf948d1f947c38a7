"""Gumbel noise for a decoding step: rows filled on one thread or split over two.

    python benchmarks/noise.py [--width 49152] [--repeats 15]

Every row of a step takes `width` fresh uniforms from its own generator
(plugins/sampling/draw.py). torch fills a row one value at a time, about
4 ns each here, so at the default job's 74 rows a step (SmolLM2's 49,152
entries) that is some 15 ms, about a twentieth of the step. `gumbel_noise`
fills the second half of the rows on a helper thread from SPLIT_NOISE_ROWS
rows on. This script times it
both ways at the batch sizes a stream meets, with torch on two threads and a
head-sized matmul right before each call (as in a step: torch's worker
threads have just run), the two ways in turn, and checks they give the same
values.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import gadiag_plugins.sampling.draw as draw_module


def time_noise(rows: int, width: int, hidden: int, repeats: int, threads: int) -> dict:
    """Median ms per call, split (the default) and on one thread, alternating."""
    generators = {way: [torch.Generator().manual_seed(1000 + b) for b in range(rows)] for way in ("split", "one thread")}
    out = {way: torch.empty(rows, width) for way in generators}
    hidden_states, head = torch.randn(rows, hidden), torch.randn(hidden, width)
    times = {way: [] for way in generators}
    default = draw_module.SPLIT_NOISE_ROWS
    try:
        for _ in range(repeats):
            for way in generators:
                draw_module.SPLIT_NOISE_ROWS = 1 if way == "split" else rows + 1
                hidden_states @ head  # the step's last matmul
                start = time.perf_counter()
                draw_module.gumbel_noise(generators[way], width, out[way])
                times[way].append((time.perf_counter() - start) * 1000)
    finally:
        draw_module.SPLIT_NOISE_ROWS = default
    same = torch.equal(out["split"], out["one thread"])
    return {way: sorted(t)[len(t) // 2] for way, t in times.items()} | {"same": same}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=49152, help="vocabulary entries (SmolLM2: 49152)")
    parser.add_argument("--hidden", type=int, default=576, help="the head's input width (SmolLM2: 576)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch threads {args.threads}, load average {'/'.join(f'{x:.2f}' for x in os.getloadavg())}; width {args.width}; "
          f"ms per step, median of {args.repeats}")
    print(f"{'rows':>5} {'one thread':>10} {'split':>8} {'ratio':>6} {'us/row split':>12}  same values")
    with torch.inference_mode():
        for rows in (8, 16, 32, 48, 64, 74, 96, 128):
            t = time_noise(rows, args.width, args.hidden, args.repeats, args.threads)
            print(f"{rows:5d} {t['one thread']:10.1f} {t['split']:8.1f} {t['one thread'] / t['split']:5.2f}x {1000 * t['split'] / rows:12.0f}  {t['same']}")


if __name__ == "__main__":
    main()
