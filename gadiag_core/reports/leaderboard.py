"""The terminal leaderboard: a row per teacher × objective, then reference rows."""

from __future__ import annotations

import math

from rich.console import Console
from rich.table import Table

from gadiag_core.scoring.alignment import REFERENCE_ROWS
from gadiag_core.reports.format import num


def _interval(pair) -> str:
    """'lo..hi' of a bootstrap interval, '–' when there is none."""
    if not pair or any(v is None or not math.isfinite(v) for v in pair):
        return "–"
    return f"{pair[0]:+.2f}..{pair[1]:+.2f}"


def _pct(value) -> str:
    return num(None if value is None else 100 * value, "{:.0f}%")


def external_teachers_line(summary: dict) -> str:
    """'external teachers: NAME = model (tokenizer …, via bytes, covered teacher mass …), …' or ''."""
    parts = []
    for name, info in (summary.get("teacher_info") or {}).items():
        if not info.get("external"):
            continue
        detail = f"tokenizer {info.get('tokenizer', '?')}, via {info.get('via', '?')}"
        if info.get("covered_mass") is not None:
            detail += f", covered teacher mass {num(info['covered_mass'], '{:.2f}')}, left out {num(info.get('left_out'), '{:.3f}')}"
        parts.append(f"{name} = {info.get('model', '?')} ({detail})")
    return ("external teachers: " + "; ".join(parts)) if parts else ""


def leaderboard_table(summary: dict) -> Table:
    title = (
        f"gradient alignment · task {summary['task']} v{summary['task_version']}\n"
        f"student {summary['student']} · space {summary.get('space_description') or summary['space']} · "
        f"estimator {summary['estimator']}"
    )
    caption = (
        f"{summary['questions']} questions, {summary['rollouts']} rollouts "
        f"({summary['rollouts_correct']} correct, accuracy {_pct(summary['accuracy'])}); "
        f"{summary['budget'].get('continuations', 0):.0f} continuations, "
        f"{summary['budget'].get('sampled_tokens', 0):.0f} sampled tokens, "
        f"{summary['budget'].get('nodes_targeted', 0):.0f}/{summary['budget'].get('nodes_screened', 0):.0f} nodes targeted, "
        f"covered mass {num(summary['budget'].get('mean_covered_mass'), '{:.2f}')}"
    )
    speed = summary.get("throughput")
    if speed and speed.get("sampler_calls"):
        caption += (
            f"\nsampler: {speed['sampled_tokens']} tokens in {num(speed['sampler_seconds'], '{:.1f}')} s "
            f"({num(speed['tokens_per_second'], '{:.0f}')} tokens/s), {speed['sampler_calls']} calls of "
            f"{num(speed['mean_batch_size'], '{:.1f}')} requests on average; "
            f"{_pct(speed['share_outside_sampler'])} of {num(speed['wall_seconds'], '{:.0f}')} s outside the sampler"
        )
    external = external_teachers_line(summary)
    if external:
        caption += "\n" + external
    table = Table(title=title, caption=caption, title_justify="left", caption_justify="left")
    for name, justify in [
        ("teacher", "left"),
        ("objective", "left"),
        ("align", "right"),
        ("95% CI", "right"),
        ("corrected", "right"),
        ("incorrect", "right"),
        ("correct", "right"),
        ("per-question", "right"),
        ("corrected", "right"),
        ("helps", "right"),
        ("hurts", "right"),
        ("nodes", "right"),
    ]:
        # Names never wrap or truncate; numbers are short.
        table.add_column(name, justify=justify, no_wrap=True)

    rows = summary["rows"]
    def best_first(name):
        value = rows[name]["mean_all"]
        return -value if value is not None and math.isfinite(value) else math.inf

    teacher_rows = sorted((name for name in rows if name not in REFERENCE_ROWS), key=best_first)

    def add(name: str, teacher: str, objective: str, **style):
        row = rows[name]
        table.add_row(
            teacher,
            objective,
            num(row["mean_all"]),
            _interval(row.get("ci_all")),
            num(row.get("mean_all_corrected")),
            num(row["mean_incorrect"]),
            num(row["mean_correct"]),
            num(row["mean_question"]),
            num(row.get("mean_question_corrected")),
            _pct(row["helps"]),
            _pct(row["hurts"]),
            str(row["nodes"]),
            **style,
        )

    info = summary.get("teacher_info") or {}
    options = summary.get("objective_options", {})
    for name in teacher_rows:
        teacher, _, objective = name.partition("/")
        external = (info.get(teacher) or {}).get("external")
        settings = ", ".join(f"{k}={v}" for k, v in options.get(objective, {}).items())
        add(name, f"{teacher} ({info[teacher].get('via')})" if external else teacher, f"{objective} ({settings})" if settings else objective)
    table.add_section()
    for name in REFERENCE_ROWS:
        if name in rows:
            add(name, name, "reference", style="dim")
    return table


def print_leaderboard(summary: dict, console: Console | None = None) -> None:
    """Print the table; off a terminal (a file, a pipe) use a width it fits in."""
    console = console or Console()
    if not console.is_terminal:
        console = Console(file=console.file, width=160)
    console.print(leaderboard_table(summary))
