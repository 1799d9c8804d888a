"""Figures of a leaderboard, as PNG files: learning-rate sensitivity (the study's central figure) and metric vs cost.

Every variant keeps one colour across figures, and every taxonomy axis one marker, so figures read side by side.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # files only: no display, and no GUI toolkit to import

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402

from lorafactory.results.aggregate import AXES, Leaderboard, Runs, axis_position, format_lr  # noqa: E402
from lorafactory.results.record import RECORD_NAME, read_record  # noqa: E402

if TYPE_CHECKING:
    from lorafactory.results.crossfamily import Study


def format_count(value: float) -> str:
    """Tick labels for parameter counts: 740, 74k, 1.2M (not 7.4×10⁴)."""
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= size:
            return f"{value / size:.3g}{suffix}"
    return f"{value:.3g}"


AXIS_MARKERS = dict(zip(AXES, ("*", "o", "s", "^", "D"), strict=True))
ARROWS = {"max": "↑", "min": "↓"}


@dataclass(frozen=True)
class Plot:
    kind: str
    """`lr` (metric vs learning rate), `params` (metric vs adapter parameters), `ranks` (a rank allocation), `cd` (a
    critical-difference diagram across tasks) or `windows` (learning-rate windows); the last two span every task."""
    model: str
    task: str
    title: str
    path: Path


def make_plots(board: Leaderboard, out_dir: str | os.PathLike) -> list[Plot]:
    """Both figures for every (model, task) of the leaderboard, written into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    colours = variant_colours(board)
    plots = []
    for task in board.tasks.itertuples():
        plots.append(lr_sensitivity(board, task.model, task.task, out_dir, colours))
        plots.append(metric_vs_params(board, task.model, task.task, out_dir))
    return plots


def variant_colours(board: Leaderboard) -> dict[str, tuple[float, ...]]:
    names = list(dict.fromkeys(board.variants["variant"]))
    palette = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    return {name: palette(i % palette.N) for i, name in enumerate(names)}


def lr_sensitivity(
    board: Leaderboard, model: str, task: str, out_dir: Path, colours: dict[str, tuple[float, ...]]
) -> Plot:
    """Metric against learning rate (log scale), one line per variant with std-over-seeds error bars; the chosen lr
    is circled."""
    per_lr = board.per_lr[(board.per_lr["model"] == model) & (board.per_lr["task"] == task)]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant in board.variant_rows(model).itertuples():
        points = per_lr[per_lr["variant"] == variant.variant].sort_values("lr")
        if points.empty:
            continue
        colour = colours[variant.variant]
        ax.errorbar(
            points["lr"],
            points["mean"],
            yerr=points["std"].fillna(0.0),
            color=colour,
            capsize=3,
            label=_label(variant.variant, variant.baseline),
            marker=AXIS_MARKERS.get(variant.taxonomy, "X"),
            linestyle="--" if variant.baseline else "-",
        )
        chosen = board.cell(model, task, variant.variant)
        ax.scatter([chosen["lr"]], [chosen["mean"]], s=160, facecolors="none", edgecolors=[colour])
    # Diverged runs have no score: a cross on the bottom edge, in the variant's colour, instead of a low point.
    diverged = board.diverged
    if not diverged.empty:
        diverged = diverged[(diverged["model"] == model) & (diverged["task"] == task)]
    if not diverged.empty:
        bottom = ax.get_ylim()[0]
        for name, group in diverged.groupby("variant"):
            ax.scatter(
                group["lr"], [bottom] * len(group), marker="x", s=70, color=colours.get(name, "black"), clip_on=False
            )
        ax.scatter([], [], marker="x", color="black", label="diverged (no score)")
        ax.set_ylim(bottom=bottom)
    ax.set_xscale("log")
    # Tick the learning rates that were tried, written as in configs: log-scale minor labels would overlap.
    tried = sorted({*per_lr["lr"].unique(), *(diverged["lr"].unique() if not diverged.empty else ())})
    ax.set_xticks(tried, [format_lr(lr) for lr in tried])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("learning rate")
    ax.set_ylabel(_metric_label(board, model, task))
    title = f"{task} ({model}): learning-rate sensitivity"
    return _save(fig, ax, title, Plot("lr", model, task, title, out_dir / _file_name("lr", model, task)))


