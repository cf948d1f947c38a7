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

    options = summary.get("objective_options", {})
    for name in teacher_rows:
        teacher, _, objective = name.partition("/")
        settings = ", ".join(f"{k}={v}" for k, v in options.get(objective, {}).items())
        add(name, teacher, f"{objective} ({settings})" if settings else objective)
    table.add_section()
    for name in REFERENCE_ROWS:
        if name in rows:
            add(name, name, "reference", style="dim")
    add_oracle_rows(table, summary.get("oracle"))
    return table


def add_oracle_rows(table: Table, oracle: dict | None) -> None:
    """The per-token oracle and the best single row, both chosen on one half of
    â* and scored on the other (gadiag_core.scoring.oracle): comparable with
    each other, not with the align column (scored on the whole estimate)."""
    if not oracle or "all" not in oracle or "oracle" not in oracle["all"]:
        return
    table.add_section()
    splits = [oracle.get(s, {}) for s in ("all", "incorrect", "correct")]
    # Both rows are scored split-half (against one half of â*), the oracle per token.
    for label, what, key in (("oracle ½", "per-token best", "oracle"), ("best single ½", oracle["all"]["best_single"], "single")):
        table.add_row(
            label, what, num(splits[0].get(key)), _interval(splits[0].get(f"{key}_ci")), "",
            num(splits[1].get(key)), num(splits[2].get(key)), "", "", "", "", str(splits[0].get("nodes", "")),
            style="italic",
        )


def oracle_lines(summary: dict) -> list[str]:
    """The oracle's findings in words: headroom, the bias it avoids, switch rate, winners."""
    oracle = summary.get("oracle")
    if not oracle or "all" not in oracle or "oracle" not in oracle["all"]:
        return []
    a = oracle["all"]
    wins = ", ".join(f"{row} {count}" for row, count in list(oracle.get("wins", {}).items())[:4])
    top = ", ".join(f"{row} {count}" for row, count in list(oracle.get("question_top", {}).items())[:4])
    return [
        f"½ split-half: chosen on one half of the ideal estimate, scored on the other "
        f"(incorrect/correct columns: chosen within that split). "
        f"Per-token oracle over {len(oracle['rows'])} rows: {num(a['oracle'])} vs best single row {a['best_single']} "
        f"{num(a['single'])} (both split-half) — headroom {num(a['headroom'], '{:+.3f}')} [{_interval(a.get('headroom_ci'))}]; "
        f"picking and scoring on the same half would claim {num(a['same_half_headroom'], '{:+.3f}')}",
        f"the best row changes at {_pct(oracle.get('switch_rate'))} of consecutive scored tokens "
        f"({oracle.get('switches', 0)}/{oracle.get('pairs', 0)}); tokens won: {wins}; questions won (most tokens): {top}",
    ]


def print_leaderboard(summary: dict, console: Console | None = None) -> None:
    """Print the table; off a terminal (a file, a pipe) use a width it fits in."""
    console = console or Console()
    if not console.is_terminal:
        console = Console(file=console.file, width=160)
    console.print(leaderboard_table(summary))
    for line in oracle_lines(summary):
        console.print(line, highlight=False)
