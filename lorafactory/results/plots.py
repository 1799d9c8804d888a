"""Figures of a leaderboard, as PNG files: learning-rate sensitivity (the study's central figure) and metric vs cost.

Every variant keeps one colour across figures, and every taxonomy axis one marker, so figures read side by side.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display, and no GUI toolkit to import

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402

from lorafactory.results.aggregate import AXES, Leaderboard, Runs, axis_position, format_lr  # noqa: E402
from lorafactory.results.record import RECORD_NAME, read_record  # noqa: E402


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
    """`lr` (metric vs learning rate), `params` (metric vs adapter parameters) or `ranks` (a rank allocation)."""
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