def metric_vs_params(board: Leaderboard, model: str, task: str, out_dir: Path) -> Plot:
    """Metric at each variant's best lr against its adapter parameters (log scale), marker and colour by axis."""
    cells = board.cells[(board.cells["model"] == model) & (board.cells["task"] == task)]
    points = cells.merge(board.variant_rows(model)[["variant", "taxonomy", "adapter_params"]], on="variant")
    points = points[points["adapter_params"] > 0].sort_values("taxonomy", key=lambda axes: axes.map(axis_position))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    axis_colours = plt.get_cmap("tab10")
    for axis, group in points.groupby("taxonomy", sort=False):
        ax.errorbar(
            group["adapter_params"],
            group["mean"],
            yerr=group["std"].fillna(0.0),
            linestyle="none",
            marker=AXIS_MARKERS.get(axis, "X"),
            markersize=8,
            capsize=3,
            label=axis or "unclassified",
            color=axis_colours(axis_position(axis)),
        )
    # Variants with the same parameter count share an x: stack their labels there, one line each, beside the points.
    for _, same_x in points.groupby("adapter_params"):
        for i, point in enumerate(same_x.sort_values("mean", ascending=False).itertuples()):
            ax.annotate(
                point.variant,
                (point.adapter_params, point.mean),
                textcoords="offset points",
                xytext=(7, 9 - 11 * i),
                fontsize=8,
                arrowprops={"arrowstyle": "-", "lw": 0.4, "alpha": 0.5} if i else None,
            )
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: format_count(value)))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("adapter parameters")
    ax.set_ylabel(_metric_label(board, model, task))
    title = f"{task} ({model}): metric at the best lr vs parameters"
    return _save(fig, ax, title, Plot("params", model, task, title, out_dir / _file_name("params", model, task)))


