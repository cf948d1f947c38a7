"""`gadiag-harness selfcheck`: certify estimators and objectives on the exact environment.

    gadiag-harness selfcheck [--estimators targeted,…|all] [--objectives …|all]
                             [--budgets 4,16] [--budget-option continuations]
                             [--option KEY=VALUE …] [--seeds 6] [--problems 10] [--rollouts 2]
                             [--max-median 0.25] [--min-coverage 0.90] [--max-bias-sd 0.35]
                             [--plugins-dir DIR]

What it does. The exact environment (gadiag_tasks.toy_env: a tiny seeded
student, the `toy` task, fixed rollouts, three teachers) gives the exact ideal
vector a*(u_t) at every node (plugins/exact.py). Each estimator is run on every
rollout `--seeds` times (independent replicates) at each budget (values of
`--budget-option`; the first is the default budget); at every node it scores
and for every teacher × objective row

    Δcos = cos(â, b) − cos(a*, b)

with a* the exact vector over the whole vocabulary (what the tool claims to
estimate: candidate truncation, screening and noise all count) and b the
objective's vector for that teacher. Rows where a* = 0 (every token has the
same Q: the node is decided) have no direction and are left out.

Columns of the estimator table:
    pairs        scored (node, row) pairs over all seeds
    tok/node     sampled tokens per scored node (the cost)
    med, p90     of |Δcos| per token
    row bias     the largest |mean Δcos| over rows: the systematic error of a
                 leaderboard mean (noise shrinkage + candidate truncation)
    mean |Δ|     the error of what a leaderboard prints: per seed and row, the
                 noise-corrected token mean (global binomial correction, as in
                 gadiag_core.scoring.alignment) against the exact mean over the same
                 nodes; the median over seeds × rows (reported, not gated: it
                 shrinks with the number of nodes averaged, 73 here)
    cov a*_C     share of 95% intervals (noise.cosine_interval, a posterior over
                 the Q̂s) that contain the exact cosine on the estimator's own
                 candidates, i.e. with exact Q there (gated: the reported
                 uncertainty must be honest)
    cov a*       the same for the full-vocabulary cosine (reported: candidate
                 truncation is a deterministic design error, not noise)
    bias/σ       unbiasedness of â for a*_C, pooled over seeds, in noise SDs of
                 one estimate (`unbiasedness`, `Summary.bias_sd`)

Pass (exit 0) when, at every budget, cov a*_C ≥ --min-coverage and the 4-sigma
lower bound of bias/σ ≤ --max-bias-sd; at the default budget median |Δcos| ≤
--max-median; and every objective with a known loss matches autograd. The
defaults are set from measurements on the built-ins: `targeted` and `uniform`
pass with margin (cov a*_C 92–95%, bias/σ ≤ 0.31), an estimator that shrinks
Q̂ of the sampled token by 40% fails (coverage 83%, bias ≥ 1.2 SD). Per-token
|Δcos| at small budgets is dominated by noise on nodes whose ‖a*‖ is small
(median ≈ 0.1 at 4 continuations), so --max-median is a sanity bound only.

Leaderboard check (issue 14; gadiag_core.certify.leaderboard). What users read
is checked too: on --leaderboard-seeds exact environments of
--leaderboard-problems × --leaderboard-rollouts (horizon 4), and on
--large-seeds environments with horizon --large-horizon, the
--leaderboard-estimator (default `targeted`) is run at each of
--leaderboard-budgets and its records are aggregated exactly as a run's
(gadiag_core.scoring.alignment). Per split (all / correct / incorrect
rollouts: the headline means of per-rollout cosines; the token means are
printed beside them) and over every teacher × objective row and environment:
mean |leaderboard − exact| (≤ --lb-max-error), signed bias (|·| ≤
--lb-max-bias), the share of 95% intervals containing the exact mean (≥
--lb-min-coverage); and budget invariance, the share of entries whose
intervals at the larger budget and the default one overlap (≥
--lb-min-overlap). The defaults are set from the built-ins' measured
behaviour: they catch a broken aggregate, not the residual errors issue 14
describes (its targets, 0.02 / 0.01 / 90%, are met on the `toy` task's own
teachers by benchmarks/leaderboard_accuracy.py, not on this environment's; pass
them as flags to see by how much). Measured with the defaults (~2–4 min, one
thread; before issue 14's candidate change, i.e. with mass_threshold 0.9,
max_candidates 4, free_candidates 0, rollout_floor 0): `targeted` at
continuations=5 (`blind` allocation) has
headline means (per-rollout cosines) with mean |Δ| 0.011–0.026 and signed
bias +0.005 (± 0.002–0.005) per split (default environment), 0.018–0.034 and
−0.007…+0.006 (horizon 5), interval coverage 94–100%; the token means beside
them 0.031–0.060 and 0.047–0.088; budget intervals overlap 100%. (At
continuations=4 with the former `energy` allocation: 0.013–0.030 and within
±0.003; 0.023–0.041 and −0.015…+0.001.)
This environment's teachers (`informed`, `other_model`) push tokens outside
the estimator's candidates, and that truncation error is deterministic: no
noise interval covers it, hence the larger errors here than on the `toy`
task's own teachers (benchmarks/leaderboard_accuracy.py: headline mean |Δ|
0.010–0.019, coverage 100%).

Objective table: each objective's closed-form b against −∂L/∂z by autograd on
the toy model's logits, and Jᵀb against −∇θL through the model's parameters.
L is the objective's `loss(student_logits, teacher_logprobs, sampled,
temperature) -> [N]` method (plugins/objectives/forms.py); objectives without
one are reported as
unchecked (not a failure).
"""

