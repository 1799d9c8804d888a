"""The study across model families: how sure each score is, which variants beat tuned LoRA beyond noise, which are
indistinguishable from each task's best, how the variants rank across every (model, task), how sensitive each is to
its learning rate, and one taxonomy table over all of it.

Everything is computed from a `Leaderboard` (which learning rate each variant uses per task) and the records of the
runs at those rates, which add their per-seed scores and, where they have them, per-example outputs
(`eval_examples`); the statistics are in `significance.py`, the learning-rate windows in `sensitivity.py`.

Rules the tables follow:
- Each score has a 95% interval (`significance.cell_interval`): bootstrap over examples and seeds, Student's t over
  seeds alone, none for one seed without examples.
- A variant **beats tuned LoRA beyond noise** on a task when the 95% interval of its paired difference with LoRA at
  LoRA's best learning rate lies wholly on the better side of 0; **worse** when wholly on the other side;
  **indistinguishable** otherwise.
- A variant is **indistinguishable from the best** of a task when the 95% interval of its paired difference with the
  task's best variant contains 0. The best is the leaderboard's (rank 1, bold), baselines included: where `full`
  fine-tuning ran, it is often the one the others are measured against. Each pair is a separate 95% statement, not
  corrected for the number of variants: more marks would survive a correction, so a variant left unmarked is worse
  than the best at the 95% level for that pair only.
- **Normalised score**: the variant's score over LoRA's on the same task (LoRA's over the variant's for metrics
  where lower is better), so 1.05 is 5% better than LoRA; undefined when a score is not positive.
- **Gap closed**: (score − floor) / (ceiling − floor), where the ceiling is `full` fine-tuning and the floor is
  `head_only` (the frozen backbone with a trained head) or, for generation tasks, which have no head, the untuned
  model the records carry (`untuned_metric`).
- **Average rank** across tasks: ranks of the variants present on each (model, task), ties averaged; the Friedman
  test and critical-difference diagram use only the variants present on every one.
- **Costs** relative to the same model's LoRA (geometric mean over the models a variant ran on): trainable
  parameters, step time, and memory (activations saved for backward plus trained state: already the method's own
  cost above the frozen model). No record times the bare frozen model; `head_only`'s step (the frozen backbone's
  forward and the head's update) is the closest, so "step × frozen" is relative to it, on the models that have it.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from lorafactory.results.aggregate import METRICS, Leaderboard, Runs, axis_position
from lorafactory.results.record import RECORD_NAME, RunRecord, read_record
from lorafactory.results.sensitivity import lr_windows
from lorafactory.results.significance import (
    EXAMPLE_METRICS,
    N_BOOTSTRAP,
    ExampleDraws,
    Interval,
    RankTest,
    cell_interval,
    cliques,
    example_metric,
    friedman,
    paired_difference,
    rng_for,
)

REFERENCE = "lora"
"""The variant every other is compared with, at its own best learning rate."""
FLOOR, CEILING = "head_only", "full"
RANK_SUBAXES = ("expansion", "sharing", "budgeting")
"""Tags that split the rank axis into groups, in display order; a variant carrying several joins the first it lists."""
_METRIC_TOLERANCE = 1e-4
"""How far the metric recomputed from a record's examples may be from its reported one (regression outputs are
stored to 5 decimals) before the examples are not trusted."""
_KEYS = ["model", "task", "variant"]


@dataclass
class Samples:
    """One cell's runs at its chosen learning rate: per-seed scores, and per-seed outputs when every seed has them."""

    seeds: np.ndarray
    values: np.ndarray
    outputs: list[np.ndarray] | None = None
    labels: np.ndarray | None = None


