"""The report of a study (DESIGN §6): students × tasks, the same teachers and
objectives in every cell. Functions over the cells' summaries (summary.json),
so the report can be built, and tested, from hand-made summaries.

    study_matrix(cells)   per cell: the best teacher × objective row with its
                          95% interval, every row's rank and mean, accuracy,
                          the oracle's headroom; Kendall τ between the cells'
                          rankings; the universal-configuration test
    universal_sentence    that test in one sentence
    study_table / print_study / study_html   the terminal and HTML views

A row is "within the interval of the best" in a cell when its mean alignment
is at least the lower end of the best row's 95% bootstrap interval there. A
universal configuration is a row within the interval of the best in every cell.
"""

from __future__ import annotations

import html
import math
from itertools import combinations

from gadiag_core.reports.format import num
from gadiag_core.scoring.alignment import REFERENCE_ROWS


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def kendall_tau(x: list[float], y: list[float]) -> float:
    """Kendall's τ-b of two paired lists (ties allowed); nan with < 2 pairs or
    when one list is constant.

        τ_b = (C − D) / sqrt((C + D + T_x)(C + D + T_y))

    C, D: concordant and discordant pairs; T_x, T_y: pairs tied in x only / y only."""
    if len(x) != len(y):
        raise ValueError("kendall_tau needs paired lists of equal length")
    concordant = discordant = tied_x = tied_y = 0
    for i, j in combinations(range(len(x)), 2):
        dx, dy = x[i] - x[j], y[i] - y[j]
        if dx == 0 and dy == 0:
            continue
        if dx == 0:
            tied_x += 1
        elif dy == 0:
            tied_y += 1
        elif (dx > 0) == (dy > 0):
            concordant += 1
        else:
            discordant += 1
    denominator = math.sqrt((concordant + discordant + tied_x) * (concordant + discordant + tied_y))
    return (concordant - discordant) / denominator if denominator > 0 else float("nan")


def ranks(values: dict[str, float]) -> dict[str, int]:
    """Rank of each row, 1 = highest value; rows with no finite value are left out.
    Ties share the better rank."""
    finite = sorted((v, name) for name, v in values.items() if _finite(v))
    ordered = sorted(finite, key=lambda pair: -pair[0])
    out, previous, rank = {}, None, 0
    for position, (value, name) in enumerate(ordered, start=1):
        if value != previous:
            rank, previous = position, value
        out[name] = rank
    return out


def cell_view(summary: dict) -> dict:
    """What the study reads from one cell's summary: every teacher row's mean
    alignment and interval, its rank, the best row, accuracy and the oracle."""
    rows = {name: row for name, row in summary.get("rows", {}).items() if name not in REFERENCE_ROWS}
    means = {name: row.get("mean_all") for name, row in rows.items()}
    rank = ranks(means)
    best = min(rank, key=lambda name: (rank[name], name)) if rank else None
    interval = rows[best].get("ci_all") if best else None
    if not interval or len(interval) != 2 or not all(_finite(v) for v in interval):
        interval = None  # fewer than 2 questions: no interval, no test
    low = interval[0] if interval else None
    oracle = (summary.get("oracle") or {}).get("all", {})
    ceiling = summary.get("rows", {}).get("noise_ceiling", {}).get("mean_all")
    return {
        "means": means,
        "incorrect": {name: row.get("mean_incorrect") for name, row in rows.items()},
        "correct": {name: row.get("mean_correct") for name, row in rows.items()},
        "ranks": rank,
        "best": best,
        "best_mean": means.get(best) if best else None,
        "best_ci": list(interval) if interval else None,
        # Rows whose mean reaches the lower end of the best row's interval.
        "within": sorted(name for name, v in means.items() if best and _finite(v) and low is not None and v >= low),
        "accuracy": summary.get("accuracy"),
        "rollouts": summary.get("rollouts"),
        "nodes": max((row.get("nodes", 0) for row in rows.values()), default=0),
        "noise_ceiling": ceiling,
        "oracle_headroom": oracle.get("headroom"),
        "oracle_headroom_ci": oracle.get("headroom_ci"),
        "switch_rate": (summary.get("oracle") or {}).get("switch_rate"),
        # Question 1 of the paper: rows better aligned on incorrect than on correct rollouts.
        "incorrect_better": _incorrect_better(rows),
    }


def _incorrect_better(rows: dict) -> str | None:
    """'k/n': of the n rows scored on both splits, k align better on incorrect rollouts."""
    both = [row for row in rows.values() if _finite(row.get("mean_incorrect")) and _finite(row.get("mean_correct"))]
    if not both:
        return None
    return f"{sum(row['mean_incorrect'] > row['mean_correct'] for row in both)}/{len(both)}"


