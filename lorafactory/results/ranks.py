"""The rank allocation of a run as a heat map: transformer layers down, module names across, the rank each adapted
module ended with in the cells. Drawn from a record's `variant_summary["ranks"]` ({module name: rank}), which the
rank-budgeting variants (AdaLoRA, IncreLoRA, SoRA, CoDyRA, LoRA-Squeeze) write.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display, and no GUI toolkit to import

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lorafactory.results.record import RunRecord  # noqa: E402

OUTSIDE = "–"
"""The row of modules outside the numbered layers (a pooler, a CNN's stem)."""

_INDEX = re.compile(r"\d+")


def split_name(name: str) -> tuple[str, str]:
    """(layer, module) of a module name: the first all-digit part is the layer and what follows it the module
    (`bert.encoder.layer.3.attention.self.query` → ("3", "attention.self.query")); names without one are
    (OUTSIDE, name)."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if _INDEX.fullmatch(part) and i + 1 < len(parts):
            return part, ".".join(parts[i + 1 :])
    return OUTSIDE, name


def rank_grid(ranks: Mapping[str, int]) -> tuple[list[str], list[str], np.ndarray]:
    """Rows (layers in numeric order, OUTSIDE last), columns (module names in first-seen order) and the ranks, NaN
    where a layer has no such module."""
    cells = {split_name(name): rank for name, rank in ranks.items()}
    numbered = sorted({layer for layer, _ in cells if layer != OUTSIDE}, key=int)
    layers = numbered + ([OUTSIDE] if any(layer == OUTSIDE for layer, _ in cells) else [])
    modules = list(dict.fromkeys(module for _, module in cells))
    grid = np.full((len(layers), len(modules)), np.nan)
    for (layer, module), rank in cells.items():
        grid[layers.index(layer), modules.index(module)] = rank
    return layers, modules, grid


def plot_ranks(ranks: Mapping[str, int], out: str | os.PathLike, title: str = "") -> Path:
    """Draw the heat map of `ranks` ({module name: rank}) into the PNG file `out`; returns its path."""
    if not ranks:
        raise ValueError("no ranks to draw: the variant's summary has an empty `ranks`")
    layers, modules, grid = rank_grid(ranks)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(modules), 1.4 + 0.4 * len(layers)))
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", aspect="auto", vmin=0, vmax=np.nanmax(grid) or 1)
    middle = (np.nanmax(grid) or 1) / 2
    for (i, j), rank in np.ndenumerate(grid):
        if not math.isnan(rank):
            colour = "black" if rank > middle else "white"  # readable on viridis' dark low and light high end
            ax.text(j, i, f"{rank:g}", ha="center", va="center", color=colour, fontsize=8)
    ax.set_xticks(range(len(modules)), modules, rotation=45, ha="right", fontsize=8)
    row_labels = [layer if layer == OUTSIDE else f"layer {layer}" for layer in layers]
    ax.set_yticks(range(len(layers)), row_labels, fontsize=8)
    fig.colorbar(image, ax=ax, label="rank")
    ax.set_title(title or f"rank allocation ({int(np.nansum(grid))} in total)", fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_record_ranks(record: RunRecord | Mapping[str, Any], out: str | os.PathLike) -> Path:
    """The heat map of a run record's `variant_summary["ranks"]`, titled with its model, task and variant."""
    fields = record if isinstance(record, Mapping) else vars(record)
    ranks = (fields.get("variant_summary") or {}).get("ranks")
    if not ranks:
        raise ValueError(f"the record of {fields.get('variant', '?')} has no variant_summary['ranks'] to draw")
    title = f"{fields.get('variant', '')} on {fields.get('model', '')} / {fields.get('task', '')}: " + (
        f"{sum(ranks.values())} ranks in {len(ranks)} modules"
    )
    return plot_ranks(ranks, out, title)