@dataclass
class Study:
    """What the study sections of a report show. Frames are long-form and numeric, as in `Leaderboard`."""

    cells: pd.DataFrame
    """Per (model, task, variant): `group`, the interval (`mean`, `low`, `high`, `method`, `seeds`, `examples`),
    the paired difference with LoRA (`lora_diff`, `lora_low`, `lora_high`, `lora_p`, `lora_method`, `vs_lora`:
    better / indistinguishable / worse / untested / reference / no LoRA run) and with the task's best
    (`best_variant`, `best_diff`, `best_low`, `best_high`, `best_p`, `best_method`, `vs_best`: best /
    indistinguishable / worse / untested), `task_rank`, `normalised`, `gap_closed`, and the learning-rate window
    (`width`, `at_edge`, `drop_half`, `drop_double`, `n_lrs`)."""
    variants: pd.DataFrame
    """Per variant, in display order: `group`, `taxonomy`, `baseline`, `avg_rank`, `n_tasks`, `mean_normalised`,
    `mean_gap_closed`, `window_mean`, `window_at_edge`, `params_x_lora`, `step_x_frozen`, `step_x_lora`,
    `memory_x_lora`, and counts against LoRA `n_better`, `n_same`, `n_worse`."""
    tasks: pd.DataFrame
    """Per (model, task): `primary_metric`, `direction`, `best_variant`, `floor`, `floor_source`, `ceiling`."""
    windows: pd.DataFrame
    rank_test: RankTest | None = None
    rank_variants: list[str] = field(default_factory=list)
    rank_cliques: list[tuple[str, ...]] = field(default_factory=list)
    rank_reason: str | None = None
    """Why there is no rank test, in one line."""
    interval_reason: str | None = None
    """Why no cell has a confidence interval, in one line."""
    findings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    bootstrap: int = N_BOOTSTRAP

    def cell(self, model: str, task: str, variant: str) -> pd.Series | None:
        found = self.cells[
            (self.cells["model"] == model) & (self.cells["task"] == task) & (self.cells["variant"] == variant)
        ]
        return None if found.empty else found.iloc[0]


def axis_group(taxonomy: str, tags: tuple[str, ...] | list[str]) -> str:
    """The table group of a variant: its taxonomy axis, the rank axis split by its first expansion / sharing /
    budgeting tag (`rank / sharing`)."""
    if taxonomy == "rank":
        sub = next((tag for tag in tags if tag in RANK_SUBAXES), None)
        return f"rank / {sub}" if sub else "rank"
    return taxonomy or "unclassified"


def group_position(group: str) -> tuple[int, int]:
    axis, _, sub = group.partition(" / ")
    return axis_position(axis), (RANK_SUBAXES.index(sub) + 1 if sub in RANK_SUBAXES else 0)


# --- reading the chosen runs ----------------------------------------------------------------------------------------


def load_samples(
    board: Leaderboard, runs: Runs
) -> tuple[dict[tuple[str, str, str], Samples], dict[str, tuple[str, tuple[str, ...]]], dict, list[str]]:
    """Per cell, the chosen runs' scores and examples; per variant its (taxonomy, tags); per (model, task) the untuned
    model's score (median over records that have one); and notes on examples that could not be used."""
    column = METRICS[board.metric]
    ok = runs.ok.dropna(subset=[column])
    samples, meta, untuned, notes = {}, {}, {}, []
    labels_of: dict[tuple[str, str], np.ndarray] = {}
    untrusted: Counter[tuple[str, str, str]] = Counter()
    first_case: dict[tuple[str, str, str], str] = {}
    for cell in board.cells.itertuples():
        chosen = ok[
            (ok["model"] == cell.model)
            & (ok["task"] == cell.task)
            & (ok["variant"] == cell.variant)
            & (ok["lr"] == cell.lr)
        ].sort_values("seed")
        seeds, values, outputs = [], [], []
        for seed, group in chosen.groupby("seed", sort=True):
            seeds.append(int(seed))
            values.append(float(group[column].mean()))  # runs sharing a seed are averaged, as the leaderboard does
            try:
                record = read_record(Path(group.iloc[0]["path"]) / RECORD_NAME)
            except (OSError, ValueError, TypeError):  # a live sweep moved it aside since it was loaded
                untrusted[(cell.model, cell.task, "the record could not be read again")] += 1
                first_case.setdefault((cell.model, cell.task, "the record could not be read again"), "")
                outputs.append(None)
                continue
            meta.setdefault(cell.variant, (record.taxonomy, tuple(record.tags)))
            if record.untuned_metric is not None:
                untuned.setdefault((cell.model, cell.task), []).append(record.untuned_metric)
            found, why, case = _examples(
                record, cell.primary_metric, board.metric, labels_of.get((cell.model, cell.task))
            )
            if found is not None:
                labels_of.setdefault((cell.model, cell.task), found[1])
            elif why:
                untrusted[(cell.model, cell.task, why)] += 1
                first_case.setdefault((cell.model, cell.task, why), case)
            outputs.append(found)
        usable = all(found is not None for found in outputs) and bool(outputs)
        samples[(cell.model, cell.task, cell.variant)] = Samples(
            np.array(seeds),
            np.array(values),
            [found[0] for found in outputs] if usable else None,
            outputs[0][1] if usable else None,
        )
    for (model, task, why), count in sorted(untrusted.items()):
        case = first_case[(model, task, why)]
        notes.append(
            f"{model} {task}: the per-example outputs of {count} run(s) were not used: {why}"
            + (f" ({case})." if case else ".")
        )
    floors = {key: float(np.median(found)) for key, found in untuned.items()}
    return samples, meta, floors, notes


