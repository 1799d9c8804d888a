"""How sensitive each variant is to its learning rate: the width of the window of rates within one point of its best
score, and the score lost at twice and half its best rate.

The curve is the variant's mean score at each learning rate tried (`Leaderboard.per_lr`), in the task's direction,
joined by straight lines in log₂(lr) (so widths are in octaves, factors of 2). "Its best" is the rate the leaderboard
chose and the score it reports there. The window is the stretch of the curve around that rate that stays within one
point of the score, its ends interpolated where the curve crosses the threshold; where it reaches the end of the grid
without crossing, the width is a lower bound and is flagged (`at_edge`). A rate at which every run diverged is a point
of the curve below any threshold (the window ends at the last rate that trained). The drops at 2× and ½× are read off
the same lines, n/a outside the grid, `inf` when the segment leads to a diverged rate.

One point is 0.01 for metrics on a 0–1 scale (accuracy, F1, MCC, Pearson, Spearman, exact match: the records hold
fractions) and 1.0 for metrics on a 0–100 scale (BLEU, ROUGE-L: sacrebleu's and rouge-score's scale,
`tasks/text_metrics.py`); losses and perplexities have no fixed scale, so one point is 1% of the best value.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from lorafactory.results.aggregate import Leaderboard

POINT = {
    "accuracy": 0.01,
    "f1": 0.01,
    "mcc": 0.01,
    "pearson": 0.01,
    "spearman": 0.01,
    "exact_match": 0.01,
    "bleu": 1.0,
    "rouge_l": 1.0,
}
"""One point of each metric in the units the records hold it in."""
RELATIVE_POINT = 0.01
"""Metrics without a fixed scale (loss, perplexity, any other not in POINT): one point is this fraction of the best."""
WINDOW_COLUMNS = [
    "model",
    "task",
    "variant",
    "primary_metric",
    "lr",
    "point",
    "width",
    "low_lr",
    "high_lr",
    "at_edge",
    "drop_half",
    "drop_double",
    "n_lrs",
]


def one_point(metric: str, best: float) -> float:
    """One point of `metric` near the score `best` (see the module docstring)."""
    return POINT.get(metric, RELATIVE_POINT * abs(best))


def interpolate(x: np.ndarray, y: np.ndarray, at: float) -> float:
    """The piecewise-linear curve through (x, y) at `at`: NaN outside [x₀, x_last], −inf on a segment that ends at
    −inf (a diverged rate)."""
    if at < x[0] or at > x[-1]:
        return math.nan
    i = int(np.searchsorted(x, at, side="right")) - 1
    if i == len(x) - 1 or x[i] == at:
        return float(y[i])
    if np.isinf(y[i]) or np.isinf(y[i + 1]):
        return -math.inf
    t = (at - x[i]) / (x[i + 1] - x[i])
    return float(y[i] + t * (y[i + 1] - y[i]))


def window(x: np.ndarray, y: np.ndarray, best: int, threshold: float) -> tuple[float, float, bool, bool]:
    """The ends of the stretch around x[best] where the curve through (x, y) stays at or above `threshold`, and
    whether each end is the end of the grid (so the true window may be wider)."""

    def walk(step: int) -> tuple[float, bool]:
        i = best
        while 0 <= i + step < len(x):
            following = i + step
            if y[following] < threshold:
                if np.isinf(y[following]):
                    return float(x[i]), False  # diverged next door: the window ends at the last rate that trained
                t = (y[i] - threshold) / (y[i] - y[following])
                return float(x[i] + t * (x[following] - x[i])), False
            i = following
        return float(x[i]), True

    left, left_edge = walk(-1)
    right, right_edge = walk(+1)
    return left, right, left_edge, right_edge


def lr_windows(board: Leaderboard) -> pd.DataFrame:
    """One row per (model, task, variant): the chosen `lr`, one `point` in metric units, the window's `width` in
    octaves and its ends `low_lr`/`high_lr`, `at_edge` (`low`, `high`, `both` or ""), and the drops at ½× and 2× the
    chosen rate in metric units (positive = worse, in the task's direction; NaN outside the grid), and `n_lrs`."""
    rows = []
    diverged = board.diverged
    for cell in board.cells.itertuples():
        sign = 1.0 if cell.direction == "max" else -1.0
        tried = board.per_lr[
            (board.per_lr["model"] == cell.model)
            & (board.per_lr["task"] == cell.task)
            & (board.per_lr["variant"] == cell.variant)
        ]
        curve = dict(zip(tried["lr"], sign * tried["mean"], strict=True))
        if not diverged.empty:
            lost = diverged[
                (diverged["model"] == cell.model)
                & (diverged["task"] == cell.task)
                & (diverged["variant"] == cell.variant)
            ]
            curve.update({lr: -math.inf for lr in lost["lr"] if lr not in curve})
        lrs = np.array(sorted(curve))
        x, y = np.log2(lrs), np.array([curve[lr] for lr in lrs])
        best = int(np.flatnonzero(lrs == cell.lr)[0])
        score = sign * cell.mean
        point = one_point(cell.primary_metric, cell.mean)
        left, right, left_edge, right_edge = window(x, y, best, score - point)
        rows.append(
            {
                "model": cell.model,
                "task": cell.task,
                "variant": cell.variant,
                "primary_metric": cell.primary_metric,
                "lr": cell.lr,
                "point": point,
                "width": right - left,
                "low_lr": 2.0**left,
                "high_lr": 2.0**right,
                "at_edge": {(True, True): "both", (True, False): "low", (False, True): "high"}.get(
                    (left_edge, right_edge), ""
                ),
                "drop_half": score - interpolate(x, y, x[best] - 1),
                "drop_double": score - interpolate(x, y, x[best] + 1),
                "n_lrs": int(np.isfinite(y).sum()),
            }
        )
    return pd.DataFrame(rows, columns=WINDOW_COLUMNS)
