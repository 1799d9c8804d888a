"""From run records to a leaderboard: load every `result.json` under a folder, pick each variant's best learning rate
per task and rank the variants.

A variant's score on a task is the mean over seeds at its best learning rate, where "best" follows the direction the
task declared in its records (never a hand-kept list). Ties go to the smaller learning rate, and equal means share a
rank. Failed and diverged runs are kept apart: they are listed, never averaged.

The best learning rate is chosen on the records' `selection_metric` (held-out training examples, or validation for
tasks reported on a test set) and the score reported is the other split's: choosing and reporting on the same small
split would favour whichever variant has more, noisier points. Records without a selection metric (older ones) are
chosen on the reported split, and the report says so.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from lorafactory.results.record import RECORD_NAME, RunRecord, read_record

log = logging.getLogger(__name__)

AXES = ("baseline", "rank", "optimization", "initialization", "moe")
"""Taxonomy axes in display order; any other axis comes after these."""
METRICS = {"final": "final_metric", "best": "best_metric"}
"""`--metric` choices and the record field each one reads."""
RECORD_COLUMNS = (
    "status",
    "name",
    "model",
    "task",
    "variant",
    "taxonomy",
    "baseline",
    "seed",
    "lr",
    "lr_scale",
    "primary_metric",
    "direction",
    "final_metric",
    "best_metric",
    "selection_metric",
    "selection_source",
    "adapter_params",
    "trainable_params",
    "total_params",
    "step_time_s",
    "throughput",
    "peak_memory_mb",
    "activation_mb",
    "train_state_mb",
    "memory_mb",
    "chance_metric",
    "resumed",
    "wall_time_s",
    "data_note",
    "error",
    "run_dir",
    "path",
)
COST_COLUMNS = ("adapter_params", "trainable_params", "step_time_s", "memory_mb")
"""`memory_mb` is what the method costs, measured on one step: activations saved for backward plus the trained state
(parameters, gradients, optimizer state). The process's peak RSS (`peak_memory_mb`) is mostly the interpreter and the
frozen model, and is kept in the records only."""
_CELL_KEYS = ["model", "task", "variant"]


# --- loading ---------------------------------------------------------------------------------------------------------


@dataclass
class Runs:
    """Every readable record under a folder, one row per run, and the record files that could not be read."""

    root: Path
    records: pd.DataFrame
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def ok(self) -> pd.DataFrame:
        return self.records[self.records["status"] == "ok"]

    @property
    def problems(self) -> pd.DataFrame:
        """Failed and diverged runs."""
        return self.records[self.records["status"] != "ok"]


def load_runs(root: str | os.PathLike) -> Runs:
    """Read every `result.json` below `root`. A corrupt or invalid record is skipped with a warning naming the file."""
    root = Path(root)
    rows, skipped = [], []
    for path in sorted(root.rglob(RECORD_NAME)):
        try:
            rows.append(_record_row(read_record(path), path.parent))
        except (OSError, ValueError, TypeError) as err:
            log.warning("skipping unreadable record %s: %s", path, err)
            skipped.append((path, str(err)))
    return Runs(root, pd.DataFrame(rows, columns=list(RECORD_COLUMNS)), skipped)


def variant_label(variant: str, overrides: list[str] | None) -> str:
    """The variant as a leaderboard names it: its registry name, followed by the settings of its own the run was
    launched with (`lora[r=16]` for `variant.r=16`), so that runs of one variant in different configurations (a rank
    sweep, an Optuna search over the rank) are never pooled as if they were seeds of one. `variant.lr_mult` only
    moves the learning rate, which the leaderboard already tells apart. A file given as a setting (icm_lora's
    `generator`) is named by its file name: the folder it was read from is where the run happened to look, and an
    absolute path would fill the table's first column."""
    settings = []
    for override in overrides or []:
        key, _, value = override.lstrip("+~").partition("=")
        if key.startswith("variant.") and key != "variant.lr_mult":
            if "/" in value:
                value = Path(value).name
            settings.append(f"{key.removeprefix('variant.')}={value}")
    return f"{variant}[{','.join(sorted(settings))}]" if settings else variant


def _record_row(record: RunRecord, folder: Path) -> dict[str, Any]:
    row = {name: getattr(record, name) for name in RECORD_COLUMNS if hasattr(record, name)}
    row["variant"] = variant_label(record.variant, record.overrides)
    # The reference row is the baseline in its default configuration; its other configurations are compared to it.
    row["baseline"] = ("baseline" in record.tags or record.taxonomy == "baseline") and row["variant"] == record.variant
    if record.activation_mb is not None and record.train_state_mb is not None:
        row["memory_mb"] = record.activation_mb + record.train_state_mb
    row["lr_scale"] = (record.config.get("optim") or {}).get("lr_scale")
    row["path"] = str(folder)
    return row