def _examples(
    record: RunRecord, metric: str, scored_by: str, labels: np.ndarray | None
) -> tuple[tuple[np.ndarray, np.ndarray] | None, str, str]:
    """(outputs, labels) of a record's `eval_examples` when they can stand for its score, else None and why not
    ("" when there is nothing to explain: no examples, or a metric they cannot make), then the run's details."""
    examples = getattr(record, "eval_examples", None) or {}
    if not examples.get("labels") or metric not in EXAMPLE_METRICS:
        return None, "", ""
    if scored_by != "final":
        return None, "they belong to the final evaluation, and this report scores the best one (--metric best)", ""
    outputs, truth = (
        np.asarray(examples["outputs"], dtype=np.float64),
        np.asarray(examples["labels"], dtype=np.float64),
    )
    # One output per label, or one row of statistics per label (BLEU's)
    if truth.ndim != 1 or outputs.shape[:1] != truth.shape or outputs.ndim > 2:
        return None, "outputs and labels differ in length", ""
    if labels is not None and (labels.shape != truth.shape or not np.array_equal(labels, truth)):
        return None, "their labels differ from the other runs' (another evaluation set)", ""
    recomputed = example_metric(metric, outputs, truth)
    if not math.isclose(recomputed, record.final_metric, abs_tol=_METRIC_TOLERANCE):
        case = f"first: {recomputed:.4g} recomputed, {record.final_metric:.4g} recorded, in {record.run_dir}"
        return None, f"the {metric} recomputed from them is not the recorded one", case
    return (outputs, truth), "", ""


# --- the study ------------------------------------------------------------------------------------------------------


