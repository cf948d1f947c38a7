"""`gadiag-harness study STUDY.toml`: a grid of runs, students × tasks, with the
same teachers and objectives, and one report over the grid (DESIGN §6).

    gadiag-harness study STUDY.toml [--study-dir DIR] [--threads N] [--set k=v] [--report-only] [--resummarize]
    gadiag-harness study --students a,b --tasks x,y [--config harness.toml] …

Each cell is an ordinary, resumable run directory, STUDY_DIR/cells/<student>--<task>/:
a killed study resumes where it stopped (rerun the same command), and a
finished cell (summary.json written) is skipped. The report (terminal,
STUDY_DIR/study.json, STUDY_DIR/report.html and STUDY_DIR/findings.md, the
same as Markdown) is built from the cells'
summaries by gadiag_core.reports.study_report.

STUDY.toml is a harness.toml (its [run], [student], [sampler], [estimator],
[objectives.*], [teachers.*] tables are the base of every cell; a [task] table
applies only to the task named in [run] task) plus a [study] table:

    [study]
    name = "paper"                 # the study directory is output_dir/name (default: the file's name)
    output_dir = "studies"
    include_students = ["smollm2"] # optional: which students, in order (default: every
    include_tasks = ["math"]       # [study.students.*] / [study.tasks.*] table, in file order)

    [study.students.smollm2]       # [student] keys of this student: model, temperature, dtype, …
    model = "smollm2-135m-instruct"
    [study.students.smollm2.tasks.math]   # this student's own [task] options on task `math`
    levels = ["L1", "L2"]
    [study.students.gemma.run]     # this student's own [run] keys (e.g. in_flight for a
    in_flight = 2                  # model whose vocabulary makes each rollout's state large)

    [study.tasks.math]             # a task of the grid: task = the task plugin (default: the
    task = "math"                  # table's name); other keys are its [task] options
    levels = ["L1", "L2", "L3", "L4"]

A student named (in include_students or --students) without a table is a
model spec (alias, HF id, directory); a task without a table is a task name
with its default options.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

from gadiag_core.commands.common import ArgumentParser, add_common
from gadiag_core.errors import UsageError

CELLS_DIR = "cells"
STUDY_KEYS = ("name", "output_dir", "students", "tasks", "include_students", "include_tasks")


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="gadiag-harness study", description="Run a grid of students × tasks and report which teacher is best where.")
    p.add_argument("study_file", nargs="?", help="STUDY.toml: a harness.toml with a [study] table (see the README)")
    p.add_argument("--students", help="comma-separated students (names of [study.students.*] tables, or model specs)")
    p.add_argument("--tasks", help="comma-separated tasks (names of [study.tasks.*] tables, or task names)")
    p.add_argument("--config", help="base harness.toml of every cell when no STUDY.toml is given (default: ./harness.toml if present)")
    p.add_argument("--study-dir", help="the study directory (default: [study] output_dir/name)")
    p.add_argument("--threads", help="torch CPU threads of every cell (0 = all cores)")
    p.add_argument("--set", action="append", default=[], metavar="TABLE.KEY=VALUE", help="set a key of every cell's config (repeatable)")
    p.add_argument("--report-only", action="store_true", help="run nothing: report the cells written so far")
    p.add_argument("--resummarize", action="store_true", help="recompute finished cells' aggregates from their records (after an upgrade of the aggregates)")
    add_common(p)
    return p


def _names(value, where: str) -> list[str]:
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise UsageError(f"{where} must be a list of names, got {value!r}")
    return list(dict.fromkeys(value))


def _safe(name: str) -> str:
    """A name as a directory name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "x"