# --- aggregation -----------------------------------------------------------------------------------------------------


@dataclass
class Leaderboard:
    """The aggregated study. All frames are long-form and numeric; renderers decide how they look.

    - `per_lr`: one row per (model, task, variant, lr): mean, std and n of the metric over ok seeds.
    - `cells`: one row per (model, task, variant) at the variant's best lr, with `rank` (1 = best) and `best`.
    - `variants`: one row per (model, variant) in display order: taxonomy, baseline, avg_rank, n_tasks, costs.
    - `tasks`: one row per (model, task): primary_metric, direction, data_note.
    """

    metric: str
    per_lr: pd.DataFrame
    cells: pd.DataFrame
    variants: pd.DataFrame
    tasks: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    diverged: pd.DataFrame = field(default_factory=pd.DataFrame)
    """One row per diverged run (model, task, variant, lr, seed): drawn apart in the learning-rate figures."""
    selection_notes: list[str] = field(default_factory=list)
    """Per (model, task): which split chose the learning rates (see `best_lr`)."""

    def models(self) -> list[str]:
        return sorted(self.variants["model"].unique())

    def task_rows(self, model: str) -> pd.DataFrame:
        return self.tasks[self.tasks["model"] == model]

    def variant_rows(self, model: str) -> pd.DataFrame:
        return self.variants[self.variants["model"] == model]

    def cell(self, model: str, task: str, variant: str) -> pd.Series | None:
        found = self.cells[
            (self.cells["model"] == model) & (self.cells["task"] == task) & (self.cells["variant"] == variant)
        ]
        return None if found.empty else found.iloc[0]

    def sensitivity(self) -> pd.DataFrame:
        """Per (model, task): how far apart the variants are at their best learning rates (`variant_spread`), and how
        far the learning rate moves each variant (`lr_range`: max − min of its per-lr means; median and largest over
        variants). The LoRAFactory study's central finding is that the second usually exceeds the first. Both are
        about the adapters: the reference rows (full fine-tuning, the head alone) are left out where two adapters
        remain (`baselines_aside`), or the head alone would set the spread."""
        lr_range = self.per_lr.groupby([*_CELL_KEYS])["mean"].agg(lambda m: m.max() - m.min()).rename("lr_range")
        lr_range = lr_range.reset_index()
        reference = self.variants.loc[self.variants["taxonomy"] == "baseline", ["model", "variant"]]
        reference = set(reference.itertuples(index=False, name=None))
        rows = []
        for (model, task), cells in self.cells.groupby(["model", "task"], sort=True):
            ranges = lr_range[(lr_range["model"] == model) & (lr_range["task"] == task)]
            adapter = [(model, v) not in reference for v in cells["variant"]]
            aside = sum(adapter) >= 2 and not all(adapter)
            if aside:
                cells = cells[adapter]
                ranges = ranges[[(model, v) not in reference for v in ranges["variant"]]]
            widest = ranges.loc[ranges["lr_range"].idxmax()]
            rows.append(
                {
                    "model": model,
                    "task": task,
                    "variant_spread": cells["mean"].max() - cells["mean"].min(),
                    "lr_range_median": ranges["lr_range"].median(),
                    "lr_range_max": widest["lr_range"],
                    "lr_range_max_variant": widest["variant"],
                    "baselines_aside": aside,
                }
            )
        return pd.DataFrame(rows)

    def tidy(self) -> pd.DataFrame:
        """One row per (model, task, variant) with everything numeric: what `leaderboard.csv` holds."""
        order = self.variants.reset_index(drop=True).reset_index(names="_order")
        table = (
            self.cells.drop(columns=["score"])
            .merge(order, on=["model", "variant"])
            .merge(self.tasks[["model", "task", "data_note"]], on=["model", "task"])
            .sort_values(["model", "task", "_order"])
            .rename(columns={"taxonomy": "axis"})
            .assign(metric=self.metric)
        )
        columns = [
            "model",
            "task",
            "primary_metric",
            "direction",
            "metric",
            "axis",
            "variant",
            "baseline",
            "mean",
            "std",
            "n",
            "lr",
            "lr_scale",
            "rank",
            "best",
            "avg_rank",
            "n_tasks",
            *COST_COLUMNS,
            "data_note",
        ]
        return table[columns].reset_index(drop=True)


