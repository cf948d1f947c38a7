"""`gadiag-harness [run]`: diagnose a student's distillation teachers on a task."""

from __future__ import annotations

from pathlib import Path

from gadiag_core.commands.common import ArgumentParser, add_common

# flag -> the config key it sets (flags are shortcuts for --set)
FLAG_KEYS = {
    "task": "run.task",
    "data": "task.data",
    "teachers": "run.teachers",
    "objectives": "run.objectives",
    "model": "student.model",
    "temperature": "student.temperature",
    "max_new_tokens": "student.max_new_tokens",
    "questions": "run.questions",
    "rollouts": "run.rollouts_per_question",
    "seed": "run.seed",
    "space": "run.space",
    "estimator": "estimator.name",
    "budget_tokens": "estimator.max_tokens",
    "run_budget_tokens": "estimator.run_max_tokens",
    "budget_continuations": "estimator.max_continuations",
    "run_budget_continuations": "estimator.run_max_continuations",
    "sampler": "sampler.name",
    "output_dir": "run.output_dir",
    "run_dir": "run.run_dir",
    "threads": "run.threads",
    "executor": "run.executor",
    "ray_address": "run.ray_address",
    "workers": "run.workers",
}


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="gadiag-harness run", description="Diagnose a student's distillation teachers on a task.")
    p.add_argument("--config", help="harness.toml to read (default: ./harness.toml if present, else built-in defaults)")
    p.add_argument("--task", help="task name (see `gadiag-harness list task`)")
    p.add_argument("--data", help="data file or folder for tasks that read one (sets task.data)")
    p.add_argument("--teachers", help="'all' or comma-separated teacher names")
    p.add_argument("--objectives", help="comma-separated objective names")
    p.add_argument("--model", help="student model: alias, HF id, local directory or .gguf file")
    p.add_argument("--temperature", help="student sampling temperature (> 0)")
    p.add_argument("--max-new-tokens", help="student generation limit")
    p.add_argument("--questions", help="number of questions")
    p.add_argument("--rollouts", help="student rollouts per question")
    p.add_argument("--seed", help="run seed")
    p.add_argument("--space", help="gradient space: logits, hidden, params, params:last<N>, params:re:<regex>")
    p.add_argument("--estimator", help="ideal-gradient estimator name")
    p.add_argument("--budget-tokens", help="estimator.max_tokens: at most this many sampled tokens per rollout")
    p.add_argument("--run-budget-tokens", help="estimator.run_max_tokens: at most this many sampled tokens in the run")
    p.add_argument("--budget-continuations", help="estimator.max_continuations: at most this many continuations per rollout")
    p.add_argument("--run-budget-continuations", help="estimator.run_max_continuations: at most this many continuations in the run")
    p.add_argument("--sampler", help="rollout sampler name")
    p.add_argument("--output-dir", help="parent folder of new run directories")
    p.add_argument("--run-dir", help="exact run directory to write (resumes a run made with the same settings)")
    p.add_argument("--threads", help="torch CPU threads (0 = all cores)")
    p.add_argument("--executor", help="where rollouts are diagnosed: local (default) or ray (needs pip install 'gadiag[ray]')")
    p.add_argument("--ray-address", help="Ray cluster to join with --executor ray: host:port, ray://host:port or auto (default: $RAY_ADDRESS, else a local cluster)")
    p.add_argument("--workers", help="Ray actors holding the models (0 = as many as the cluster's CPUs allow; run.worker_cpus each)")
    p.add_argument(
        "--set", action="append", default=[], metavar="TABLE.KEY=VALUE",
        help="set any config key or plugin option, e.g. --set objectives.jsd.beta=0.9 --set estimator.continuations=8 (repeatable)",
    )
    add_common(p)
    return p


def resolve_config(argv: list[str]):
    """(RunConfig, Registry) from the command line: defaults ← harness.toml ← flags ← --set."""
    from gadiag_core import config as config_mod
    from gadiag_core.registry import load_registry

    args = parser().parse_args(argv)
    path = args.config
    if path is None and Path("harness.toml").is_file():
        path = "harness.toml"
    overrides = {}
    for attr, key in FLAG_KEYS.items():
        value = getattr(args, attr)
        if value is not None:
            # Typed like --set: "0.5" is a number, "true" a boolean, text stays text.
            overrides[key] = value if attr in ("task", "data", "teachers", "objectives", "model", "space", "estimator",
                                               "sampler", "output_dir", "run_dir", "executor", "ray_address") else config_mod.parse_value(value)
    overrides.update(config_mod.parse_set(args.set))
    raw = config_mod.raw_config(path, overrides)
    run_table = raw.setdefault("run", {})
    if not isinstance(run_table, dict):
        from gadiag_core.errors import UsageError

        raise UsageError(f"[run] must be a table of key = value, got {run_table!r}")
    dirs = run_table.get("plugins_dirs", [])
    if isinstance(dirs, str):
        dirs = [dirs]
    run_table["plugins_dirs"] = list(dirs) + list(args.plugins_dir)
    registry = load_registry(run_table["plugins_dirs"] if isinstance(run_table["plugins_dirs"], list) else [])
    return config_mod.validate(raw, registry), registry


def main(argv: list[str]) -> int:
    from rich.console import Console

    config, registry = resolve_config(argv)
    # Imported here: torch and transformers are slow to import.
    from gadiag_core.engine.pipeline import run
    from gadiag_core.reports.leaderboard import print_leaderboard

    run_dir, summary = run(config, registry)
    print_leaderboard(summary, Console())
    Console(stderr=True).print(
        f"records and summary in {run_dir.path}; open {run_dir.path / 'report' / 'index.html'} for the per-token report"
    )
    return 0
