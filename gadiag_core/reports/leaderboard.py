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
        if speed.get("mean_rows_per_step"):  # a decoding stream: its batch is the rows per step
            work = f"{speed['decode_steps']} decoding steps of {num(speed['mean_rows_per_step'], '{:.1f}')} rows on average"
        else:
            work = f"{speed['sampler_calls']} calls of {num(speed['mean_batch_size'], '{:.1f}')} requests on average"
        caption += (
            f"\nsampler: {speed['sampled_tokens']} tokens in {num(speed['sampler_seconds'], '{:.1f}')} s "
            f"({num(speed['tokens_per_second'], '{:.0f}')} tokens/s), {work}; "
            f"{_pct(speed['share_outside_sampler'])} of {num(speed['wall_seconds'], '{:.0f}')} s outside the sampler"
        )
    caption += (
        "\nalign, incorrect, correct: means over all / incorrect / correct rollouts of each rollout's cosine (its vectors "
        "stacked over its tokens) with the Monte-Carlo noise energy of â* removed; token: the mean per-token cosine (SIMEX); "
        "raw: the uncorrected means; 95% CI: bootstrap over questions"
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
        ("raw", "right"),
        ("incorrect", "right"),
        ("correct", "right"),
        ("token", "right"),
        ("95% CI ", "right"),
        ("token raw", "right"),
        ("helps", "right"),
        ("hurts", "right"),
        ("nodes", "right"),
    ]:
        # Names never wrap or truncate; numbers are short.
        table.add_column(name, justify=justify, no_wrap=True)

    rows = summary["rows"]
    def best_first(name):
        value = rows[name].get("mean_all")
        return -value if isinstance(value, (int, float)) and math.isfinite(value) else math.inf

    teacher_rows = sorted((name for name in rows if name not in REFERENCE_ROWS), key=best_first)

    def add(name: str, teacher: str, objective: str, **style):
        row = rows[name]
        table.add_row(
            teacher,
            objective,
            num(row.get("mean_all")),
            _interval(row.get("ci_all")),
            num(row.get("mean_all_raw")),
            num(row.get("mean_incorrect")),
            num(row.get("mean_correct")),
            num(row.get("token_all")),
            _interval(row.get("ci_token_all")),
            num(row.get("token_all_raw")),
            _pct(row.get("helps")),
            _pct(row.get("hurts")),
            str(row.get("nodes", 0)),
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


def oracle_table(summary: dict) -> Table | None:
    """The per-token oracle beside the best single row, both chosen on one half
    of â* and scored on the other (gadiag_core.scoring.oracle): raw cosines
    against a half estimate, comparable with each other, not with the
    leaderboard's align column. None for runs without an oracle."""
    oracle = summary.get("oracle")
    if not oracle or "all" not in oracle or "oracle" not in oracle["all"]:
        return None
    table = Table(title="per-token oracle (split-half: chosen on one half of the ideal estimate, scored on the other)", title_justify="left")
    for name, justify in [("row", "left"), ("chosen", "left"), ("all", "right"), ("95% CI", "right"), ("incorrect", "right"), ("correct", "right"), ("nodes", "right")]:
        table.add_column(name, justify=justify, no_wrap=True)
    splits = [oracle.get(s, {}) for s in ("all", "incorrect", "correct")]
    for label, what, key in (("oracle", "best row per token", "oracle"), ("best single row", oracle["all"]["best_single"], "single")):
        table.add_row(
            label, what, num(splits[0].get(key)), _interval(splits[0].get(f"{key}_ci")),
            num(splits[1].get(key)), num(splits[2].get(key)), str(splits[0].get("nodes", "")),
        )
    return table


def oracle_lines(summary: dict) -> list[str]:
    """The oracle's findings in words: headroom, the bias it avoids, switch rate, winners."""
    oracle = summary.get("oracle")
    if not oracle or "all" not in oracle or "oracle" not in oracle["all"]:
        return []
    a = oracle["all"]
    wins = ", ".join(f"{row} {count}" for row, count in list(oracle.get("wins", {}).items())[:4])
    top = ", ".join(f"{row} {count}" for row, count in list(oracle.get("question_top", {}).items())[:4])
    return [
        f"(incorrect/correct: each split chooses its own best single row.) "
        f"Per-token oracle over {len(oracle['rows'])} rows: {num(a['oracle'])} vs best single row {a['best_single']} "
        f"{num(a['single'])} (both split-half) — headroom {num(a['headroom'], '{:+.3f}')} [{_interval(a.get('headroom_ci'))}]; "
        f"picking and scoring on the same half would claim {num(a['same_half_headroom'], '{:+.3f}')}",
        f"the best row changes at {_pct(oracle.get('switch_rate'))} of consecutive scored tokens "
        f"({oracle.get('switches', 0)}/{oracle.get('pairs', 0)}); tokens won: {wins}; questions won (most tokens): {top}",
    ]


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def nothing_scored_reason(summary: dict) -> str:
    """Why no node was scored, from the counts of the run: what every rollout
    did, and what to change."""
    n = int(summary.get("rollouts") or 0)
    correct = int(summary.get("rollouts_correct") or 0)
    cut = int(summary.get("rollouts_cut") or 0)
    limit = summary.get("max_new_tokens")
    limit_text = f"the max_new_tokens = {limit} limit" if limit else "the token limit"
    if n == 0:
        return "nothing was scored: the run has no rollouts yet"
    cut_text = f", {cut} of them cut at {limit_text}" if cut else ""
    all_of = "the 1 rollout is" if n == 1 else f"all {n} rollouts are"
    eligible = (summary.get("budget") or {}).get("nodes_eligible")
    if eligible == 0:
        return (
            f"nothing was scored: {correct} of {_count(n, 'rollout')} correct, and the student was nearly certain at every "
            "token (1 − π_max below estimator.screen_epsilon), so every ideal vector is provably tiny; lower screen_epsilon"
        )
    if correct == n:
        what = f"{all_of} correct"
    elif correct == 0:
        what = f"{all_of} incorrect{cut_text}"
    else:
        return (
            f"nothing was scored: {correct} of {n} rollouts are correct{cut_text}, but the estimator found no node where "
            "a different token changes the outcome within its budget; raise estimator.continuations or the budget"
        )
    return (
        f"nothing was scored: {what}. When every continuation ends the same way, Q̂ = V̂ at every node and the ideal "
        "gradient is zero; pick questions the student solves sometimes (pass rate 0.2–0.8): "
        + ("raise student.max_new_tokens, " if cut else "")
        + "use easier or harder questions, or more rollouts per question"
    )


def leaderboard_notes(summary: dict) -> list[str]:
    """Lines printed under the table: why nothing was scored, which teachers
    were skipped on how many rollouts (their context did not exist)."""
    notes = []
    rows = summary.get("rows") or {}
    teacher_rows = [name for name in rows if name not in REFERENCE_ROWS]
    if not any((row.get("nodes") or 0) > 0 for row in rows.values()):
        notes.append(nothing_scored_reason(summary))
    elif not teacher_rows:
        notes.append("no teacher row: every teacher was skipped on every rollout (see below), so only the reference rows are defined")
    n = int(summary.get("rollouts_diagnosed", summary.get("rollouts")) or 0)
    for teacher, count in sorted((summary.get("teachers_skipped") or {}).items()):
        notes.append(f"teacher {teacher} skipped on {count} of {_count(n, 'rollout')}: its context does not exist there{_SKIP_WHY.get(teacher, '')}")
    return notes


# Why a built-in context is missing, for the skip notes.
_SKIP_WHY = {
    "self_success": " (no other correct rollout of the question)",
    "solution": " (the task has no worked solution for the question: a JSONL file without solution_field)",
    "other_solution": " (no other question of the run has a worked solution)",
}


def print_leaderboard(summary: dict, console: Console | None = None) -> None:
    """Print the table and its notes; off a terminal (a file, a pipe) use a width it fits in."""
    console = console or Console()
    if not console.is_terminal:
        console = Console(file=console.file, width=160)
    console.print(leaderboard_table(summary))
    for note in leaderboard_notes(summary):
        console.print(note, highlight=False, markup=False)
    print_oracle(summary, console)


def print_oracle(summary: dict, console: Console) -> None:
    """The oracle's table and its lines (nothing for runs without an oracle)."""
    table = oracle_table(summary)
    if table is not None:
        console.print(table)
    for line in oracle_lines(summary):
        console.print(line, highlight=False)
