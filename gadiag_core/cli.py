"""The `gadiag-harness` command.

    gadiag-harness [run] [--config harness.toml] [--task T] [--teachers a,b|all] …
    gadiag-harness list [KIND] [--plugins-dir DIR]
    gadiag-harness selfcheck …       (gadiag_core.selfcheck)
    gadiag-harness report RUN_DIR…   (gadiag_core.report)
    gadiag-harness show RUN_DIR …    (gadiag_core.show)

Bad input (unknown names, bad config, missing model) prints one line on stderr
and exits 2; no traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from gadiag_core import config as config_mod
from gadiag_core.errors import UsageError
from gadiag_core.registry import KINDS, load_registry

import importlib

# Subcommands living in their own modules: name -> "module:function", where the
# function takes the remaining argv and returns an exit code (UsageError -> 2).
EXTERNAL_COMMANDS = {
    "selfcheck": "gadiag_core.selfcheck:main",
    "report": "gadiag_core.report:main",
    "show": "gadiag_core.show:main",
}
SUBCOMMANDS = ("run", "list", *EXTERNAL_COMMANDS)


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises UsageError (one line, exit 2) instead of printing usage."""

    def error(self, message):
        raise UsageError(f"{message} (see gadiag-harness {self.prog.split()[-1]} --help)")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plugins-dir", action="append", default=[], metavar="DIR", help="load loose .py plugins from DIR (repeatable)")


def run_parser() -> ArgumentParser:
    p = ArgumentParser(prog="gadiag-harness run", description="Diagnose a student's distillation teachers on a task.")
    p.add_argument("--config", help="harness.toml to read (default: ./harness.toml if present, else built-in defaults)")
    p.add_argument("--task", help="task name (see `gadiag-harness list`)")
    p.add_argument("--data", help="data file or folder for tasks that read one (sets task.data)")
    p.add_argument("--teachers", help="'all' or comma-separated teacher names")
    p.add_argument("--objectives", help="comma-separated objective names")
    p.add_argument("--model", help="student model: alias, HF id, local directory or .gguf file")
    p.add_argument("--temperature", type=float, help="student sampling temperature")
    p.add_argument("--max-new-tokens", type=int, help="student generation limit")
    p.add_argument("--questions", type=int, help="number of questions")
    p.add_argument("--rollouts", type=int, help="student rollouts per question")
    p.add_argument("--seed", type=int, help="run seed")
    p.add_argument("--space", help="gradient space: logits, hidden, params, params:last<N>, params:re:<regex>")
    p.add_argument("--estimator", help="ideal-gradient estimator name")
    p.add_argument("--budget-tokens", type=int, help="estimator: at most this many sampled tokens per rollout (estimator.max_tokens)")
    p.add_argument("--run-budget-tokens", type=int, help="estimator: at most this many sampled tokens in the run (estimator.run_max_tokens)")
    p.add_argument("--budget-continuations", type=int, help="estimator: at most this many continuations per rollout (estimator.max_continuations)")
    p.add_argument("--run-budget-continuations", type=int, help="estimator: at most this many continuations in the run (estimator.run_max_continuations)")
    p.add_argument("--sampler", help="rollout sampler name")
    p.add_argument("--output-dir", help="parent folder of new run directories")
    p.add_argument("--run-dir", help="exact run directory to write")
    p.add_argument("--threads", type=int, help="torch CPU threads (0 = all cores)")
    _add_common(p)
    return p


def cmd_run(argv: list[str]) -> int:
    args = run_parser().parse_args(argv)
    path = args.config
    if path is None and Path("harness.toml").is_file():
        path = "harness.toml"
    overrides = {
        "run.task": args.task,
        "task.data": args.data,
        "run.teachers": args.teachers,
        "run.objectives": args.objectives,
        "student.model": args.model,
        "student.temperature": args.temperature,
        "student.max_new_tokens": args.max_new_tokens,
        "run.questions": args.questions,
        "run.rollouts_per_question": args.rollouts,
        "run.seed": args.seed,
        "run.space": args.space,
        "estimator.name": args.estimator,
        "estimator.max_tokens": args.budget_tokens,
        "estimator.run_max_tokens": args.run_budget_tokens,
        "estimator.max_continuations": args.budget_continuations,
        "estimator.run_max_continuations": args.run_budget_continuations,
        "sampler.name": args.sampler,
        "run.output_dir": args.output_dir,
        "run.run_dir": args.run_dir,
        "run.threads": args.threads,
    }
    config = config_mod.resolve(path, overrides)
    config["run"]["plugins_dirs"] = list(config["run"]["plugins_dirs"]) + list(args.plugins_dir)
    registry = load_registry(config["run"]["plugins_dirs"])

    # Imported here: torch and transformers are slow to import, `list` needs neither.
    from gadiag_core.leaderboard import print_leaderboard
    from gadiag_core.pipeline import run

    run_dir, summary = run(config, registry)
    print_leaderboard(summary, Console())
    Console(stderr=True).print(
        f"records and summary in {run_dir.path}; open {run_dir.path / 'report' / 'index.html'} for the per-token report"
    )
    return 0


def cmd_list(argv: list[str]) -> int:
    p = ArgumentParser(prog="gadiag-harness list", description="Tables of every registered component.")
    p.add_argument("kind", nargs="?", choices=list(KINDS), help="only this kind")
    _add_common(p)
    args = p.parse_args(argv)
    registry = load_registry(args.plugins_dir)
    console = Console()
    for kind in [args.kind] if args.kind else KINDS:
        table = Table(title=f"{kind}s", title_justify="left")
        table.add_column("name", style="bold")
        table.add_column("description")
        table.add_column("from", style="dim")
        for name in registry.names(kind):
            entry = registry.get(kind, name)
            table.add_row(name, entry.description, entry.source)
        console.print(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in SUBCOMMANDS else "run"
    try:
        if command in EXTERNAL_COMMANDS:
            module, _, function = EXTERNAL_COMMANDS[command].partition(":")
            return getattr(importlib.import_module(module), function)(argv)
        return {"run": cmd_run, "list": cmd_list}[command](argv)
    except UsageError as exc:
        print(f"gadiag-harness: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gadiag-harness: interrupted; records written so far are in the run directory", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