def build_study(board: Leaderboard, runs: Runs, bootstrap: int = N_BOOTSTRAP, seed: int = 0) -> Study:
    """Intervals, comparisons, ranks, windows, the cross-family table and the findings of `board`'s runs."""
    samples, meta, untuned, notes = load_samples(board, runs)
    replicates = _replicates(board, samples, bootstrap, seed)
    cells = board.cells[[*_KEYS, "lr", "primary_metric", "direction"]].copy().reset_index(drop=True)
    cells["group"] = [axis_group(*meta.get(v, ("", ()))) for v in cells["variant"]]
    rows = []
    for cell in cells.itertuples():
        key = (cell.model, cell.task, cell.variant)
        found = samples[key]
        n_examples = len(found.labels) if key in replicates else 0
        interval = cell_interval(found.values, replicates.get(key), rng_for(*key, "cell", seed=seed), n_examples)
        best = _best_variant(board, cell.model, cell.task)
        rows.append(
            {"mean": float(found.values.mean()), **_cell_columns(interval), "best_variant": best}
            | _comparison(samples, replicates, key, REFERENCE, "lora", seed)
            | _comparison(samples, replicates, key, best, "best", seed)
        )
    cells = pd.concat([cells, pd.DataFrame(rows)], axis=1)
    with_lora = {(model, task) for model, task, variant in samples if variant == REFERENCE}
    cells["vs_lora"] = [
        "reference"
        if c.variant == REFERENCE
        else _verdict(c.lora_low, c.lora_high, c.direction)
        if (c.model, c.task) in with_lora
        else "no LoRA run"
        for c in cells.itertuples()
    ]
    cells["vs_best"] = [
        "best" if c.variant == c.best_variant else _verdict(c.best_low, c.best_high, c.direction)
        for c in cells.itertuples()
    ]
    tasks = _task_table(board, cells, untuned)
    cells = _relative_scores(cells, tasks)
    windows = lr_windows(board)
    window_columns = ["width", "at_edge", "drop_half", "drop_double", "n_lrs"]
    cells = cells.merge(windows[[*_KEYS, *window_columns]], on=_KEYS, how="left")
    study = Study(cells, _variant_table(board, cells, meta), tasks, windows, notes=notes, bootstrap=bootstrap)
    _rank_test(study, board)
    study.findings = findings(study)
    if cells["method"].isna().all():
        study.interval_reason = "every variant has one seed and no per-example outputs."
        study.notes.insert(0, f"No confidence intervals or paired tests: {study.interval_reason}")
    return study


def _replicates(board: Leaderboard, samples: dict, bootstrap: int, seed: int) -> dict:
    """Per cell with examples, each seed's metric on its task's example draws: (S, B). The draws depend on the task
    only, so every variant of a task is resampled alike (the pairing)."""
    out = {}
    for cell in board.cells.itertuples():
        key = (cell.model, cell.task, cell.variant)
        found = samples[key]
        if found.outputs is None:
            continue
        task_seed = int(rng_for(cell.model, cell.task, seed=seed).integers(2**31))
        draws = ExampleDraws(len(found.labels), bootstrap, task_seed)
        out[key] = np.stack([draws.metric(cell.primary_metric, o, found.labels) for o in found.outputs])
    return out


def _cell_columns(interval: Interval | None) -> dict[str, object]:
    if interval is None:
        return {"low": math.nan, "high": math.nan, "method": None, "seeds": math.nan, "examples": 0}
    return {
        "low": interval.low,
        "high": interval.high,
        "method": interval.method,
        "seeds": interval.seeds,
        "examples": interval.examples,
    }


def _comparison(
    samples: dict, replicates: dict, key: tuple[str, str, str], other: str, prefix: str, seed: int
) -> dict[str, object]:
    """The paired difference of a cell with `other`'s cell on the same task, over their common seeds:
    `<prefix>_diff`, `_low`, `_high`, `_p`, `_method` (NaN when `other` is absent or is the cell itself; no interval
    when no test is possible)."""
    model, task, variant = key
    columns: dict[str, object] = {f"{prefix}_{name}": math.nan for name in ("diff", "low", "high", "p")}
    columns[f"{prefix}_method"] = None
    reference = (model, task, other)
    if other == variant or reference not in samples:
        return columns
    mine, theirs = samples[key], samples[reference]
    _, mine_at, theirs_at = np.intersect1d(mine.seeds, theirs.seeds, return_indices=True)
    if not len(mine_at):
        return columns
    with_examples = key in replicates and reference in replicates
    interval = paired_difference(
        mine.values[mine_at],
        theirs.values[theirs_at],
        replicates[key][mine_at] if with_examples else None,
        replicates[reference][theirs_at] if with_examples else None,
        rng_for(*key, other, prefix, seed=seed),
        len(mine.labels) if with_examples else 0,
    )
    columns[f"{prefix}_diff"] = float((mine.values[mine_at] - theirs.values[theirs_at]).mean())
    if interval is not None:
        columns |= {
            f"{prefix}_low": interval.low,
            f"{prefix}_high": interval.high,
            f"{prefix}_p": interval.p_value,
            f"{prefix}_method": interval.method,
        }
    return columns


