"""`gadiag-harness report RUN_DIR...`: the leaderboard again, from the files.

One run directory: its leaderboard, as the run printed it. Several: one table
with a row per teacher × objective (and the reference rows) and a column group
per run (labelled by task; by task and directory name when two runs share a
task). A run without summary.json (interrupted) is reported from the records
written so far, and says so.

    --html      also (re)write each run's HTML report and plots (RUN_DIR/report/)
    --parquet   also (re)write each run's Parquet tables (RUN_DIR/*.parquet)
"""

from __future__ import annotations

import argparse
import math

from rich.console import Console
from rich.table import Table

from gadiag_core.scoring.alignment import REFERENCE_ROWS
from gadiag_core.commands.common import ArgumentParser
from gadiag_core.errors import writing
from gadiag_core.store.records import Run, load_run
from gadiag_core.reports.format import num

# The numbers each run contributes to the combined table.
GROUP_COLUMNS = (("align", "mean_all"), ("incorrect", "mean_incorrect"), ("correct", "mean_correct"), ("nodes", "nodes"))


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="gadiag-harness report", description="Print the leaderboard of one run, or one table combining several runs.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (several: one combined table)")
    p.add_argument("--html", action="store_true", help="also write each run's HTML report and plots into RUN_DIR/report/")
    p.add_argument("--parquet", action="store_true", help="also write each run's records as Parquet (RUN_DIR/*.parquet)")
    return p


def group_labels(runs: list[Run]) -> list[str]:
    """A label per run: its task, plus the directory name when tasks repeat."""
    labels = [run.task_label for run in runs]
    return [
        f"{label} · {run.name}" if labels.count(label) > 1 else label
        for label, run in zip(labels, runs)
    ]


def combined_rows(runs: list[Run]) -> list[str]:
    """Every row of any run: teacher rows by their mean alignment over the runs
    (best first), then the reference rows."""
    seen: dict[str, list[float]] = {}
    for run in runs:
        for name, row in run.summary.get("rows", {}).items():
            values = seen.setdefault(name, [])
            value = row.get("mean_all")
            if isinstance(value, (int, float)) and math.isfinite(value):
                values.append(value)

    def best_first(name):
        values = seen[name]
        return -sum(values) / len(values) if values else math.inf

    teacher_rows = sorted((name for name in seen if name not in REFERENCE_ROWS), key=lambda n: (best_first(n), n))
    return teacher_rows + [name for name in REFERENCE_ROWS if name in seen]


def combined_table(runs: list[Run]) -> Table:
    """One table: a row per teacher × objective, a column group per run."""
    labels = group_labels(runs)
    def describe(label: str, run: Run) -> str:
        s = run.summary
        text = (
            f"{label}: {run.path} · student {s.get('student', '?')} · {s.get('questions', 0)} questions, "
            f"{s.get('rollouts', 0)} rollouts, accuracy {num(s.get('accuracy'), '{:.0%}')}"
        )
        if not run.finished:
            text += f" · UNFINISHED: {s.get('rollouts_diagnosed', 0)} of {s.get('rollouts', 0)} rollouts diagnosed"
        return text

    caption = "\n".join(describe(label, run) for label, run in zip(labels, runs))
    table = Table(
        title="gradient alignment · mean per-rollout cosine with the ideal gradient (noise-corrected), per run",
        caption=caption,
        title_justify="left",
        caption_justify="left",
    )
    table.add_column("teacher", justify="left", no_wrap=True)
    table.add_column("objective", justify="left", no_wrap=True)
    for label in labels:
        # The group's label heads its first column; the metric names are the second header line.
        for i, (name, _) in enumerate(GROUP_COLUMNS):
            table.add_column(f"{label if i == 0 else ''}\n{name}", justify="right", no_wrap=True)
    rows = combined_rows(runs)

    def cells(name: str) -> list[str]:
        out = []
        for run in runs:
            row = run.summary.get("rows", {}).get(name)
            for column, key in GROUP_COLUMNS:
                if row is None:
                    out.append("·")
                elif key == "nodes":
                    out.append(str(row.get(key, 0)))
                else:
                    out.append(num(row.get(key)))
        return out

    for name in rows:
        if name in REFERENCE_ROWS:
            continue
        teacher, _, objective = name.partition("/")
        table.add_row(teacher, objective, *cells(name))
    table.add_section()
    for name in rows:
        if name in REFERENCE_ROWS:
            table.add_row(name, "reference", *cells(name), style="dim")
    return table


def _print(console: Console, table: Table) -> None:
    """Print without squeezing columns: off a terminal the width is what the table needs."""
    if not console.is_terminal:
        needed = console.measure(table, options=console.options.update_width(10_000)).maximum
        console = Console(width=max(console.width, needed), file=console.file, force_terminal=False)
    console.print(table)


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    runs = [load_run(path) for path in args.run_dirs]
    console = Console()
    if len(runs) == 1:
        from gadiag_core.reports.leaderboard import leaderboard_notes, leaderboard_table, print_oracle

        run = runs[0]
        if not run.finished:
            Console(stderr=True).print(f"{run.path}: unfinished run (no summary.json); numbers from the records written so far")
        summary = dict(run.summary)
        summary["task_version"] = summary.get("task_version", "?")
        _print(console, leaderboard_table(summary))
        for note in leaderboard_notes(summary):
            console.print(note, highlight=False, markup=False)
        print_oracle(summary, console)  # as the run printed it
    else:
        _print(console, combined_table(runs))
    err = Console(stderr=True)
    for run in runs:
        if args.parquet:
            from gadiag_core.store.records import write_parquet

            with writing(run.path):
                for path in write_parquet(run.path):
                    err.print(f"wrote {path}")
        if args.html:
            from gadiag_core.reports.html_report import write_html_report

            with writing(run.path / "report"):
                err.print(f"wrote {write_html_report(run.path)}")
    return 0
