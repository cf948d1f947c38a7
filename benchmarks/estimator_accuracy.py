"""Estimator accuracy on the exact environment: alignment error against cost.

    /work/venv/bin/python benchmarks/estimator_accuracy.py [--budgets 2,4,8,16,32]
        [--seeds 4] [--problems 10] [--rollouts 2] [--estimators all]
        [--out benchmarks/estimator_accuracy.png] [--json results.json] [--no-plot]

For every sampling estimator (every registered one but `exact`) and every
budget (the `continuations` option), runs the estimator `--seeds` times on every
rollout of the exact environment (gadiag_tasks.toy_env) and measures, against
the exact ideal vectors (plugins/exact.py):

    table 1  cost (sampled tokens and continuations per scored node) against the
             per-token alignment error |Δcos| = |cos(â, b) − cos(a*, b)| (median,
             p90), the largest systematic error of a leaderboard mean (row bias),
             the coverage of the 95% posterior interval (noise.cosine_interval) of
             the exact cosine on the estimator's candidates (a*_C) and over the
             whole vocabulary (a*), that of the delta-method interval around the
             raw cosine, and the bias of â for a*_C in noise SDs (selfcheck).
    table 2  the noise correction of DESIGN §1: bias and spread of the raw and
             the corrected cosines against the exact ones on the estimator's own
             candidates (a*_C, so that only Monte-Carlo noise is measured), per
             token and in aggregates, for `targeted` with its default candidates
             and with the whole vocabulary as candidates.

The plot (matplotlib, a benchmark-only dependency) shows median and p90
|Δcos| against sampled tokens per node, and the interval coverage.
Runs on one CPU thread in about two minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budgets", default="2,4,8,16,32", help="values of the continuations option")
    p.add_argument("--noise-budgets", default="2,4,8", help="budgets for the noise-correction table")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--noise-seeds", type=int, default=8, help="seeds for the noise-correction table")
    p.add_argument("--problems", type=int, default=10)
    p.add_argument("--rollouts", type=int, default=2)
    p.add_argument("--estimators", default="all")
    p.add_argument("--out", default=str(Path(__file__).with_name("estimator_accuracy.png")))
    p.add_argument("--json", default="", help="also write the numbers to this JSON file")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    from rich.console import Console
    from rich.table import Table

    from gadiag_core.registry import load_registry
    from gadiag_core.certify.estimators import compare, noise_correction_report, objective_vectors, summarize
    from gadiag_tasks.toy_env import build_environment

    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 150))
    registry = load_registry()
    budgets = [int(b) for b in args.budgets.split(",") if b.strip()]
    noise_budgets = [int(b) for b in args.noise_budgets.split(",") if b.strip()]
    names = [n for n in registry.names("estimator") if n != "exact"] if args.estimators == "all" else args.estimators.split(",")
    objectives = {n: registry.create("objective", n) for n in registry.names("objective")}

    started = time.time()
    env = build_environment(problems=args.problems, rollouts_per_problem=args.rollouts, task=registry.create("task", "toy"))
    vectors = objective_vectors(env, objectives)
    width = env.student.vocab_size
    console.print(
        f"exact environment: {len(env.rollouts)} rollouts, {env.nodes} nodes, vocabulary {width}, horizon "
        f"{env.max_new_tokens}, {len(env.teachers)} teachers x {len(objectives)} objectives; {args.seeds} seeds "
        f"({time.time() - started:.1f} s)"
    )

    results = {"environment": {"rollouts": len(env.rollouts), "nodes": env.nodes, "vocab": width}, "accuracy": [], "noise": []}
    comparisons = {}
    table = Table(title="alignment error against cost (per token, vs the exact full-vocabulary a*)", title_justify="left")
    for column in ("estimator", "continuations", "tokens/node", "cont/node", "median |Δcos|", "p90 |Δcos|", "row bias",
                   "cov a*_C", "cov a*", "cov delta", "bias/σ", "s"):
        table.add_column(column, justify="left" if column == "estimator" else "right")
    for name in names:
        for budget in budgets:
            try:
                estimator = registry.create("estimator", name, continuations=budget)
            except Exception as exc:  # an estimator without this option
                console.print(f"[yellow]skip {name} at continuations={budget}: {exc}[/]")
                continue
            c = compare(env, estimator, vectors, args.seeds, name, str(budget))
            comparisons[(name, budget)] = c
            s = summarize(c)
            nodes = max(1, len(c.nodes))
            row = {
                "estimator": name,
                "continuations": budget,
                "tokens_per_node": c.sampled_tokens / nodes,
                "continuations_per_node": c.continuations / nodes,
                "median": s.median,
                "p90": s.p90,
                "row_bias": s.row_bias,
                "coverage": s.coverage,
                "coverage_full": s.coverage_full,
                "coverage_delta": s.coverage_delta,
                "chi2_df": s.chi2,
                "bias_sd": s.bias_sd,
                "seconds": s.seconds,
            }
            results["accuracy"].append(row)
            table.add_row(
                name, str(budget), f"{row['tokens_per_node']:.0f}", f"{row['continuations_per_node']:.0f}",
                f"{s.median:.3f}", f"{s.p90:.3f}", f"{s.row_bias:.3f}", f"{s.coverage:.1%}", f"{s.coverage_full:.1%}",
                f"{s.coverage_delta:.1%}", f"{s.bias_sd:.2f}", f"{s.seconds:.0f}",
            )
    console.print(table)

    # Noise correction: non-adaptive `uniform` (clean binomial noise) with all and
    # with the default candidates, and the default `targeted`.
    configs = [
        ("uniform", "all", {"max_candidates": width, "mass_threshold": 1.0}),
        ("uniform", "default", {}),
        ("targeted", "default", {}),
    ]
    configs = [cfg for cfg in configs if cfg[0] in registry.names("estimator")]
    if configs:
        ntable = Table(title=f"noise correction: error against the exact cosine on the same candidates (a*_C); {args.noise_seeds} seeds", title_justify="left")
        for column in ("estimator", "candidates", "cont.", "level", "method", "bias", "toward 0", "sd", "rmse", "undefined"):
            ntable.add_column(column, justify="left" if column in ("estimator", "candidates", "level", "method") else "right")
        for name, label, extra in configs:
            for budget in noise_budgets:
                c = compare(env, registry.create("estimator", name, continuations=budget, **extra), vectors, args.noise_seeds, name, str(budget))
                report = noise_correction_report(c)
                for level in ("per_token", "aggregate"):
                    for method, st in report[level].items():
                        undefined = report["undefined"].get(method, math.nan) if level == "per_token" else math.nan
                        results["noise"].append({"estimator": name, "candidates": label, "continuations": budget, "level": level, "method": method, **st, "undefined": undefined})
                        ntable.add_row(
                            name, label, str(budget), level.replace("_", " "), method, f"{st['bias']:+.3f}", f"{st['toward0']:+.3f}",
                            f"{st['sd']:.3f}", f"{st['rmse']:.3f}", "" if undefined != undefined else f"{undefined:.0%}",
                        )
                ntable.add_section()
        console.print(ntable)

    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        console.print(f"numbers written to {args.json}")
    if not args.no_plot:
        plot(results, args.out)
        console.print(f"plot written to {args.out}")
    console.print(f"total {time.time() - started:.0f} s")
    return 0


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    by_name: dict[str, list] = {}
    for row in results["accuracy"]:
        by_name.setdefault(row["estimator"], []).append(row)
    for name, rows in by_name.items():
        rows = sorted(rows, key=lambda r: r["tokens_per_node"])
        x = [r["tokens_per_node"] for r in rows]
        line = ax1.plot(x, [r["median"] for r in rows], marker="o", label=f"{name}: median")[0]
        ax1.plot(x, [r["p90"] for r in rows], marker="s", linestyle="--", color=line.get_color(), label=f"{name}: p90")
        ax1.plot(x, [r["row_bias"] for r in rows], marker="^", linestyle=":", color=line.get_color(), label=f"{name}: row bias")
        for r in rows:
            ax1.annotate(str(r["continuations"]), (r["tokens_per_node"], r["median"]), textcoords="offset points", xytext=(3, -10), fontsize=7)
        ax2.plot(x, [r["coverage"] for r in rows], marker="o", color=line.get_color(), label=f"{name}: posterior, of a*_C")
        ax2.plot(x, [r["coverage_full"] for r in rows], marker="s", linestyle=":", color=line.get_color(), label=f"{name}: posterior, of a*")
        ax2.plot(x, [r["coverage_delta"] for r in rows], marker="x", linestyle="--", color=line.get_color(), label=f"{name}: delta method, of a*")
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlabel("sampled tokens per scored node")
    ax1.set_ylabel("|cos(â,b) − cos(a*,b)|")
    ax1.set_title("per-token alignment error (labels: continuations per candidate)")
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=7)
    ax2.axhline(0.95, color="grey", linewidth=0.8)
    ax2.axhline(0.90, color="grey", linewidth=0.8, linestyle=":")
    ax2.set_xscale("log")
    ax2.set_ylim(0.5, 1.0)
    ax2.set_xlabel("sampled tokens per scored node")
    ax2.set_ylabel("coverage of the exact cosine")
    ax2.set_title("95% interval coverage")
    ax2.grid(True, which="both", alpha=0.3)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