from __future__ import annotations

import math
import time

import torch

from gadiag_core.certify.estimators import Summary, compare, objective_vectors, summarize
from gadiag_core.certify.leaderboard import budget_agreement, leaderboard_errors, split_stats
from gadiag_core.certify.objectives import AUTOGRAD_TOL, check_objective
from gadiag_core.certify.records import environment_records
from gadiag_core.errors import UsageError

DEFAULT_BUDGETS = "4,16"
DEFAULT_SEEDS = 6
DEFAULT_MAX_MEDIAN = 0.25
DEFAULT_MIN_COVERAGE = 0.90
DEFAULT_MAX_BIAS_SD = 0.35
# Leaderboard gates (issue 14), set from measurements of the built-ins
# (benchmarks/leaderboard_accuracy.py and this command): see the docstring.
DEFAULT_LB_MAX_ERROR = 0.10
DEFAULT_LB_MAX_BIAS = 0.06
DEFAULT_LB_MIN_COVERAGE = 0.60
DEFAULT_LB_MIN_OVERLAP = 0.80


# ----------------------------------------------------------------------------
# The command


def parser():
    from gadiag_core.commands.common import ArgumentParser, add_common

    p = ArgumentParser(
        prog="gadiag-harness selfcheck",
        description="Certify gradient estimators and objectives against exact ideal vectors on a tiny enumerable model.",
    )
    p.add_argument("--estimators", default="all", help="comma-separated estimator names, or 'all' (every one but 'exact')")
    p.add_argument("--objectives", default="all", help="comma-separated objective names, or 'all'")
    p.add_argument("--budgets", default=DEFAULT_BUDGETS, help=f"comma-separated values of --budget-option; the first is the default budget (default {DEFAULT_BUDGETS})")
    p.add_argument("--budget-option", default="continuations", help="the estimator option the budgets set (default continuations)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="extra estimator option for every estimator (repeatable)")
    p.add_argument("--seeds", type=int, default=DEFAULT_SEEDS, help=f"independent estimator replicates per rollout (default {DEFAULT_SEEDS})")
    p.add_argument("--environment", default="toy", help="the exact environment (`gadiag-harness list environment`; default toy)")
    p.add_argument("--problems", type=int, default=10, help="toy problems (default 10)")
    p.add_argument("--rollouts", type=int, default=2, help="student rollouts per problem (default 2)")
    p.add_argument("--env-seed", type=int, default=0, help="seed of the environment's rollouts (default 0)")
    p.add_argument("--max-median", type=float, default=DEFAULT_MAX_MEDIAN, help=f"largest median |Δcos| at the default budget (default {DEFAULT_MAX_MEDIAN})")
    p.add_argument("--min-coverage", type=float, default=DEFAULT_MIN_COVERAGE, help=f"smallest 95%%-interval coverage at every budget (default {DEFAULT_MIN_COVERAGE})")
    p.add_argument("--max-bias-sd", type=float, default=DEFAULT_MAX_BIAS_SD, help=f"largest bias of â, in noise SDs of one estimate, at every budget (default {DEFAULT_MAX_BIAS_SD})")
    p.add_argument("--leaderboard-estimator", default="targeted", help="estimator whose leaderboard means are checked against exact ones ('none': skip; default targeted)")
    p.add_argument("--leaderboard-budgets", default="5,10", help="its budgets (values of --budget-option): the default (targeted's own), then larger ones for budget invariance (default 5,10)")
    p.add_argument("--leaderboard-seeds", type=int, default=3, help="environments (seeds) of the leaderboard check; 0 skips it (default 3)")
    p.add_argument("--leaderboard-problems", type=int, default=20, help="problems per environment (default 20)")
    p.add_argument("--leaderboard-rollouts", type=int, default=10, help="rollouts per problem (default 10)")
    p.add_argument("--large-horizon", type=int, default=5, help="also check a larger environment with this horizon (0: skip; default 5)")
    p.add_argument("--large-rollouts", type=int, default=10, help="rollouts per problem of the larger environment (default 10)")
    p.add_argument("--large-problems", type=int, default=8, help="problems of the larger environment (default 8)")
    p.add_argument("--large-seeds", type=int, default=2, help="seeds of the larger environment (default 2)")
    p.add_argument("--lb-max-error", type=float, default=DEFAULT_LB_MAX_ERROR, help=f"largest mean |leaderboard − exact| per split (default {DEFAULT_LB_MAX_ERROR})")
    p.add_argument("--lb-max-bias", type=float, default=DEFAULT_LB_MAX_BIAS, help=f"largest |signed bias| per split (default {DEFAULT_LB_MAX_BIAS})")
    p.add_argument("--lb-min-coverage", type=float, default=DEFAULT_LB_MIN_COVERAGE, help=f"smallest share of 95%% intervals containing the exact mean, per split (default {DEFAULT_LB_MIN_COVERAGE})")
    p.add_argument("--lb-min-overlap", type=float, default=DEFAULT_LB_MIN_OVERLAP, help=f"smallest share of intervals that overlap between budgets (default {DEFAULT_LB_MIN_OVERLAP})")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    add_common(p)
    return p


def _parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if text.lower() in ("none", "null"):
        return None
    return text


def _parse_options(items: list[str]) -> dict:
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--option {item!r}: expected KEY=VALUE")
        options[key.strip()] = _parse_value(value.strip())
    return options


def _parse_budgets(text: str) -> list:
    values = [_parse_value(p.strip()) for p in text.split(",") if p.strip()]
    if not values:
        raise UsageError("--budgets: give at least one value, e.g. --budgets 4,16")
    return values


def _build_estimator(registry, name: str, options: dict):
    try:
        return registry.create("estimator", name, **options)
    except UsageError:
        raise
    except (ValueError, TypeError) as exc:
        raise UsageError(f"estimator {name!r} rejected options {options}: {exc}") from None


def check_summary(s: Summary, is_default: bool, args) -> list[str]:
    """The failed gates of one estimator × budget row, as messages."""
    problems = []
    if s.pairs == 0:
        return ["no node was scored"]
    if not (s.coverage >= args.min_coverage):
        problems.append(
            f"95% intervals cover the exact cosine (on its candidates) only {s.coverage:.1%} of the time "
            f"(< {args.min_coverage:.0%}): the reported uncertainty is too small"
        )
    if s.bias_sd_lower > args.max_bias_sd:
        problems.append(
            f"â is biased: its mean over seeds differs from the exact a* on its candidates by at least "
            f"{s.bias_sd_lower:.2f} noise SDs of one estimate (estimate {s.bias_sd:.2f}; χ²/df {s.chi2:.2f} over "
            f"{s.chi2_df} coordinates; tolerance {args.max_bias_sd})"
        )
    if is_default and not (s.median <= args.max_median):
        problems.append(f"median |Δcos| {s.median:.3f} > {args.max_median} at the default budget")
    return problems


LB_SPLITS = ("all", "correct", "incorrect")


def leaderboard_check(args, registry, objectives: dict, task, build_environment, console, label: str, problems: int, rollouts: int, horizon: int, seeds: int) -> list[str]:
    """The leaderboard means of --leaderboard-estimator against exact ones on
    `seeds` exact environments (gadiag_core.certify.leaderboard); prints a table
    and returns the failed gates as messages."""
    from rich.table import Table

    name = args.leaderboard_estimator
    budgets = _parse_budgets(args.leaderboard_budgets)
    estimators = [(b, _build_estimator(registry, name, {args.budget_option: b})) for b in budgets]
    errors = {b: [] for b in budgets}
    tokens = {b: 0 for b in budgets}
    for seed in range(seeds):
        with console.status(f"leaderboard check, {label}: environment {seed + 1}/{seeds}…"):
            env = build_environment(problems=problems, rollouts_per_problem=rollouts, seed=seed, max_new_tokens=horizon, task=task)
            vectors = objective_vectors(env, objectives)
            for budget, estimator in estimators:
                tok, rol, ex_tok, ex_rol, spent = environment_records(env, estimator, vectors, seed)
                tokens[budget] += spent
                errors[budget] += [(seed, e) for e in leaderboard_errors(tok, rol, ex_tok, ex_rol)]
    default = budgets[0]
    flat = [e for _, e in errors[default]]
    table = Table(
        title=f"leaderboard means of {name} ({args.budget_option}={default}) vs exact; {label}: {seeds} environments × "
        f"{problems} problems × {rollouts} rollouts, horizon {horizon}",
        title_justify="left",
    )
    for column in ("split", "entries", "mean |Δ|", "max |Δ|", "signed bias", "95% CI covers", "raw: mean |Δ|", "raw: bias", "token: mean |Δ|", "token: bias", "status"):
        table.add_column(column, justify="left" if column in ("split", "status") else "right")
    failures = []
    for split in LB_SPLITS:
        s = split_stats(flat, "headline", split)
        r = split_stats(flat, "raw", split)
        t = split_stats(flat, "token", split)
        if s.n == 0:
            continue
        problems_here = []
        if not s.mean_abs <= args.lb_max_error:
            problems_here.append(f"mean |leaderboard − exact| {s.mean_abs:.3f} > {args.lb_max_error}")
        if not abs(s.bias) <= args.lb_max_bias:
            problems_here.append(f"signed bias {s.bias:+.3f} (± {s.bias_se:.3f}) beyond ±{args.lb_max_bias}")
        if not s.coverage >= args.lb_min_coverage:
            problems_here.append(f"95% intervals contain the exact mean only {s.coverage:.1%} of the time (< {args.lb_min_coverage:.0%})")
        failures += [f"leaderboard {name}, {label}, split {split}: {m}" for m in problems_here]
        table.add_row(
            split, str(s.n), f"{s.mean_abs:.3f}", f"{s.max_abs:.3f}", f"{s.bias:+.3f} ± {s.bias_se:.3f}", f"{s.coverage:.1%}",
            f"{r.mean_abs:.3f}", f"{r.bias:+.3f}", f"{t.mean_abs:.3f}", f"{t.bias:+.3f}", "[green]ok[/]" if not problems_here else "[red]FAIL[/]",
        )
    console.print(table)
    for budget in budgets[1:]:
        a = budget_agreement(errors[default], errors[budget])
        ok = a.overlap >= args.lb_min_overlap
        console.print(
            f"  budget invariance, {label}: {args.budget_option}={budget} ({tokens[budget] / max(1, tokens[default]):.1f}× sampled tokens) "
            f"vs {default}: intervals overlap in {a.overlap:.1%} of {a.n} entries, mean shift {a.shift:+.3f} ± {a.shift_se:.3f}  "
            + ("[green]ok[/]" if ok else "[red]FAIL[/]")
        )
        if not ok:
            failures.append(f"leaderboard {name}, {label}: intervals at {args.budget_option}={budget} and {default} overlap only {a.overlap:.1%} (< {args.lb_min_overlap:.0%})")
    return failures


def run_selfcheck(args, registry, console) -> int:
    from rich.table import Table

    if args.seeds < 2 or args.problems < 1 or args.rollouts < 1:
        raise UsageError("--seeds must be at least 2, --problems and --rollouts at least 1")
    if args.estimators.strip() == "all":
        estimators = [n for n in registry.names("estimator") if n != "exact"]
    else:
        estimators = registry.resolve("estimator", args.estimators)
    objective_names = registry.resolve("objective", args.objectives)
    budgets = _parse_budgets(args.budgets)
    extra = _parse_options(args.option)
    if args.leaderboard_estimator != "none":
        registry.resolve("estimator", args.leaderboard_estimator)
        _parse_budgets(args.leaderboard_budgets)
    torch.set_num_threads(max(1, args.threads))
    build_environment = registry.create("environment", args.environment)

    objectives = {name: registry.create("objective", name) for name in objective_names}
    # Build every estimator first: a bad option fails before any work.
    plans = []
    for name in estimators:
        for value in budgets if name != "exact" else [None]:
            options = dict(extra)
            if value is not None:
                options[args.budget_option] = value
            label = "-" if value is None else f"{args.budget_option}={value}"
            plans.append((name, label, value is None or value == budgets[0], _build_estimator(registry, name, options)))

    started = time.time()
    task = registry.create("task", "toy") if "toy" in registry.names("task") else None
    with console.status("building the exact environment…"):
        env = build_environment(problems=args.problems, rollouts_per_problem=args.rollouts, seed=args.env_seed, task=task)
    vectors = objective_vectors(env, objectives)
    console.print(
        f"exact environment: {len(env.rollouts)} rollouts, {env.nodes} nodes, vocabulary {env.student.vocab_size}, "
        f"horizon {env.max_new_tokens}; teachers {', '.join(env.teachers)}; {len(objectives)} objectives; "
        f"{args.seeds} seeds per estimator"
    )

    failures: list[str] = []
    table = Table(
        title=f"estimators vs exact ideal vectors; budget = {args.budget_option}; Δcos = cos(â,b) − cos(a*,b)",
        title_justify="left",
    )
    columns = ("estimator", "budget", "pairs", "tok/node", "med |Δcos|", "p90 |Δcos|", "row bias", "mean |Δ|",
               "cov a*_C", "cov a*", "bias/σ", "status")
    for column in columns:
        table.add_column(column, justify="left" if column in ("estimator", "budget", "status") else "right")
    summaries = []
    for name, label, is_default, estimator in plans:
        with console.status(f"{name} at {label}…"):
            s = summarize(compare(env, estimator, vectors, args.seeds, name, label))
        summaries.append(s)
        problems = check_summary(s, is_default, args)
        failures += [f"{name} ({label}): {p}" for p in problems]
        shown = label.split("=", 1)[-1] + (" *" if is_default and label != "-" else "")
        table.add_row(
            name, shown, str(s.pairs), f"{s.tokens_per_node:.0f}",
            f"{s.median:.3f}", f"{s.p90:.3f}", f"{s.row_bias:.3f}", f"{s.mean_error:.3f}", f"{s.coverage:.1%}",
            f"{s.coverage_full:.1%}", f"{s.bias_sd:.2f}", "[green]ok[/]" if not problems else "[red]FAIL[/]",
        )
    console.print(table)

    otable = Table(title="objectives: closed-form b against autograd on the toy model", title_justify="left")
    for column in ("objective", "logits: max|b + ∂L/∂z|/max|b|", "params: ‖Jᵀb + ∇θL‖/‖∇θL‖", "status"):
        otable.add_column(column)
    for name, objective in objectives.items():
        check = check_objective(env, name, objective)
        if not check.ok:
            failures.append(f"objective {name}: {check.message}")
        status = "[green]ok[/]" if check.checked and check.ok else ("[yellow]unchecked (no loss)[/]" if check.ok else "[red]FAIL[/]")
        otable.add_row(
            name,
            f"{check.logit_error:.1e}" if check.checked else "-",
            f"{check.param_error:.1e}" if check.checked else "-",
            status,
        )
    console.print(otable)
    console.print(
        "* default budget.  row bias: largest |mean Δcos| over rows (systematic error of a leaderboard mean: noise "
        "shrinkage and candidate truncation).  mean |Δ|: median error of the noise-corrected token mean a leaderboard "
        "prints, one per seed × row (each over all the environment's nodes).  CI cov.: share of 95% posterior intervals (noise.cosine_interval) "
        "containing the exact cosine on the estimator's candidates (a*_C, gated) and over the whole vocabulary (a*).  "
        "bias/σ: unbiasedness of â for a*_C, in noise SDs of one estimate."
    )
    console.print(
        f"tolerances: median |Δcos| ≤ {args.max_median} at the default budget; at every budget CI coverage of a*_C ≥ "
        f"{args.min_coverage:.0%} and bias/σ ≤ {args.max_bias_sd} (its 4-sigma lower bound); objectives within "
        f"{AUTOGRAD_TOL:g} of autograd.  ({time.time() - started:.0f} s)"
    )
    if args.leaderboard_estimator != "none" and args.leaderboard_seeds > 0:
        failures += leaderboard_check(
            args, registry, objectives, task, build_environment, console, "default environment",
            args.leaderboard_problems, args.leaderboard_rollouts, env.max_new_tokens, args.leaderboard_seeds,
        )
        if args.large_horizon > 0 and args.large_seeds > 0:
            failures += leaderboard_check(
                args, registry, objectives, task, build_environment, console, "larger environment",
                args.large_problems, args.large_rollouts, args.large_horizon, args.large_seeds,
            )
        console.print(
            f"leaderboard tolerances per split: mean |Δ| ≤ {args.lb_max_error}, |signed bias| ≤ {args.lb_max_bias}, "
            f"95% CI coverage ≥ {args.lb_min_coverage:.0%}; budget intervals overlap ≥ {args.lb_min_overlap:.0%}"
        )
    if failures:
        for failure in failures:
            console.print(f"[red]FAIL[/] {failure}", soft_wrap=True)
        console.print(f"selfcheck failed: {len(failures)} check(s) out of tolerance")
        return 1
    console.print("[green]selfcheck passed[/]")
    return 0


def main(argv: list[str]) -> int:
    from rich.console import Console

    from gadiag_core.registry import load_registry

    args = parser().parse_args(argv)
    registry = load_registry(args.plugins_dir)
    console = Console()
    if not console.is_terminal:  # piped or captured: do not squeeze the tables into 80 columns
        console = Console(width=max(console.width, 132))
    return run_selfcheck(args, registry, console)