def _save(fig: plt.Figure, ax: plt.Axes, title: str, plot: Plot) -> Plot:
    ax.set_title(title, fontsize=11)
    ax.grid(True, which="major", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    fig.savefig(plot.path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return plot


def _label(variant: str, baseline: bool) -> str:
    return f"{variant} (baseline)" if baseline else variant


def _metric_label(board: Leaderboard, model: str, task: str) -> str:
    info = board.task_rows(model).set_index("task").loc[task]
    return f"{board.metric} {info['primary_metric']} {ARROWS[info['direction']]}"


def _file_name(kind: str, model: str, task: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{kind}-{model}-{task}") + ".png"


def rank_maps(board: Leaderboard, runs: Runs, out_dir: str | os.PathLike) -> list[Plot]:
    """For every rank-budgeting variant of the leaderboard (its record's summary has `ranks`): the heat map of the
    ranks its run at the chosen learning rate ended with (the lowest seed), one figure per (model, task, variant)."""
    from lorafactory.results.ranks import plot_ranks

    out_dir = Path(out_dir)
    plots = []
    ok = runs.ok
    for cell in board.cells.itertuples():
        chosen = ok[
            (ok["model"] == cell.model)
            & (ok["task"] == cell.task)
            & (ok["variant"] == cell.variant)
            & (ok["lr"] == cell.lr)
        ].sort_values("seed")
        if chosen.empty:
            continue
        record = read_record(Path(chosen.iloc[0]["path"]) / RECORD_NAME)
        ranks = (record.variant_summary or {}).get("ranks")
        if not ranks:
            continue
        title = (
            f"{cell.task} ({cell.model}): {cell.variant}'s rank allocation at lr {format_lr(cell.lr)}, seed "
            f"{record.seed}: {sum(ranks.values())} ranks in {len(ranks)} modules"
        )
        path = out_dir / _file_name(f"ranks-{cell.variant}", cell.model, cell.task)
        plots.append(Plot("ranks", cell.model, cell.task, title, plot_ranks(ranks, path, title)))
    return plots


# --- the study: critical-difference diagram and learning-rate windows ------------------------------------------------

CD_FILE, WINDOWS_FILE = "cd_diagram.png", "lr_windows.png"


def study_figures(study: Study, out_dir: str | os.PathLike) -> list[Plot]:
    """The critical-difference diagram (when the study has a rank test) and the learning-rate windows (when some
    variant tried more than one rate), written into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = []
    test = study.rank_test
    if test is not None:
        title = (
            f"Average ranks over {test.tasks} tasks (1 = best); bars join variants within the Nemenyi critical "
            f"difference (α = {test.alpha:g})"
        )
        ranks = [float(r) for r in test.average_ranks]
        cd = test.critical_difference
        plots.append(cd_diagram(study.rank_variants, ranks, cd, study.rank_cliques, out_dir / CD_FILE, title))
    if (study.windows["n_lrs"] >= 2).any():
        plots.append(lr_window_plot(study.windows, list(study.variants["variant"]), out_dir / WINDOWS_FILE))
    return plots


def cd_diagram(
    names: list[str], ranks: list[float], cd: float, groups: list[tuple[str, ...]], out: str | os.PathLike, title: str
) -> Plot:
    """Demšar's (2006, Fig. 1) critical-difference diagram: an axis of average ranks with the best (1) on the right,
    each variant hanging from its rank to a label, the better half to the right and the rest to the left; thick bars
    join the groups whose ranks differ by less than the critical difference, drawn above the axis as a scale."""
    order = sorted(range(len(names)), key=lambda i: ranks[i])
    k = len(names)
    right, left = order[: (k + 1) // 2], order[(k + 1) // 2 :][::-1]  # labels nearest the axis ends come first
    rows = max(len(right), len(left))
    bar_step, label_step = 0.12, 0.3
    bars_bottom = -0.2 - bar_step * len(groups)
    fig, ax = plt.subplots(figsize=(8, 1.6 + 0.3 * rows + 0.12 * len(groups)))
    lowest, highest = 1, max(k, 2)
    ax.plot([lowest, highest], [0, 0], color="black", lw=1)
    for tick in range(lowest, highest + 1):
        ax.plot([tick, tick], [0, 0.08], color="black", lw=1)
        ax.text(tick, 0.13, str(tick), ha="center", va="bottom", fontsize=9)
    # The CD as a scale bar above the axis, at the worse end.
    ax.plot([highest, highest - cd], [0.55, 0.55], color="black", lw=1.5)
    for end in (highest, highest - cd):
        ax.plot([end, end], [0.5, 0.6], color="black", lw=1.5)
    ax.text(highest - cd / 2, 0.63, f"CD = {cd:.2f}", ha="center", va="bottom", fontsize=9)
    margin = 0.15 * (highest - lowest) + 0.4
    for side, members, edge, align in ((1, right, lowest - margin, "left"), (-1, left, highest + margin, "right")):
        for row, i in enumerate(members):
            y = bars_bottom - label_step * (row + 1)
            ax.plot([ranks[i], ranks[i], edge], [0, y, y], color="dimgray", lw=0.8)
            offset = -0.05 if side == 1 else 0.05
            ax.text(edge + offset, y, f"{names[i]} ({ranks[i]:.2f})", ha=align, va="center", fontsize=9)
    for row, group in enumerate(groups):
        group_ranks = [ranks[names.index(name)] for name in group]
        y = -0.2 - bar_step * row
        ax.plot([min(group_ranks) - 0.03, max(group_ranks) + 0.03], [y, y], color="black", lw=3.5)
    ax.set_xlim(highest + margin + 0.1, lowest - margin - 0.1)  # reversed: rank 1, the best, on the right
    ax.set_ylim(bars_bottom - label_step * (rows + 0.6), 0.85)
    ax.axis("off")
    ax.set_title(title, fontsize=10)
    out = Path(out)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Plot("cd", "", "", title, out)


def lr_window_plot(windows: pd.DataFrame, order: list[str], out: str | os.PathLike) -> Plot:
    """Each variant's learning-rate window (octaves within one point of its best) on every (model, task): one row per
    variant in `order`, one marker per task; a hollow marker with an arrow is a lower bound (the window reached the
    end of the grid)."""
    windows = windows[windows["n_lrs"] >= 2]
    variants = [v for v in order if v in set(windows["variant"])]
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.32 * len(variants)))
    palette = plt.get_cmap("tab10")
    tasks = list(dict.fromkeys(zip(windows["model"], windows["task"], strict=True)))
    for t, (model, task) in enumerate(tasks):
        here = windows[(windows["model"] == model) & (windows["task"] == task)]
        y = [variants.index(v) + (t - (len(tasks) - 1) / 2) * 0.12 for v in here["variant"]]
        edge = (here["at_edge"] != "").to_numpy()
        colour = palette(t % palette.N)
        label = f"{task} ({model})"
        ax.scatter(here["width"][~edge], [v for v, e in zip(y, edge, strict=True) if not e], color=colour, label=label)
        if edge.any():
            ax.scatter(
                here["width"][edge],
                [v for v, e in zip(y, edge, strict=True) if e],
                facecolors="none",
                edgecolors=[colour],
                marker=">",
                label=None if (~edge).any() else label,
            )
    ax.set_yticks(range(len(variants)), variants, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("learning-rate window within one point of the best (octaves); ▷ = at the grid's edge, wider")
    ax.set_xlim(left=0)
    title = "Learning-rate sensitivity: how far the rate can move at a cost of one point"
    return _save(fig, ax, title, Plot("windows", "", "", title, Path(out)))