def study_matrix(cells: dict[str, dict], order: list[str] | None = None) -> dict:
    """The study's matrix from {cell label: summary}.

    returns {"cells": [labels], "rows": [teacher rows, best mean rank first],
             "view": {label: cell_view}, "tau": {"a|b": τ over the rows both rank},
             "mean_tau": mean pairwise τ, "universal": [rows within the interval of
             the best in every cell], "coverage": {row: cells where it is within}}"""
    labels = list(order or cells)
    views = {label: cell_view(cells[label]) for label in labels}
    names = sorted({name for view in views.values() for name in view["means"]})

    def mean_rank(name):
        r = [views[label]["ranks"][name] for label in labels if name in views[label]["ranks"]]
        return (sum(r) / len(r) if r else math.inf, name)

    names.sort(key=mean_rank)
    tau = {}
    for a, b in combinations(labels, 2):
        shared = [n for n in names if n in views[a]["ranks"] and n in views[b]["ranks"]]
        tau[f"{a}|{b}"] = kendall_tau([views[a]["means"][n] for n in shared], [views[b]["means"][n] for n in shared])
    finite_tau = [v for v in tau.values() if _finite(v)]
    coverage = {name: [label for label in labels if name in views[label]["within"]] for name in names}
    scored = [label for label in labels if views[label]["best"] is not None and views[label]["best_ci"]]
    universal = [name for name in names if scored and all(name in views[label]["within"] for label in scored)]
    return {
        "cells": labels,
        "rows": names,
        "view": views,
        "tau": tau,
        "mean_tau": sum(finite_tau) / len(finite_tau) if finite_tau else float("nan"),
        "universal": universal,
        "coverage": coverage,
        "cells_with_interval": scored,
    }


def universal_sentence(matrix: dict) -> str:
    """The universal-configuration test in one sentence."""
    scored = matrix["cells_with_interval"]
    n = len(scored)
    if n == 0:
        return "No cell has a best row with an interval yet (too few questions scored), so the universal-configuration test cannot be made."
    missing = [label for label in matrix["cells"] if label not in scored]
    tail = f" ({', '.join(missing)} left out: no interval)" if missing else ""
    if matrix["universal"]:
        rows = matrix["universal"]
        names = ", ".join(rows[:3]) + (f" and {len(rows) - 3} more" if len(rows) > 3 else "")
        return (
            f"Yes: {names} {'is' if len(rows) == 1 else 'are'} within the 95% interval of the best row in all {n} cells{tail}, "
            f"so a single configuration is not ruled out at this budget."
        )
    best = max(matrix["rows"], key=lambda name: (len(matrix["coverage"][name]), -matrix["rows"].index(name)), default=None)
    if best is None:
        return "No teacher row was scored in any cell."
    misses = [label for label in scored if label not in matrix["coverage"][best]]
    return (
        f"No: no row is within the 95% interval of the best in every cell; the closest, {best}, is within it in "
        f"{len(matrix['coverage'][best])} of {n} cells (not in {', '.join(misses)}){tail}."
    )


# ----------------------------------------------------------------------------
# Views


def _interval(pair) -> str:
    if not pair or len(pair) != 2 or not all(_finite(v) for v in pair):
        return "–"
    return f"{pair[0]:+.2f}..{pair[1]:+.2f}"


def matrix_cells(matrix: dict, name: str, bold, star: str, missing: str = "–") -> list[str]:
    """Row `name`'s cell texts, 'rank · mean', one per cell: `star` appended when
    the row is within the best row's interval there, `bold(text)` for the best row."""
    cells = []
    for label in matrix["cells"]:
        view = matrix["view"][label]
        rank = view["ranks"].get(name)
        if rank is None:
            cells.append(missing)
            continue
        text = f"{rank} · {num(view['means'][name])}" + (star if name in view["within"] else "")
        cells.append(bold(text) if name == view["best"] else text)
    return cells


def _coverage(matrix: dict, name: str) -> str:
    return f"{len(matrix['coverage'][name])}/{len(matrix['cells_with_interval'])}"


