"""The prefix sampler's two attention layouts, timed on the layouts a stream meets.

    python benchmarks/attention_layout.py [--threads 2] [--repeats 10]

A decoding step attends each row to its root's cached prefix and to its own
generated keys. `_slot_attention` packs the queries of each place of the
prefix stack side by side, one matmul for all places: over the whole stack
("slots": every place padded to the rows of the biggest root), or over split
places ("split": the places with rows, cut into pieces of at most so many
rows, their keys and values gathered for the step). `_Layout` picks one per
step by the cost rule in plugins/sampling/prefix_stream.py; this script
times both on a grid of layouts (SmolLM2-135M's shapes by default: 3
key/value heads of 64, 3 queries per key, 30 layers; random tensors), one
step = every layer, and prints which layout `_Layout` picks and whether it
is the faster. The split pieces are the size the rule picks.

A layout is B rows over R places of the prefix stack, U of them with rows:
one root holds `slots` rows (the biggest), the others share the rest; the
places without rows are empty (a stream keeps freed places until it
compacts). Nested prefixes: every third row's own prefix stops 8 tokens
before its root's end.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from gadiag_plugins.sampling.prefix import _slot_attention
from gadiag_plugins.sampling.prefix_stream import _Layout

# (rows B, places R, rows of the biggest root, places with rows U): the first
# from a default job's stream at 16 rollouts in flight, the second
# benchmarks/sampler.py's 8 prefixes x 16 requests, then smaller batches.
LAYOUTS = [(115, 16, 30, 13), (128, 8, 16, 8), (100, 16, 30, 12), (100, 16, 7, 15), (100, 4, 25, 4), (64, 12, 16, 10), (48, 8, 20, 6),
           (48, 8, 12, 6), (48, 8, 9, 7), (24, 8, 8, 6), (24, 4, 10, 4), (12, 8, 4, 6)]


def layout_rows(B: int, slots: int, used: int) -> list[int]:
    """Root of each row: root 0 has `slots` rows, roots 1 … used − 1 share the rest."""
    counts = [slots] + [0] * (used - 1)
    for i in range(B - slots):
        counts[1 + i % (used - 1)] += 1
    rows = [r for r, n in enumerate(counts) for _ in range(n)]
    return rows[::2] + rows[1::2]  # rows of a root are not next to each other in a stream


def time_step(attend, q, own, layout, prefix_kt, prefix_v, own_v, layers: int, repeats: int) -> float:
    """Milliseconds for `layers` calls (one decoding step), median of `repeats`."""
    attend(q, own, layout, prefix_kt, prefix_v, own_v)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(layers):
            attend(q, own, layout, prefix_kt, prefix_v, own_v)
        times.append((time.perf_counter() - start) * 1000)
    return sorted(times)[len(times) // 2]


def score_products(KV: int, rep: int, d: int, P: int, layers: int, repeats: int) -> str:
    """The prefix score product of a job-like split step (23 pieces of 6
    rows), keys stored transposed (what the stream keeps) against a
    transposed view of keys stored [.., P, d]: ms per step, median of
    `repeats`, in turn. The two give the same numbers bit for bit."""
    q = torch.randn(23, KV, 6 * rep, d)
    keys = torch.randn(23, KV, P, d)
    keys_t = keys.transpose(-1, -2).contiguous()
    if not torch.equal(torch.matmul(q, keys_t), torch.matmul(q, keys.transpose(-1, -2))):
        return "the two score products differ"
    view, stored = [], []
    for _ in range(repeats):
        for way, times in ((lambda: torch.matmul(q, keys.transpose(-1, -2)), view), (lambda: torch.matmul(q, keys_t), stored)):
            start = time.perf_counter()
            for _ in range(layers):
                way()
            times.append((time.perf_counter() - start) * 1000)
    median = lambda times: sorted(times)[len(times) // 2]  # noqa: E731
    return (f"score product, 23 pieces x 6 rows, P {P}: {median(stored):.1f} ms a step with keys stored transposed, "
            f"{median(view):.1f} against a transposed view (equal values)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--rep", type=int, default=3, help="queries per key/value head")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--prefix", type=int, default=110, help="prefix stack width P (keys)")
    parser.add_argument("--own", type=int, default=32, help="own generated keys S")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    KV, rep, d, P, S = args.kv_heads, args.rep, args.head_dim, args.prefix, args.own
    print(f"threads {args.threads}, load average {'/'.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"KV {KV} × rep {rep} × d {d}, {args.layers} layers, P {P}, S {S}; ms per step (median of {args.repeats})")
    print(f"{'B':>4} {'R':>3} {'slots':>5} {'U':>3} {'padded':>6} {'slot ms':>8} {'split ms':>8} {'piece':>5}  picked")
    right = 0
    with torch.inference_mode():
        for B, R, slots, used in LAYOUTS:
            roots = layout_rows(B, slots, used)
            plens = [P - 8 if b % 3 == 0 else P for b in range(B)]
            prefix_kt, prefix_v = torch.randn(R, KV, d, P), torch.randn(R, KV, P, d)  # keys stored transposed, as the stream does
            q, own, own_v = torch.randn(B, KV, rep, d), torch.randn(B, KV, rep, S), torch.randn(B, KV, S, d)
            layout = _Layout(roots, plens, P, rep, torch.float32, "cpu", n_roots=R)
            forced = {}
            for mode in ("slots", "split"):  # the same layout, both ways
                fixed = _Layout(roots, plens, P, rep, torch.float32, "cpu", n_roots=R, mode=mode)
                forced[mode] = time_step(_slot_attention, q, own, fixed, prefix_kt, prefix_v, own_v, args.layers, args.repeats)
                if mode == "split":
                    piece = fixed.slots
            fastest = min(forced, key=forced.get)
            right += forced[layout.mode] <= 1.1 * forced[fastest]
            print(f"{B:4d} {R:3d} {slots:5d} {used:3d} {R * slots:6d} {forced['slots']:8.1f} {forced['split']:8.1f} {piece:5d}  "
                  f"{layout.mode}{'' if layout.mode == fastest else f' ({fastest} is faster)'}")
    print(f"picked the faster layout, or one within 10% of it, in {right} of {len(LAYOUTS)}")
    with torch.inference_mode():
        print(score_products(KV, rep, d, P, args.layers, args.repeats))


if __name__ == "__main__":
    main()