def aggregate(runs: Runs, metric: str = "final") -> Leaderboard:
    """Best-lr mean ± std per (model, task, variant), ranks, average ranks and costs from the ok runs."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
    ok = runs.ok.dropna(subset=[METRICS[metric]])
    tasks = task_info(ok)
    per_lr = per_lr_stats(ok, METRICS[metric], tasks)
    cells = rank_cells(best_lr(per_lr))
    notes = _declaration_notes(ok, tasks) + _mixed_config_notes(ok) + _grid_edge_notes(per_lr, cells)
    notes += _chance_notes(ok, cells)
    diverged = runs.records[runs.records["status"] == "diverged"][[*_CELL_KEYS, "lr", "seed"]]
    return Leaderboard(
        metric,
        per_lr,
        cells,
        variant_summary(ok, cells),
        tasks,
        notes,
        diverged.reset_index(drop=True),
        _selection_notes(ok, cells),
    )


def task_info(ok: pd.DataFrame) -> pd.DataFrame:
    """Per (model, task): the primary metric, its direction and any data note, as the records declare them.

    Records that disagree (e.g. written before a task changed its metric) are resolved by majority."""
    rows = []
    for (model, task), group in ok.groupby(["model", "task"], sort=True):
        primary_metric, direction = group[["primary_metric", "direction"]].value_counts().index[0]
        data_notes = group["data_note"].dropna().unique()
        rows.append(
            {
                "model": model,
                "task": task,
                "primary_metric": primary_metric,
                "direction": direction,
                "data_note": "; ".join(data_notes) if len(data_notes) else None,
            }
        )
    return pd.DataFrame(rows, columns=["model", "task", "primary_metric", "direction", "data_note"])


def per_lr_stats(ok: pd.DataFrame, column: str, tasks: pd.DataFrame) -> pd.DataFrame:
    """Mean, sample std and n of `column` over seeds, per (model, task, variant, lr), with the task's direction."""
    stats = (
        ok.groupby([*_CELL_KEYS, "lr"], sort=True)
        .agg(
            mean=(column, "mean"),
            std=(column, "std"),
            n=(column, "count"),
            lr_scale=("lr_scale", "first"),
            selection_mean=("selection_metric", "mean"),
            selection_n=("selection_metric", "count"),
        )
        .reset_index()
    )
    stats = stats.merge(tasks[["model", "task", "primary_metric", "direction"]], on=["model", "task"])
    # One signed score lets max- and min-tasks share the same "higher is better" code below.
    sign = stats["direction"].map({"max": 1.0, "min": -1.0})
    stats["score"] = sign * stats["mean"]
    stats["selection_score"] = sign * stats["selection_mean"]
    return stats


def best_lr(per_lr: pd.DataFrame) -> pd.DataFrame:
    """Each (model, task, variant) at the lr with the best mean on the selection split when every run of the cell
    has one (`chosen_on` = "selection"), else on the reported metric (`chosen_on` = "reported"); ties go to the
    smaller lr."""
    by_lr = per_lr.sort_values([*_CELL_KEYS, "lr"]).copy()
    # Every ok run of the cell carries a selection metric (n counts them, at least 1 per learning rate).
    complete = (by_lr["selection_n"] == by_lr["n"]).groupby([by_lr[k] for k in _CELL_KEYS]).transform("all")
    by_lr["chosen_on"] = complete.map({True: "selection", False: "reported"})
    by_lr["_choice"] = by_lr["selection_score"].where(complete, by_lr["score"])
    best = by_lr.loc[by_lr.groupby(_CELL_KEYS)["_choice"].idxmax()]
    return best.drop(columns="_choice").reset_index(drop=True)


def rank_cells(cells: pd.DataFrame) -> pd.DataFrame:
    """Rank variants within each (model, task): 1 is best; equal scores share the better rank."""
    cells = cells.copy()
    cells["rank"] = cells.groupby(["model", "task"])["score"].rank(method="min", ascending=False).astype("Int64")
    cells["best"] = cells["rank"] == 1
    return cells


def variant_summary(ok: pd.DataFrame, cells: pd.DataFrame) -> pd.DataFrame:
    """Per (model, variant), in display order: taxonomy, baseline flag, average rank over tasks and median costs."""
    costs = ok.groupby(["model", "variant"]).agg(
        taxonomy=("taxonomy", "first"),
        baseline=("baseline", "any"),
        **{name: (name, "median") for name in COST_COLUMNS},
    )
    ranks = cells.groupby(["model", "variant"])["rank"].agg(avg_rank="mean", n_tasks="count")
    table = costs.join(ranks, how="inner").reset_index()
    table["avg_rank"] = table["avg_rank"].astype(float)
    table["_axis"] = table["taxonomy"].map(axis_position)
    table = table.sort_values(
        ["model", "_axis", "taxonomy", "baseline", "avg_rank", "variant"],
        ascending=[True, True, True, False, True, True],
    )
    return table.drop(columns="_axis").reset_index(drop=True)