def _verdict(low: float, high: float, direction: str) -> str:
    """better / worse when the interval of a difference lies wholly on one side of 0 (in the task's direction),
    indistinguishable when it holds 0, untested when there is none."""
    if math.isnan(low):
        return "untested"
    sign = 1.0 if direction == "max" else -1.0
    low, high = sorted((sign * low, sign * high))
    if low > 0:
        return "better"
    return "worse" if high < 0 else "indistinguishable"


def _best_variant(board: Leaderboard, model: str, task: str) -> str:
    cells = board.cells[(board.cells["model"] == model) & (board.cells["task"] == task)]
    return cells.sort_values(["rank", "variant"]).iloc[0]["variant"]


def _task_table(board: Leaderboard, cells: pd.DataFrame, untuned: dict) -> pd.DataFrame:
    rows = []
    for task in board.tasks.itertuples():
        here = cells[(cells["model"] == task.model) & (cells["task"] == task.task)].set_index("variant")
        floor, source = math.nan, None
        if FLOOR in here.index:
            floor, source = float(here.loc[FLOOR, "mean"]), FLOOR
        elif (task.model, task.task) in untuned:
            floor, source = untuned[(task.model, task.task)], "untuned"
        rows.append(
            {
                "model": task.model,
                "task": task.task,
                "primary_metric": task.primary_metric,
                "direction": task.direction,
                "best_variant": _best_variant(board, task.model, task.task),
                "floor": floor,
                "floor_source": source,
                "ceiling": float(here.loc[CEILING, "mean"]) if CEILING in here.index else math.nan,
                "reference": float(here.loc[REFERENCE, "mean"]) if REFERENCE in here.index else math.nan,
            }
        )
    return pd.DataFrame(rows)


def _relative_scores(cells: pd.DataFrame, tasks: pd.DataFrame) -> pd.DataFrame:
    """Add `task_rank` (1 = best, ties averaged), `normalised` (÷ LoRA, direction-aware) and `gap_closed`."""
    cells = cells.merge(tasks[["model", "task", "floor", "ceiling", "reference"]], on=["model", "task"])
    signed = cells["mean"].where(cells["direction"] == "max", -cells["mean"])
    cells["task_rank"] = signed.groupby([cells["model"], cells["task"]]).rank(method="average", ascending=False)
    cells["normalised"] = [_normalised(c.mean, c.reference, c.direction) for c in cells.itertuples()]
    span = cells["ceiling"] - cells["floor"]
    cells["gap_closed"] = (cells["mean"] - cells["floor"]) / span.where(span != 0)
    return cells.drop(columns=["floor", "ceiling", "reference"])


def _normalised(mean: float, reference: float, direction: str) -> float:
    """The score over LoRA's (LoRA's over the score where lower is better): > 1 is better than LoRA."""
    if direction == "max":
        return mean / reference if reference > 0 else math.nan
    return reference / mean if reference > 0 and mean > 0 else math.nan


def _geometric_ratio(costs: pd.DataFrame, column: str, reference: str) -> pd.Series:
    """Per variant, the geometric mean over models of its `column` over `reference`'s on the same model."""
    values = pd.to_numeric(costs[column], errors="coerce")  # records without the cost leave None: NaN here
    base = values[costs["variant"] == reference].set_axis(costs.loc[costs["variant"] == reference, "model"])
    ratio = values / costs["model"].map(base)
    logs = np.log(ratio.where(ratio > 0))
    return np.exp(logs.groupby(costs["variant"]).mean())