def study_plan(raw: dict, students_flag: str | None = None, tasks_flag: str | None = None, default_name: str = "study") -> dict:
    """The study's grid from a raw STUDY.toml (or a harness.toml plus flags).

    returns {"name", "output_dir", "base": raw tables without [study],
             "students": {name: [student] keys incl. `tasks`}, "tasks": {name: table},
             "order": [(student, task)]}"""
    raw = copy.deepcopy(raw)
    study = raw.pop("study", {})
    if not isinstance(study, dict):
        raise UsageError(f"[study] must be a table, got {study!r}")
    student_tables = study.get("students", {})
    task_tables = study.get("tasks", {})
    for key, tables in (("students", student_tables), ("tasks", task_tables)):
        if not isinstance(tables, dict):
            raise UsageError(f"study.{key} must be [study.{key}.NAME] tables; list the ones to run with study.include_{key} = [...]")
    for key in study:
        if key not in STUDY_KEYS:
            raise UsageError(f"unknown key study.{key}; keys of [study]: {', '.join(STUDY_KEYS)}")
    students = _names(students_flag or study.get("include_students") or list(student_tables), "study.include_students")
    tasks = _names(tasks_flag or study.get("include_tasks") or list(task_tables), "study.include_tasks")
    if not students:
        raise UsageError("the study names no student: add [study.students.NAME] tables or pass --students a,b")
    if not tasks:
        raise UsageError("the study names no task: add [study.tasks.NAME] tables or pass --tasks x,y")
    for name, table in {**student_tables, **task_tables}.items():
        if not isinstance(table, dict):
            raise UsageError(f"[study.*.{name}] must be a table of key = value, got {table!r}")
    return {
        "name": str(study.get("name") or default_name),
        "output_dir": str(study.get("output_dir", "studies")),
        "base": raw,
        "students": {s: dict(student_tables.get(s, {"model": s})) for s in students},
        "tasks": {t: dict(task_tables.get(t, {})) for t in tasks},
        "order": [(s, t) for s in students for t in tasks],
    }


def cell_label(student: str, task: str) -> str:
    return f"{student} × {task}"


def cell_raw(plan: dict, student: str, task: str, run_dir: Path) -> dict:
    """The raw config of one cell: the base ← the student's [student] keys (and
    its own [run] keys) ← the task and its options ← the student's own options
    for that task."""
    raw = copy.deepcopy(plan["base"])
    run = raw.setdefault("run", {})
    if not isinstance(run, dict):
        raise UsageError(f"[run] must be a table of key = value, got {run!r}")
    student_table = dict(plan["students"][student])
    own_tasks = student_table.pop("tasks", {})
    if not isinstance(own_tasks, dict):
        raise UsageError(f"study.students.{student}.tasks must be a table of [study.students.{student}.tasks.TASK] tables")
    own_run = student_table.pop("run", {})
    if not isinstance(own_run, dict):
        raise UsageError(f"study.students.{student}.run must be a table of [run] keys")
    run.update(own_run)
    raw["student"] = {**raw.get("student", {}), **student_table}
    task_table = dict(plan["tasks"][task])
    plugin = task_table.pop("task", task)
    base_task = raw.pop("task", {})
    options = dict(base_task) if plugin == run.get("task", "math") else {}
    options.update(task_table)
    student_task = own_tasks.get(task, {})
    if not isinstance(student_task, dict):
        raise UsageError(f"[study.students.{student}.tasks.{task}] must be a table of task options")
    options.update(student_task)
    run["task"] = plugin
    raw["task"] = options
    run["run_dir"] = str(run_dir)
    return raw


def resolve_study(argv: list[str]):
    """(plan, study directory, {label: RunConfig}, registry, args) from the command line."""
    from gadiag_core import config as config_mod
    from gadiag_core.registry import load_registry

    args = parser().parse_args(argv)
    if args.study_file is None and not (args.students and args.tasks):
        raise UsageError("give a STUDY.toml, or --students a,b and --tasks x,y (see gadiag-harness study --help)")
    if args.study_file is not None:
        path, default_name = args.study_file, Path(args.study_file).stem
    else:
        path = args.config or ("harness.toml" if Path("harness.toml").is_file() else None)
        default_name = f"{_safe('+'.join(_names(args.students, '--students')))}_x_{_safe('+'.join(_names(args.tasks, '--tasks')))}"
    overrides = config_mod.parse_set(args.set)
    if args.threads is not None:
        overrides["run.threads"] = config_mod.parse_value(args.threads)
    raw = config_mod.raw_config(path, {})
    plan = study_plan(raw, args.students, args.tasks, default_name)
    for dotted, value in overrides.items():
        config_mod.set_dotted(plan["base"], dotted, value)
    study_dir = Path(args.study_dir) if args.study_dir else Path(plan["output_dir"]) / _safe(plan["name"])
    run_table = plan["base"].setdefault("run", {})
    dirs = run_table.get("plugins_dirs", []) if isinstance(run_table, dict) else []
    dirs = ([dirs] if isinstance(dirs, str) else list(dirs)) + list(args.plugins_dir)
    if isinstance(run_table, dict):
        run_table["plugins_dirs"] = dirs
    registry = load_registry(dirs)
    configs = {}
    for student, task in plan["order"]:
        cell_dir = study_dir / CELLS_DIR / f"{_safe(student)}--{_safe(task)}"
        raw_cell = cell_raw(plan, student, task, cell_dir)
        try:
            configs[cell_label(student, task)] = config_mod.validate(raw_cell, registry)
        except UsageError as exc:
            raise UsageError(f"study cell {student} × {task}: {exc}") from None
    return plan, study_dir, configs, registry, args