def format_lr(lr: float) -> str:
    """`3e-4`, `1.5e-3`: how learning rates are written in configs and papers."""
    mantissa, exponent = f"{lr:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def axis_position(axis: str) -> int:
    """Where a taxonomy axis goes in tables: the known axes in their order, then any other."""
    return AXES.index(axis) if axis in AXES else len(AXES)


def _declaration_notes(ok: pd.DataFrame, tasks: pd.DataFrame) -> list[str]:
    declared = ok.groupby(["model", "task"])[["primary_metric", "direction"]].nunique().max(axis=1)
    return [
        f"{row.model} {row.task}: records disagree on the metric or its direction; using the majority, "
        f"{row.primary_metric} ({row.direction})."
        for row in tasks.itertuples()
        if declared[(row.model, row.task)] > 1
    ]


def _selection_notes(ok: pd.DataFrame, cells: pd.DataFrame) -> list[str]:
    """Per (model, task): where learning rates were chosen, and a warning when the reported split chose them."""
    notes = []
    for (model, task), group in cells.groupby(["model", "task"], sort=True):
        sources = ok[(ok["model"] == model) & (ok["task"] == task)]["selection_source"].dropna().unique()
        reported = sorted(group[group["chosen_on"] == "reported"]["variant"])
        if not reported:
            notes.append(
                f"{model} {task}: learning rates chosen on {' / '.join(sorted(sources))}; scores reported on "
                "the other split."
            )
        elif len(reported) == len(group):
            notes.append(
                f"{model} {task}: learning rates chosen on the split the scores are reported on (the records "
                "have no selection split): the best scores are optimistic, most for the noisiest variants."
            )
        else:
            notes.append(
                f"{model} {task}: {', '.join(reported)} chosen on the reported split (some runs have no "
                "selection metric); the others on a separate selection split."
            )
    return notes


def _grid_edge_notes(per_lr: pd.DataFrame, cells: pd.DataFrame) -> list[str]:
    """A best learning rate at the end of the grid that was tried may not be the variant's best at all: the
    comparison is only fair once each variant's optimum is bracketed."""
    notes = []
    for cell in cells.itertuples():
        tried = per_lr[(per_lr["model"] == cell.model) & (per_lr["task"] == cell.task)]
        tried = sorted(tried[tried["variant"] == cell.variant]["lr"])
        if len(tried) >= 3 and cell.lr in (tried[0], tried[-1]):
            end = "largest" if cell.lr == tried[-1] else "smallest"
            notes.append(
                f"{cell.model} {cell.task} {cell.variant}: the best learning rate, {format_lr(cell.lr)}, is the {end} "
                "tried; widen the grid to bracket its optimum."
            )
    return notes


def _chance_notes(ok: pd.DataFrame, cells: pd.DataFrame) -> list[str]:
    """Results within noise of predicting the majority class (a constant, for regression) are no results: say so,
    for the whole task when every variant is there."""
    notes = []
    for (model, task), group in cells.groupby(["model", "task"], sort=True):
        chance = ok[(ok["model"] == model) & (ok["task"] == task)]["chance_metric"].dropna()
        if chance.empty:
            continue
        level = float(chance.median())
        signed = group["mean"] - level if group["direction"].iloc[0] == "max" else level - group["mean"]
        margin = (2 * group["std"].fillna(0.0)).clip(lower=0.01)
        at_chance = group[signed <= margin]["variant"].tolist()
        if not at_chance:
            continue
        if len(at_chance) == len(group):
            notes.append(
                f"{model} {task}: every variant is indistinguishable from the majority-class baseline "
                f"({level:.4g}): nothing was learned at this budget."
            )
        else:
            notes.append(
                f"{model} {task}: {', '.join(sorted(at_chance))} indistinguishable from the majority-class baseline "
                f"({level:.4g})."
            )
    return notes


def _mixed_config_notes(ok: pd.DataFrame) -> list[str]:
    """Runs that share a variant, task, lr and seed come from other overrides or other sweeps under the same folder,
    yet are averaged together as if they were seeds."""
    counts = ok.groupby([*_CELL_KEYS, "lr", "seed"]).size().reset_index(name="runs")
    return [
        f"{row.model} {row.task} {row.variant} lr {row.lr:g}: {row.runs} runs share seed {row.seed} (other overrides "
        "or another sweep under this folder) and are averaged together."
        for row in counts[counts["runs"] > 1].itertuples()
    ]