def study_table(matrix: dict, title: str = "study"):
    """A rich Table: a row per teacher × objective, a column per cell with
    'rank · mean' (bold: the best; '*' within the best's interval)."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column("teacher/objective", no_wrap=True)
    for label in matrix["cells"]:
        table.add_column(label, justify="right", no_wrap=True)
    table.add_column("within best", justify="right", no_wrap=True)
    for name in matrix["rows"]:
        table.add_row(name, *matrix_cells(matrix, name, lambda t: f"[bold]{t}[/bold]", "*"), _coverage(matrix, name))
    table.add_section()
    for label_text, values in fact_rows(matrix):
        table.add_row(label_text, *values, "", style="dim")
    return table


# Per-cell facts under the matrix: (key of cell_view, label, format; None = text, "ci" = interval)
FACTS = (
    ("best", "best row", None),
    ("best_ci", "its 95% CI", "ci"),
    ("accuracy", "accuracy", "{:.0%}"),
    ("nodes", "scored nodes", "{:.0f}"),
    ("noise_ceiling", "noise ceiling", "{:+.2f}"),
    ("incorrect_better", "rows better on incorrect", None),
    ("oracle_headroom", "oracle headroom", "{:+.3f}"),
    ("oracle_headroom_ci", "its 95% CI", "ci"),
    ("switch_rate", "best-row switch rate", "{:.0%}"),
)


def fact_rows(matrix: dict) -> list[tuple[str, list[str]]]:
    out = []
    for key, label_text, fmt in FACTS:
        values = []
        for label in matrix["cells"]:
            value = matrix["view"][label].get(key)
            if fmt is None:
                values.append(str(value or "–"))
            elif fmt == "ci":
                values.append(_interval(value))
            else:
                values.append(num(value, fmt))
        out.append((label_text, values))
    return out


def study_markdown(matrix: dict, title: str) -> str:
    """The report as Markdown (STUDY_DIR/findings.md), for a README or a note."""
    lines = [f"**{title}**", "", "| teacher/objective | " + " | ".join(matrix["cells"]) + " | within best |"]
    lines.append("| --- | " + " | ".join("---:" for _ in matrix["cells"]) + " | ---: |")
    for name in matrix["rows"]:
        lines.append(f"| {name} | " + " | ".join(matrix_cells(matrix, name, lambda t: f"**{t}**", "\\*")) + f" | {_coverage(matrix, name)} |")
    for label_text, values in fact_rows(matrix):
        lines.append(f"| *{label_text}* | " + " | ".join(values) + " | |")
    lines += ["", "rank · mean alignment (per-rollout cosines, noise-corrected); bold: the best row of the cell; \\*: within its 95% interval.", ""]
    lines += tau_lines(matrix)
    lines += ["", universal_sentence(matrix), ""]
    return "\n".join(lines)


def tau_lines(matrix: dict) -> list[str]:
    pairs = ", ".join(f"{key.replace('|', ' vs ')} {num(v, '{:+.2f}')}" for key, v in matrix["tau"].items())
    if not pairs:
        return []
    return [f"rank agreement (Kendall τ-b of the rows' mean alignment): {pairs}; mean {num(matrix['mean_tau'], '{:+.2f}')}"]


def print_study(matrix: dict, title: str, console=None) -> None:
    from rich.console import Console

    console = console or Console()
    if not console.is_terminal:
        console = Console(file=console.file, width=200)
    console.print(study_table(matrix, title))
    console.print("rank · mean alignment per cell; bold = best row, * = within the best row's 95% interval", style="dim", highlight=False)
    for line in tau_lines(matrix):
        console.print(line, highlight=False)
    console.print(universal_sentence(matrix), highlight=False)


def study_html(matrix: dict, title: str, links: dict[str, str] | None = None) -> str:
    """A self-contained HTML page of the study report (`links`: cell -> its run report)."""
    esc = lambda v: html.escape(str(v), quote=True)  # noqa: E731
    links = links or {}
    def cell_head(label: str) -> str:
        if label in links:
            return f"<th><a href=\"{esc(links[label])}\">{esc(label)}</a></th>"
        return f"<th>{esc(label)}</th>"

    head = "".join(cell_head(label) for label in matrix["cells"])
    body_rows = []
    for name in matrix["rows"]:
        cells = []
        for label in matrix["cells"]:
            view = matrix["view"][label]
            rank = view["ranks"].get(name)
            if rank is None:
                cells.append("<td>–</td>")
                continue
            style = "font-weight:700;" if name == view["best"] else ""
            style += "background:#e3f4e8;" if name in view["within"] else ""
            cells.append(f"<td style=\"{style}\">{rank} · {num(view['means'][name])}</td>")
        body_rows.append(f"<tr><td class=\"l\">{esc(name)}</td>{''.join(cells)}<td>{_coverage(matrix, name)}</td></tr>")
    facts = [
        f"<tr class=\"dim\"><td class=\"l\">{label_text}</td>{''.join(f'<td>{esc(v)}</td>' for v in values)}<td></td></tr>"
        for label_text, values in fact_rows(matrix)
    ]
    taus = "".join(f"<li>{esc(line)}</li>" for line in tau_lines(matrix))
    css = (
        "body{font:14px/1.45 system-ui,sans-serif;margin:18px 28px;max-width:1400px}table{border-collapse:collapse}"
        "th,td{padding:3px 9px;border-bottom:1px solid #d2d2d7;text-align:right;white-space:nowrap}.l{text-align:left}"
        ".dim{color:#6e6e73}th{background:#f5f5f7}"
    )
    return (
        f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{esc(title)}</title><style>{css}</style></head><body>"
        f"<h1>{esc(title)}</h1><p class=\"dim\">Rank · mean alignment (per-rollout cosines, noise-corrected) of every teacher × objective in each cell "
        f"(student × task). Bold: the best row; green: within the best row's 95% interval.</p>"
        f"<table><thead><tr><th class=\"l\">teacher/objective</th>{head}<th>within best</th></tr></thead>"
        f"<tbody>{''.join(body_rows)}{''.join(facts)}</tbody></table><ul>{taus}</ul>"
        f"<p><b>{esc(universal_sentence(matrix))}</b></p></body></html>\n"
    )