def _variant_table(board: Leaderboard, cells: pd.DataFrame, meta: dict) -> pd.DataFrame:
    by_variant = cells.groupby("variant")
    table = pd.DataFrame(
        {
            "group": by_variant["group"].first(),
            "avg_rank": by_variant["task_rank"].mean(),
            "n_tasks": by_variant.size(),
            "mean_normalised": by_variant["normalised"].mean(),
            "mean_gap_closed": by_variant["gap_closed"].mean(),
            "window_mean": cells[cells["n_lrs"] >= 2].groupby("variant")["width"].mean(),
            "window_at_edge": cells[cells["n_lrs"] >= 2]
            .groupby("variant")["at_edge"]
            .agg(lambda e: int((e != "").sum())),
            "n_better": by_variant["vs_lora"].agg(lambda v: int((v == "better").sum())),
            "n_same": by_variant["vs_lora"].agg(lambda v: int((v == "indistinguishable").sum())),
            "n_worse": by_variant["vs_lora"].agg(lambda v: int((v == "worse").sum())),
        }
    )
    table["taxonomy"] = [meta.get(v, ("", ()))[0] for v in table.index]
    table["baseline"] = [meta.get(v, ("", ()))[0] == "baseline" for v in table.index]
    costs = board.variants[["model", "variant", "trainable_params", "step_time_s", "memory_mb"]]
    table["params_x_lora"] = _geometric_ratio(costs, "trainable_params", REFERENCE)
    table["step_x_frozen"] = _geometric_ratio(costs, "step_time_s", FLOOR)
    table["step_x_lora"] = _geometric_ratio(costs, "step_time_s", REFERENCE)
    table["memory_x_lora"] = _geometric_ratio(costs, "memory_mb", REFERENCE)
    table = table.reset_index(names="variant")
    table["_group"] = table["group"].map(group_position)
    table["_first"] = table["variant"] != REFERENCE
    table = table.sort_values(["_group", "group", "_first", "avg_rank", "variant"])
    return table.drop(columns=["_group", "_first"]).reset_index(drop=True)


def _rank_test(study: Study, board: Leaderboard, alpha: float = 0.05) -> None:
    """Friedman / Nemenyi over every (model, task), on the variants present on all of them."""
    blocks = list(board.tasks[["model", "task"]].itertuples(index=False, name=None))
    if len(blocks) < 2:
        study.rank_reason = "there is only one task (a rank test needs at least two)."
        return
    present = study.cells.groupby("variant").size()
    complete = [v for v in study.variants["variant"] if present.get(v, 0) == len(blocks)]
    if len(complete) < 2:
        study.rank_reason = f"fewer than two variants ran on all {len(blocks)} tasks."
        return
    scores = np.empty((len(blocks), len(complete)))
    for i, (model, task) in enumerate(blocks):
        for j, variant in enumerate(complete):
            cell = study.cell(model, task, variant)
            scores[i, j] = cell["mean"] if cell["direction"] == "max" else -cell["mean"]
    study.rank_test = friedman(scores, alpha)
    study.rank_variants = complete
    study.rank_cliques = [
        tuple(complete[i] for i in group)
        for group in cliques(study.rank_test.average_ranks, study.rank_test.critical_difference)
    ]
    left_out = sorted(set(study.variants["variant"]) - set(complete))
    if left_out:
        study.notes.append(
            f"Average ranks across tasks and the critical-difference diagram leave out {', '.join(left_out)}: not "
            f"run on all {len(blocks)} tasks."
        )


# --- the finding summary --------------------------------------------------------------------------------------------


def findings(study: Study) -> list[str]:
    """Sentences written from the numbers: the comparisons with tuned LoRA, then per table group those comparisons,
    closeness to each task's best and the learning-rate windows, then the rank test across tasks."""
    cells = study.cells
    lines = [_headline(cells)]
    has_reference = REFERENCE in set(cells["variant"])
    for group in study.variants["group"].drop_duplicates():
        lines.append(_group_line(group, cells[cells["group"] == group], has_reference))
    return lines + [_rank_line(study)]


