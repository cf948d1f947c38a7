"""PNG plots of a run's per-token alignment (matplotlib, Agg canvas; no pyplot,
so importing this never changes anyone's matplotlib backend).

    alignment_by_position.png   mean cosine against relative position in the
                                rollout (node / rollout length, 10 bins), one
                                panel per objective, a line per teacher; the
                                reference rows dashed in every panel
    alignment_distribution.png  box plots of per-token cosines, a box per row
    correct_vs_incorrect.png    the leaderboard's correct / incorrect means
                                (per-rollout cosines), a pair of bars per row
"""

from __future__ import annotations

import math
from pathlib import Path

from gadiag_core.scoring.alignment import REFERENCE_ROWS
from gadiag_core.store.records import Run

PLOT_FILES = {
    "alignment_by_position.png": "Alignment along the rollout",
    "alignment_distribution.png": "Distribution of per-token alignment",
    "correct_vs_incorrect.png": "Correct vs incorrect rollouts",
}
POSITION_BINS = 10
HELPS, HURTS, NEUTRAL = "#1a9850", "#d73027", "#888888"


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _empty(ax, message: str = "no scored tokens") -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color=NEUTRAL)
    ax.set_xticks([])
    ax.set_yticks([])


def _rollout_lengths(run: Run) -> dict[tuple[str, int], int]:
    lengths = {}
    for r in run.rollouts:
        if "generated_ids" in r:
            lengths[(r["question"], r["rollout"])] = len(r["generated_ids"])
    for r in run.questions:
        if isinstance(r.get("tokens"), int):
            lengths.setdefault((r["question"], r["rollout"]), r["tokens"])
    return lengths


def position_series(run: Run, row: str, bins: int = POSITION_BINS) -> tuple[list[float], list[float], list[int]]:
    """(bin centres, mean cosine, count) of `row` over relative positions; bins without tokens are left out."""
    lengths = _rollout_lengths(run)
    sums, counts = [0.0] * bins, [0] * bins
    for record in run.tokens:
        value = record.get("cos", {}).get(row)
        length = lengths.get((record["question"], record["rollout"]))
        if not _finite(value) or not length:
            continue
        where = min(bins - 1, int(bins * (record["node"] + 0.5) / length))
        sums[where] += value
        counts[where] += 1
    keep = [i for i in range(bins) if counts[i]]
    return [(i + 0.5) / bins for i in keep], [sums[i] / counts[i] for i in keep], [counts[i] for i in keep]


def plot_by_position(run: Run, path: Path) -> Path:
    rows = run.rows()
    teacher_rows = [r for r in rows if r not in REFERENCE_ROWS]
    objectives = list(dict.fromkeys(r.partition("/")[2] for r in teacher_rows)) or ["(none)"]
    teachers = sorted({r.partition("/")[0] for r in teacher_rows})
    fig = _figure(1.6 + 4.6 * len(objectives), 3.8)
    axes = fig.subplots(1, len(objectives), squeeze=False, sharey=True)[0]
    colours = {t: f"C{i % 10}" for i, t in enumerate(teachers)}
    legend = {}
    for ax, objective in zip(axes, objectives):
        drawn = False
        for teacher in teachers:
            x, y, _ = position_series(run, f"{teacher}/{objective}")
            if x:
                (legend[teacher],) = ax.plot(x, y, marker="o", markersize=3, color=colours[teacher], label=teacher)
                drawn = True
        for reference, style in zip(REFERENCE_ROWS, ("--", ":")):
            x, y, _ = position_series(run, reference)
            if x:
                (legend[reference],) = ax.plot(x, y, linestyle=style, color=NEUTRAL, label=reference)
                drawn = True
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_xlim(0, 1)
        ax.set_ylim(-1.05, 1.05)
        ax.set_title(f"objective {objective}", fontsize=10)
        ax.set_xlabel("position in rollout (fraction of its tokens)")
        if not drawn:
            ax.text(0.5, 0.5, "no scored tokens", ha="center", va="center", transform=ax.transAxes, color=NEUTRAL)
    axes[0].set_ylabel("mean per-token cosine")
    if legend:
        fig.legend(list(legend.values()), list(legend), loc="outside right upper", fontsize=8)
    fig.suptitle(f"{run.task_label}: alignment along the rollout", fontsize=11)
    fig.savefig(path)
    return path


def plot_distribution(run: Run, path: Path) -> Path:
    rows = run.rows()
    data = [[v for r in run.tokens if _finite(v := r.get("cos", {}).get(row))] for row in rows]
    shown = [(row, values) for row, values in zip(rows, data) if values]
    fig = _figure(7.5, 1.2 + 0.32 * max(1, len(shown)))
    ax = fig.subplots()
    if shown:
        labels = [f"{row}  (n={len(values)})" for row, values in shown]
        # Best row on top: matplotlib draws the first box at the bottom.
        box = ax.boxplot(
            [values for _, values in reversed(shown)],
            orientation="horizontal",
            tick_labels=list(reversed(labels)),
            showmeans=True,
            patch_artist=True,
            medianprops={"color": "black"},
            meanprops={"marker": "D", "markerfacecolor": "white", "markeredgecolor": "black", "markersize": 4},
        )
        for patch, (row, values) in zip(box["boxes"], reversed(shown)):
            mean = sum(values) / len(values)
            patch.set_facecolor(NEUTRAL if row in REFERENCE_ROWS else (HELPS if mean >= 0 else HURTS))
            patch.set_alpha(0.45)
        ax.axvline(0, color="black", linewidth=0.6)
        ax.set_xlim(-1.05, 1.05)
        ax.set_xlabel("per-token cosine with the ideal gradient (box: quartiles, ◇ mean)")
        ax.tick_params(axis="y", labelsize=8)
    else:
        _empty(ax)
    ax.set_title(f"{run.task_label}: distribution of per-token alignment", fontsize=11)
    fig.savefig(path)
    return path


def plot_correct_vs_incorrect(run: Run, path: Path) -> Path:
    rows = [r for r in run.rows() if run.summary["rows"][r].get("nodes")]
    fig = _figure(7.5, 1.4 + 0.36 * max(1, len(rows)))
    ax = fig.subplots()
    if rows:
        from matplotlib.patches import Patch

        handles = []
        height = 0.38
        for offset, split, colour in ((height / 2, "incorrect", HURTS), (-height / 2, "correct", HELPS)):
            positions, widths = [], []
            for i, row in enumerate(reversed(rows)):
                value = run.summary["rows"][row].get(f"mean_{split}")
                if _finite(value):
                    positions.append(i + offset)
                    widths.append(value)
            n = sum(bool(r.get("correct")) == (split == "correct") for r in run.questions)
            ax.barh(positions, widths, height=height, color=colour, alpha=0.7)
            handles.append(Patch(color=colour, alpha=0.7, label=f"{split} rollouts ({n})"))
        ax.set_yticks(range(len(rows)), list(reversed(rows)), fontsize=8)
        ax.axvline(0, color="black", linewidth=0.6)
        ax.set_xlabel("mean per-rollout cosine (noise-corrected)")
        ax.legend(handles=handles, fontsize=8, loc="best")
    else:
        _empty(ax)
    ax.set_title(f"{run.task_label}: correct vs incorrect rollouts", fontsize=11)
    fig.savefig(path)
    return path


def write_plots(run: Run, folder: str | Path) -> list[Path]:
    """Write the PNG plots into `folder`; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return [
        plot_by_position(run, folder / "alignment_by_position.png"),
        plot_distribution(run, folder / "alignment_distribution.png"),
        plot_correct_vs_incorrect(run, folder / "correct_vs_incorrect.png"),
    ]
