"""Do two sets of runs give the same leaderboard? Row by row and split by
split (`align`, `incorrect`, `correct`: summary.json `rows`, means and 95%
intervals), for runs paired by position: whether the two intervals overlap
and how far apart the means are; then, over all the runs of each side, the
mean of each row's means (signed and absolute difference) and the Spearman
correlation of the two sides' `align` orders.

Used for the vLLM sampler against the prefix sampler (README "vLLM
rollouts"): the same job, the same seeds, the two samplers —

    for s in 0 1 2; do
      gadiag-harness --task math --teachers all --threads 1 --set run.seed=$s --run-dir runs/prefix-s$s
      VLLM_CPU_OMP_THREADS_BIND=0 gadiag-harness --task math --teachers all --threads 1 \\
          --set run.seed=$s --run-dir runs/vllm-s$s --sampler vllm
    done
    python benchmarks/leaderboard_agreement.py --a runs/prefix-s{0,1,2} --b runs/vllm-s{0,1,2}

and for the spread between seeds of one sampler, the baseline to read the
first against: --a runs/prefix-s0 runs/prefix-s1 runs/prefix-s0 --b
runs/prefix-s1 runs/prefix-s2 runs/prefix-s2. `-v` prints every row;
`--resummarize` recomputes the rows from the records (runs written before a
change of the aggregates).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

SPLITS = (("align", "mean_all", "ci_all"), ("incorrect", "mean_incorrect", "ci_incorrect"), ("correct", "mean_correct", "ci_correct"))
REFERENCE_ROWS = {"noise_ceiling", "rl_outcome"}


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def rows_of(run_dir: str, resummarize: bool = False) -> dict:
    """The run's leaderboard rows: as its summary.json has them, or recomputed
    from its records with this version's aggregates (`resummarize`)."""
    if resummarize:
        from gadiag_core.store.records import load_run, record_summary

        run = load_run(Path(run_dir))
        return record_summary(run.rollouts, run.questions, run.tokens)["rows"]
    return json.loads((Path(run_dir) / "summary.json").read_text())["rows"]


def compare(rows_a: dict, rows_b: dict) -> list[tuple[str, str, bool | None, float | None]]:
    """(row, split, intervals overlap (None: an interval is missing), |mean a − mean b|)."""
    out = []
    for name in sorted(set(rows_a) & set(rows_b)):
        for split, mean_key, ci_key in SPLITS:
            ma, mb = rows_a[name].get(mean_key), rows_b[name].get(mean_key)
            ca, cb = rows_a[name].get(ci_key), rows_b[name].get(ci_key)
            overlap = None
            if ca and cb and all(finite(v) for v in (*ca, *cb)):
                overlap = ca[0] <= cb[1] and cb[0] <= ca[1]
            out.append((name, split, overlap, abs(ma - mb) if finite(ma) and finite(mb) else None))
    return out


def tally(results, label: str) -> None:
    for group, keep in (("teacher × objective", lambda n: n not in REFERENCE_ROWS), ("reference", lambda n: n in REFERENCE_ROWS)):
        for split in [s for s, _, _ in SPLITS] + ["all splits"]:
            chosen = [r for r in results if keep(r[0]) and split in (r[1], "all splits")]
            overlaps = [r[2] for r in chosen if r[2] is not None]
            diffs = [r[3] for r in chosen if r[3] is not None]
            mean = f"{statistics.mean(diffs):.3f}" if diffs else "–"
            print(f"{label:10s} {group:20s} {split:10s} overlap {sum(overlaps)}/{len(overlaps)}  mean |diff| {mean} (n={len(diffs)})")


def spearman(a: dict, b: dict) -> float:
    names = sorted(a)
    rank = lambda d: {n: i for i, n in enumerate(sorted(names, key=lambda n: -d[n]))}
    ra, rb, n = rank(a), rank(b), len(names)
    return 1 - 6 * sum((ra[x] - rb[x]) ** 2 for x in names) / (n * (n * n - 1))


def pooled(side_a: list[dict], side_b: list[dict]) -> None:
    names = [n for n in side_a[0] if n not in REFERENCE_ROWS and all(n in r for r in side_a + side_b)]
    for split, mean_key, _ in SPLITS:
        signed = []
        for n in names:
            va = [r[n][mean_key] for r in side_a if finite(r[n].get(mean_key))]
            vb = [r[n][mean_key] for r in side_b if finite(r[n].get(mean_key))]
            if va and vb:
                signed.append(statistics.mean(va) - statistics.mean(vb))
        print(f"pooled {split:9s} mean (a − b) {statistics.mean(signed):+.3f}, mean |a − b| {statistics.mean(map(abs, signed)):.3f} over {len(signed)} rows")
    mean_align = lambda side: {n: statistics.mean(r[n]["mean_all"] for r in side) for n in names}
    a, b = mean_align(side_a), mean_align(side_b)
    print(f"Spearman correlation of the pooled `align` orders ({len(names)} rows): {spearman(a, b):.2f}")
    for n in sorted(names, key=lambda n: -a[n]):
        print(f"  {n:32s} a {a[n]:+.3f}  b {b[n]:+.3f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--a", nargs="+", required=True, help="run directories of side a")
    p.add_argument("--b", nargs="+", required=True, help="run directories of side b, paired with --a by position")
    p.add_argument("--resummarize", action="store_true", help="recompute each run's rows from its records with this version's aggregates (runs written before a change of the headline)")
    p.add_argument("-v", "--verbose", action="store_true", help="print every row and split of every pair")
    args = p.parse_args(argv)
    if len(args.a) != len(args.b):
        p.error(f"--a has {len(args.a)} run directories and --b {len(args.b)}: they are paired by position")
    side_a, side_b = ([rows_of(d, args.resummarize) for d in side] for side in (args.a, args.b))
    everything = []
    for i, (ra, rb) in enumerate(zip(side_a, side_b)):
        results = compare(ra, rb)
        if args.verbose:
            print(f"== {args.a[i]} vs {args.b[i]}")
            for name, split, overlap, diff in results:
                print(f"  {name:32s} {split:9s} {'–' if overlap is None else ('overlap' if overlap else 'NO')}  {'' if diff is None else f'{diff:.2f}'}")
        tally(results, f"pair {i}")
        everything += results
    if len(side_a) > 1:
        tally(everything, "all pairs")
    pooled(side_a, side_b)
    return 0


if __name__ == "__main__":
    sys.exit(main())