def _headline(cells: pd.DataFrame) -> str:
    if REFERENCE not in set(cells["variant"]):
        return f"No {REFERENCE} runs: nothing is compared with tuned LoRA."
    compared = cells[(cells["variant"] != REFERENCE) & (cells["group"] != "baseline")]
    counts = compared["vs_lora"].value_counts()
    winners = compared[compared["vs_lora"] == "better"]["variant"].nunique()
    compared = compared[compared["vs_lora"] != "no LoRA run"]
    return (
        f"Against tuned LoRA (each variant at its own best learning rate; paired 95% intervals): "
        f"{_count(counts, 'better')} of {len(compared)} variant × task comparisons are better beyond noise "
        f"({winners} of {compared['variant'].nunique()} variants on at least one task), "
        f"{_count(counts, 'indistinguishable')} indistinguishable, {_count(counts, 'worse')} worse"
        + _untested(counts)
        + "."
    )


def _untested(counts: pd.Series) -> str:
    """`, 2 untested (one seed, no per-example outputs), 3 on tasks without a LoRA run` (what applies)."""
    text = (
        f", {_count(counts, 'untested')} untested (one seed, no per-example outputs)" if counts.get("untested") else ""
    )
    return text + (
        f", {_count(counts, 'no LoRA run')} on tasks without a LoRA run" if counts.get("no LoRA run") else ""
    )


def _rank_line(study: Study) -> str:
    test = study.rank_test
    if test is None:
        return f"Average ranks across tasks are not computed: {study.rank_reason}"
    ranked = sorted(zip(test.average_ranks, study.rank_variants, strict=True))
    lora = next((f"; {REFERENCE} {rank:.2f}" for rank, name in ranked[1:] if name == REFERENCE), "")
    joined = next((group for group in study.rank_cliques if ranked[0][1] in group), ())
    return (
        f"Across {test.tasks} tasks and {test.variants} variants: Friedman χ²_F = {test.chi2:.2f} "
        f"({_p(test.chi2_p)}), Iman–Davenport F_F = {_stat(test.iman_davenport)} ({_p(test.iman_davenport_p)}); "
        f"Nemenyi CD = {test.critical_difference:.2f} at α = {test.alpha:g}. Best average rank: {ranked[0][1]} "
        f"{ranked[0][0]:.2f}{lora}; {max(len(joined) - 1, 0)} other variant(s) within the CD of the best."
    )


def _group_line(group: str, cells: pd.DataFrame, has_reference: bool) -> str:
    variants = cells["variant"].nunique()
    parts = [f"**{group}** ({variants} variant{'s' if variants != 1 else ''})"]
    tested = cells[cells["vs_lora"] != "reference"]
    if has_reference and tested.empty:
        parts.append("the reference")
    elif has_reference:
        counts = tested["vs_lora"].value_counts()
        tested = tested[tested["vs_lora"] != "no LoRA run"]
        better = tested[tested["vs_lora"] == "better"]
        named = ", ".join(
            f"{c.variant} on {c.task} ({c.model}) {_signed(c.lora_diff)} "
            f"[{_signed(c.lora_low)}, {_signed(c.lora_high)}]"
            for c in better.itertuples()
        )
        parts.append(
            f"vs tuned LoRA, {_count(counts, 'better')} of {len(tested)} comparisons better beyond noise"
            + (f" ({named})" if named else "")
            + f", {_count(counts, 'indistinguishable')} indistinguishable, {_count(counts, 'worse')} worse"
            + _untested(counts)
        )
    near = int(cells["vs_best"].isin(["best", "indistinguishable"]).sum())
    parts.append(f"best or indistinguishable from the task's best in {near} of {len(cells)} variant × task")
    windows = cells[cells["n_lrs"] >= 2]
    if len(windows):
        edge = int((windows["at_edge"] != "").sum())
        parts.append(
            f"learning-rate window {windows['width'].mean():.1f} octaves on average"
            + (f" ({edge} of {len(windows)} reach the grid's edge, so wider)" if edge else "")
        )
    return "; ".join(parts) + "."


def _count(counts: pd.Series, key: str) -> int:
    return int(counts.get(key, 0))


def _signed(x: float) -> str:
    return f"{x:+.3f}" if abs(x) < 100 else f"{x:+.1f}"


def _p(p: float) -> str:
    """`p = 0.017`, `p < 0.001`."""
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def _stat(x: float) -> str:
    return "∞" if math.isinf(x) else f"{x:.2f}"