def check_study_dir(study_dir: Path, plan: dict, configs: dict) -> None:
    """Write STUDY_DIR/study.toml, or check that an existing study has the same grid."""
    from gadiag_core.config import load_toml, to_toml

    grid = {
        "study": {
            "name": plan["name"],
            "students": list(plan["students"]),
            "tasks": list(plan["tasks"]),
            "cells": {label: config.run.run_dir for label, config in configs.items()},
        }
    }
    stored_path = study_dir / "study.toml"
    if stored_path.is_file():
        stored = load_toml(stored_path)
        if stored.get("study", {}).get("cells") != grid["study"]["cells"]:
            raise UsageError(
                f"study directory {study_dir} holds another grid ({', '.join(stored.get('study', {}).get('cells', {}))}): "
                f"rerun the same study, or pick a new --study-dir"
            )
        return
    study_dir.mkdir(parents=True, exist_ok=True)
    stored_path.write_text(to_toml(grid))


def cell_summaries(configs: dict) -> dict:
    """{label: summary} of every cell that has written one (finished cells; an
    unfinished cell with records is summarized from them and marked partial)."""
    from gadiag_core.store.records import load_run

    out = {}
    for label, config in configs.items():
        path = Path(config.run.run_dir)
        if (path / "summary.json").is_file():
            out[label] = json.loads((path / "summary.json").read_text())
        elif (path / "config.toml").is_file():
            out[label] = load_run(path).summary
    return out


def resummarize(path: Path) -> None:
    """Recompute the record-derived parts of a finished cell's summary.json
    (counts, aggregates, oracle) with this version's code; the rest (task
    version, throughput, …) is kept."""
    from gadiag_core.store.records import load_run, record_summary
    from gadiag_core.store.rundir import RunDir

    run = load_run(path)
    summary = dict(run.summary)
    summary.update(record_summary(run.rollouts, run.questions, run.tokens))
    RunDir(path).write_json("summary.json", summary)


def write_report(study_dir: Path, plan: dict, configs: dict, console=None) -> dict:
    """Build the matrix from the cells' summaries, print it, write study.json and report.html."""
    from gadiag_core.reports.study_report import print_study, study_html, study_markdown, study_matrix
    from gadiag_core.store.rundir import RunDir

    summaries = cell_summaries(configs)
    order = [label for label in configs if label in summaries]
    matrix = study_matrix(summaries, order)
    matrix["partial"] = sorted(label for label, s in summaries.items() if s.get("partial"))
    matrix["missing"] = [label for label in configs if label not in summaries]
    title = f"study {plan['name']}: {len(plan['students'])} students × {len(plan['tasks'])} tasks"
    RunDir(study_dir).write_json("study.json", matrix)
    links = {label: str(Path(configs[label].run.run_dir).relative_to(study_dir) / "report" / "index.html") for label in order}
    (study_dir / "report.html").write_text(study_html(matrix, title, links), encoding="utf-8")
    (study_dir / "findings.md").write_text(study_markdown(matrix, title), encoding="utf-8")
    print_study(matrix, title, console)
    if matrix["missing"] or matrix["partial"]:
        from rich.console import Console

        Console(stderr=True).print(
            f"not finished: {', '.join(matrix['partial']) or '–'} (partial); not started: {', '.join(matrix['missing']) or '–'}",
            highlight=False,
        )
    return matrix


def main(argv: list[str]) -> int:
    import time

    from rich.console import Console

    plan, study_dir, configs, registry, args = resolve_study(argv)
    err = Console(stderr=True)
    check_study_dir(study_dir, plan, configs)
    started = time.time()
    if args.report_only and args.resummarize:
        for config in configs.values():
            if (Path(config.run.run_dir) / "summary.json").is_file():
                resummarize(Path(config.run.run_dir))
    if not args.report_only:
        from gadiag_core.engine.pipeline import run
        from gadiag_core.store.rundir import RunDir

        for index, (label, config) in enumerate(configs.items(), start=1):
            path = Path(config.run.run_dir)
            if (path / "summary.json").is_file():
                RunDir(path).check_resumable(config.to_dict())
                if args.resummarize:
                    resummarize(path)
                err.print(f"cell {index}/{len(configs)} {label}: finished, skipped")
                continue
            err.print(f"[bold]cell {index}/{len(configs)} {label}[/bold]")
            run(config, registry, err)
    write_report(study_dir, plan, configs, Console())
    err.print(f"study directory {study_dir}; open {study_dir / 'report.html'} (wall time {time.time() - started:.0f} s)")
    return 0
