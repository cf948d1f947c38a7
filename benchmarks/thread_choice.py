"""The samplers' automatic thread choice (plugins/sampling/threads.py): how
often it picks one thread, and what a decoding step costs on one and on all
threads, on this machine as it is (and with --busy K processes spinning on
the cores, the case one thread is for).

Per probe (`thread_probe`: one [64, 576] x [576, 2304] matmul, SmolLM2-135M's
width, on one thread and on all) the speed-up of all threads over one; how
many probes the rule before (one thread unless all are at least 20% faster)
and the rule now (`prefer_one`: one thread only when all are SLOWER_ON_MANY
times slower) would answer with one thread. Then a decoding step's matmuls
(30 layers of SmolLM2-135M's q/k/v, o, gate/up and down projections and the
output head, at 32 and 128 rows) on one thread and on all, in turn.

    python benchmarks/thread_choice.py                 # 60 probes, idle
    python benchmarks/thread_choice.py --busy 1        # one other process spinning
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import time

import torch

from gadiag_plugins.sampling.threads import SLOWER_ON_MANY, prefer_one, thread_probe

WIDTH, HIDDEN, QKV, VOCAB, LAYERS = 576, 1536, 960, 49152, 30


def spin(stop) -> None:
    while not stop.is_set():
        pass


def step_matmuls(rows: int):
    """A decoding step's matmuls at `rows` rows, shaped like SmolLM2-135M's."""
    g = torch.Generator().manual_seed(0)
    x, h = torch.randn(rows, WIDTH, generator=g), torch.randn(rows, HIDDEN, generator=g)
    w = {name: torch.randn(shape, generator=g) for name, shape in
         (("qkv", (WIDTH, QKV)), ("o", (WIDTH, WIDTH)), ("gate_up", (WIDTH, 2 * HIDDEN)), ("down", (HIDDEN, WIDTH)), ("head", (WIDTH, VOCAB)))}

    def run() -> None:
        for _ in range(LAYERS):
            x @ w["qkv"]
            x @ w["o"]
            x @ w["gate_up"]
            h @ w["down"]
        x @ w["head"]

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--probes", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per row count and thread setting")
    parser.add_argument("--busy", type=int, default=0, help="processes spinning on the cores during the measurement")
    args = parser.parse_args()
    threads = torch.get_num_threads()
    print(f"torch threads: {threads}, cores: {os.cpu_count()}, load average before: {'/'.join(f'{x:.2f}' for x in os.getloadavg())}, busy processes: {args.busy}")
    stop = multiprocessing.Event()
    spinners = [multiprocessing.Process(target=spin, args=(stop,), daemon=True) for _ in range(args.busy)]
    for p in spinners:
        p.start()
    try:
        speedups, before_rule, now_rule = [], 0, 0
        for _ in range(args.probes):
            one, many = thread_probe(WIDTH, threads)
            speedups.append(one / many)
            before_rule += many * 1.2 > one
            now_rule += prefer_one(one, many)
            time.sleep(0.02)
        ordered = sorted(speedups)
        print(f"probe speed-up of {threads} threads over one, {args.probes} probes: min {ordered[0]:.2f}, "
              f"tenth {ordered[len(ordered) // 10]:.2f}, median {statistics.median(ordered):.2f}, max {ordered[-1]:.2f}")
        print(f"one thread chosen: rule before (all threads at least 20% faster, or one) {before_rule} of {args.probes}; "
              f"rule now (one only when all are {SLOWER_ON_MANY}x slower) {now_rule} of {args.probes}")
        for rows in (32, 128):
            run = step_matmuls(rows)
            times = {1: [], threads: []}
            for _ in range(args.repeats):
                for n in (1, threads):
                    torch.set_num_threads(n)
                    run()  # warm
                    start = time.perf_counter()
                    run()
                    times[n].append(time.perf_counter() - start)
            torch.set_num_threads(threads)
            one, many = statistics.median(times[1]), statistics.median(times[threads])
            print(f"decoding step's matmuls at {rows} rows: {1000 * one:.0f} ms on one thread, {1000 * many:.0f} ms on {threads} "
                  f"({one / many:.2f}x), medians of {args.repeats} in turn")
    finally:
        stop.set()
        for p in spinners:
            p.join()
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
