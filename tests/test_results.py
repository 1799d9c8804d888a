"""Aggregation of run records into a leaderboard, and counting a sweep's progress: synthetic records, exact numbers."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lorafactory.config import run_id
from lorafactory.results import RunRecord, write_record
from lorafactory.results.aggregate import aggregate, load_runs
from lorafactory.results.render import format_lr, format_mean, latex, markdown
from lorafactory.results.status import sweep_status

TAXONOMY = {"lora": "rank", "dora": "rank", "rslora": "optimization", "pissa": "initialization", "mole": "moe"}


def write_run(
    root: Path,
    variant: str,
    task: str,
    lr: str,
    seed: int,
    final: float | None,
    *,
    status: str = "ok",
    best: float | None = None,
    direction: str = "max",
    model: str = "tiny-bert",
    name: str = "study",
    settings: tuple[str, ...] = (),
    **fields: object,
) -> Path:
    """A run folder in the real layout, `<name>/<model>/<task>/<variant>/<run id>/result.json`; `settings`: more
    overrides it was launched with (`variant.r=16`)."""
    overrides = [f"variant={variant}", f"task={task}", f"optim.lr={lr}", f"seed={seed}", *settings]
    run_dir = root / name / model / task / variant / run_id(overrides, seed)
    fields = {"taxonomy": TAXONOMY.get(variant, ""), "tags": ["baseline"] if variant == "lora" else [], **fields}
    write_record(
        run_dir,
        RunRecord(
            status=status,
            model=model,
            task=task,
            variant=variant,
            seed=seed,
            lr=float(lr),
            name=name,
            primary_metric=str(fields.pop("primary_metric", "accuracy" if direction == "max" else "loss")),
            direction=direction,
            final_metric=final,
            best_metric=final if best is None else best,
            overrides=overrides,
            config={"optim": {"lr": float(lr), "lr_scale": 1.0}},
            run_dir=str(run_dir),
            **fields,
        ),
    )
    return run_dir


def cell(board, task: str, variant: str, model: str = "tiny-bert"):
    found = board.cell(model, task, variant)
    assert found is not None, f"no cell for {variant} on {task}"
    return found


def test_runs_of_one_variant_in_other_settings_are_other_rows_never_pooled_as_seeds(tmp_path: Path) -> None:
    """A rank sweep: r=4 and r=16 at the same learning rate are two configurations, not two seeds of one; settings
    that only move the rate (`variant.lr_mult`) and the run's housekeeping do not split a variant."""
    write_run(tmp_path, "lora", "glue/sst2", "1e-3", 0, 0.80)
    write_run(tmp_path, "lora", "glue/sst2", "1e-3", 1, 0.82, settings=("variant.lr_mult=1", "trainer.progress_bar=0"))
    write_run(tmp_path, "lora", "glue/sst2", "1e-3", 0, 0.90, settings=("variant.r=16",))
    write_run(tmp_path, "lora", "glue/sst2", "1e-3", 0, 0.70, settings=("variant.r=4", "+variant.alpha=8"))
    write_run(tmp_path, "dora", "glue/sst2", "1e-3", 0, 0.85)
    write_run(tmp_path, "icm_lora", "glue/sst2", "1e-3", 0, 0.75, settings=("variant.generator=/abs/gens/icm.pt",))

    board = aggregate(load_runs(tmp_path))

    assert sorted(board.cells["variant"]) == [
        "dora",
        "icm_lora[generator=icm.pt]",
        "lora",
        "lora[alpha=8,r=4]",
        "lora[r=16]",
    ]
    assert (cell(board, "glue/sst2", "lora")["mean"], cell(board, "glue/sst2", "lora")["n"]) == (0.81, 2)
    assert cell(board, "glue/sst2", "lora[r=16]")["mean"] == 0.90
    baselines = board.variants[board.variants["baseline"].astype(bool)]["variant"].tolist()
    assert baselines == ["lora"]  # the reference is LoRA in its default configuration


# --- mean ± std over seeds, best learning rate -----------------------------------------------------------------------


def test_mean_std_and_n_over_seeds_at_each_lr(tmp_path: Path) -> None:
    for seed, value in enumerate([0.90, 0.91, 0.95]):
        write_run(tmp_path, "lora", "glue/sst2", "3e-4", seed, value)
    for seed, value in enumerate([0.80, 0.84]):
        write_run(tmp_path, "lora", "glue/sst2", "1e-4", seed, value)

    board = aggregate(load_runs(tmp_path))

    per_lr = board.per_lr.set_index("lr")
    assert per_lr.loc[3e-4, "mean"] == pytest.approx(0.92)
    assert per_lr.loc[3e-4, "std"] == pytest.approx(math.sqrt(7e-4))  # sample std: (4 + 1 + 9)e-4 / 2
    assert per_lr.loc[3e-4, "n"] == 3
    assert per_lr.loc[1e-4, "mean"] == pytest.approx(0.82)
    assert per_lr.loc[1e-4, "std"] == pytest.approx(math.sqrt(8e-4))
    assert per_lr.loc[1e-4, "n"] == 2
    chosen = cell(board, "glue/sst2", "lora")
    assert (chosen["lr"], chosen["n"]) == (3e-4, 3)
    assert format_mean(chosen["mean"], chosen["std"], chosen["n"]) == "0.920 ± 0.026 (n=3)"


def test_best_lr_follows_the_direction_each_task_declares(tmp_path: Path) -> None:
    for lr, value in [("1e-4", 0.80), ("3e-4", 0.90), ("1e-3", 0.85)]:
        write_run(tmp_path, "lora", "glue/sst2", lr, 0, value, direction="max")
    # A loss: lower is better, so 1e-4 wins although 3e-4 has the larger value.
    for lr, value in [("1e-4", 0.20), ("3e-4", 0.60), ("1e-3", 0.40)]:
        write_run(tmp_path, "lora", "glue/stsb", lr, 0, value, direction="min")

    board = aggregate(load_runs(tmp_path))

    assert cell(board, "glue/sst2", "lora")["lr"] == pytest.approx(3e-4)
    assert cell(board, "glue/sst2", "lora")["mean"] == pytest.approx(0.90)
    assert cell(board, "glue/stsb", "lora")["lr"] == pytest.approx(1e-4)
    assert cell(board, "glue/stsb", "lora")["mean"] == pytest.approx(0.20)
    assert board.tasks.set_index("task").loc["glue/stsb", "direction"] == "min"


def test_metric_option_scores_by_the_best_evaluation(tmp_path: Path) -> None:
    write_run(tmp_path, "lora", "glue/sst2", "1e-4", 0, 0.80, best=0.95)
    write_run(tmp_path, "lora", "glue/sst2", "3e-4", 0, 0.90, best=0.91)

    assert cell(aggregate(load_runs(tmp_path), "final"), "glue/sst2", "lora")["lr"] == pytest.approx(3e-4)
    best = cell(aggregate(load_runs(tmp_path), "best"), "glue/sst2", "lora")
    assert (best["lr"], best["mean"]) == (pytest.approx(1e-4), pytest.approx(0.95))
    with pytest.raises(ValueError, match="metric"):
        aggregate(load_runs(tmp_path), "last")


def test_ties_between_learning_rates_go_to_the_smaller_one(tmp_path: Path) -> None:
    write_run(tmp_path, "lora", "glue/sst2", "3e-4", 0, 0.9)
    write_run(tmp_path, "lora", "glue/sst2", "1e-4", 0, 0.9)

    assert cell(aggregate(load_runs(tmp_path)), "glue/sst2", "lora")["lr"] == pytest.approx(1e-4)


# --- ranks, taxonomy order, costs ------------------------------------------------------------------------------------


def test_ranks_per_task_and_average_rank(tmp_path: Path) -> None:
    scores = {  # variant: (sst2 accuracy, stsb loss)
        "lora": (0.90, 0.30),
        "dora": (0.92, 0.35),
        "pissa": (0.85, 0.10),
    }
    for variant, (acc, loss) in scores.items():
        for seed in (0, 1):
            write_run(tmp_path, variant, "glue/sst2", "1e-4", seed, acc)
            write_run(tmp_path, variant, "glue/stsb", "1e-4", seed, loss, direction="min")

    board = aggregate(load_runs(tmp_path))

    ranks = {(c.task, c.variant): c.rank for c in board.cells.itertuples()}
    assert ranks == {
        ("glue/sst2", "dora"): 1,
        ("glue/sst2", "lora"): 2,
        ("glue/sst2", "pissa"): 3,
        ("glue/stsb", "pissa"): 1,
        ("glue/stsb", "lora"): 2,
        ("glue/stsb", "dora"): 3,
    }
    best = {(c.task, c.variant) for c in board.cells.itertuples() if c.best}
    assert best == {("glue/sst2", "dora"), ("glue/stsb", "pissa")}
    avg = board.variants.set_index("variant")["avg_rank"]
    assert avg.to_dict() == {"lora": 2.0, "dora": 2.0, "pissa": 2.0}
    assert board.variants.set_index("variant")["n_tasks"].to_dict() == {"lora": 2, "dora": 2, "pissa": 2}


def test_equal_means_share_the_best_rank(tmp_path: Path) -> None:
    for variant, value in [("lora", 0.9), ("dora", 0.9), ("rslora", 0.8)]:
        write_run(tmp_path, variant, "glue/sst2", "1e-4", 0, value)

    board = aggregate(load_runs(tmp_path))

    ranks = board.cells.set_index("variant")["rank"].to_dict()
    assert ranks == {"dora": 1, "lora": 1, "rslora": 3}
    assert set(board.cells.loc[board.cells["best"], "variant"]) == {"lora", "dora"}


def test_rows_are_grouped_by_taxonomy_axis_in_order(tmp_path: Path) -> None:
    variants = [
        ("mole", 0.95),
        ("pissa", 0.94),
        ("rslora", 0.93),
        ("dora", 0.92),
        ("lora", 0.80),
        ("odd", 0.99),
        ("adalora", 0.70),
    ]
    for variant, value in variants:
        taxonomy = {"odd": "sparsity", "adalora": "rank"}.get(variant, TAXONOMY.get(variant))
        write_run(tmp_path, variant, "glue/sst2", "1e-4", 0, value, taxonomy=taxonomy)

    board = aggregate(load_runs(tmp_path))

    rows = list(board.variants[["taxonomy", "variant"]].itertuples(index=False, name=None))
    # The baseline leads its axis; then by average rank; unknown axes come last.
    assert rows == [
        ("rank", "lora"),
        ("rank", "dora"),
        ("rank", "adalora"),
        ("optimization", "rslora"),
        ("initialization", "pissa"),
        ("moe", "mole"),
        ("sparsity", "odd"),
    ]
    text = markdown(board)
    axis_lines = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ")]
    assert [a for a in axis_lines if a and a != ":--"] == [
        "Axis",
        "rank",
        "optimization",
        "initialization",
        "moe",
        "sparsity",
    ]


def test_cost_columns_are_medians_over_the_variants_ok_runs(tmp_path: Path) -> None:
    for seed, (step, memory) in enumerate([(0.010, 100.0), (0.030, 300.0), (0.020, 900.0)]):
        write_run(
            tmp_path,
            "lora",
            "glue/sst2",
            "1e-4",
            seed,
            0.9,
            adapter_params=1000 + seed,
            trainable_params=5000,
            step_time_s=step,
            activation_mb=memory - 1.0,
            train_state_mb=1.0,
        )
    write_run(tmp_path, "lora", "glue/sst2", "1e-4", 7, None, status="failed", step_time_s=9.0, error="boom")

    variant = aggregate(load_runs(tmp_path)).variants.iloc[0]

    assert variant["adapter_params"] == 1001
    assert variant["trainable_params"] == 5000
    assert variant["step_time_s"] == pytest.approx(0.020)
    assert variant["memory_mb"] == pytest.approx(300.0)  # activations + trained state, the method's own cost


def test_the_memory_column_says_what_it_measures(tmp_path: Path) -> None:
    write_run(tmp_path, "lora", "glue/sst2", "1e-4", 0, 0.9, activation_mb=40.0, train_state_mb=2.5)

    md = markdown(aggregate(load_runs(tmp_path)))

    assert "Memory (activations + trained state)" in md and "| 42.5 MB |" in md


def test_results_at_the_majority_class_baseline_are_flagged(tmp_path: Path) -> None:
    for seed in range(2):  # chance is 0.5: lora learned, dora and pissa did not
        write_run(tmp_path, "lora", "glue/sst2", "1e-4", seed, 0.80 + seed / 100, chance_metric=0.5)
        write_run(tmp_path, "dora", "glue/sst2", "1e-4", seed, 0.50 + seed / 100, chance_metric=0.5)
        write_run(tmp_path, "pissa", "glue/sst2", "1e-4", seed, 0.505, chance_metric=0.5)
        write_run(tmp_path, "lora", "glue/cola", "1e-4", seed, 0.0, chance_metric=0.0)
        write_run(tmp_path, "dora", "glue/cola", "1e-4", seed, 0.005 * seed, chance_metric=0.0)

    notes = aggregate(load_runs(tmp_path)).notes

    assert "tiny-bert glue/sst2: dora, pissa indistinguishable from the majority-class baseline (0.5)." in notes
    assert any(n.startswith("tiny-bert glue/cola: every variant is indistinguishable") for n in notes), notes
    assert not any("lora," in n or "lora indistinguishable" in n for n in notes if "glue/sst2" in n)


def test_diverged_runs_are_drawn_apart_in_the_learning_rate_figure(tmp_path: Path, monkeypatch) -> None:
    from lorafactory.results import plots

    write_run(tmp_path, "lora", "glue/sst2", "1e-4", 0, 0.80)
    write_run(tmp_path, "lora", "glue/sst2", "3e-4", 0, 0.85)
    write_run(tmp_path, "lora", "glue/sst2", "1e-2", 0, None, status="diverged", error="training loss ran away")
    board = aggregate(load_runs(tmp_path))
    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, ax, title, plot: drawn.append(ax) or plot)

    plots.lr_sensitivity(board, "tiny-bert", "glue/sst2", tmp_path, plots.variant_colours(board))

    [ax] = drawn
    crosses = [c for c in ax.collections if list(map(tuple, c.get_offsets())) and c.get_offsets()[0][0] == 1e-2]
    assert len(crosses) == 1 and crosses[0].get_offsets()[0][1] == ax.get_ylim()[0]  # on the bottom edge
    assert "diverged (no score)" in ax.get_legend_handles_labels()[1]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1e-4", "3e-4", "1e-2"]


def test_variants_of_equal_size_get_legible_labels_in_the_parameter_figure(tmp_path: Path, monkeypatch) -> None:
    from lorafactory.results import plots

    for variant, value, params in [("lora", 0.80, 36864), ("pissa", 0.81, 36864), ("dora", 0.82, 38400)]:
        write_run(tmp_path, variant, "glue/sst2", "1e-4", 0, value, adapter_params=params)
    board = aggregate(load_runs(tmp_path))
    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, ax, title, plot: drawn.append(ax) or plot)

    plots.metric_vs_params(board, "tiny-bert", "glue/sst2", tmp_path)

    [ax] = drawn
    labels = {a.get_text(): a for a in ax.texts}
    assert set(labels) == {"lora", "pissa", "dora"}
    # lora and pissa share a parameter count: their labels sit one above the other, not on top of each other.
    assert labels["lora"].xy[0] == labels["pissa"].xy[0]
    assert labels["lora"].xyann != labels["pissa"].xyann
    assert ax.xaxis.get_major_formatter()(36864, 0) == "36.9k"
    assert [plots.format_count(v) for v in (740, 74_000, 1_200_000)] == ["740", "74k", "1.2M"]


# --- failed, diverged and unreadable records -------------------------------------------------------------------------


def test_failed_and_diverged_runs_are_listed_and_not_averaged(tmp_path: Path) -> None:
    write_run(tmp_path, "lora", "glue/sst2", "1e-4", 0, 0.80)
    write_run(tmp_path, "lora", "glue/sst2", "1e-4", 1, 0.90)
    write_run(tmp_path, "lora", "glue/sst2", "1e-4", 2, 0.99, status="failed", error="Traceback\nValueError: boom")
    write_run(tmp_path, "lora", "glue/sst2", "1e-2", 0, 0.99, status="diverged", error="loss is nan")

    runs = load_runs(tmp_path)
    board = aggregate(runs)

    chosen = cell(board, "glue/sst2", "lora")
    assert (chosen["mean"], chosen["n"], chosen["lr"]) == (pytest.approx(0.85), 2, pytest.approx(1e-4))
    assert list(board.per_lr["lr"]) == [pytest.approx(1e-4)]  # the diverged lr has no ok seed
    assert sorted(zip(runs.problems["status"], runs.problems["seed"], strict=True)) == [("diverged", 0), ("failed", 2)]


def test_corrupt_and_invalid_records_are_skipped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_run(tmp_path, "lora", "glue/sst2", "1e-4", 0, 0.8)
    corrupt = write_run(tmp_path, "lora", "glue/sst2", "1e-4", 1, 0.9) / "result.json"
    corrupt.write_text('{"status": "ok", "model": ')
    invalid = write_run(tmp_path, "lora", "glue/sst2", "1e-4", 2, 0.9) / "result.json"
    invalid.write_text(invalid.read_text().replace('"status": "ok"', '"status": "finished"'))
    # Older attempts kept aside by a relaunch are not records of the run.
    (corrupt.parent / "result.failed-1.json").write_text("{}")

    with caplog.at_level(logging.WARNING, logger="lorafactory.results.aggregate"):
        runs = load_runs(tmp_path)

    assert len(runs.records) == 1
    assert {path for path, _ in runs.skipped} == {corrupt, invalid}
    assert str(corrupt) in caplog.text and str(invalid) in caplog.text
    assert cell(aggregate(runs), "glue/sst2", "lora")["n"] == 1


def test_data_notes_reach_the_tables(tmp_path: Path) -> None:
    note = "no train split available: trained on 80% of 'validation'; not comparable to published numbers"
    write_run(tmp_path, "lora", "glue/qnli", "1e-4", 0, 0.8, data_note=note)
    write_run(tmp_path, "lora", "glue/sst2", "1e-4", 0, 0.9)

    board = aggregate(load_runs(tmp_path))
    text = markdown(board)

    assert "glue/qnli* (accuracy ↑)" in text and "glue/sst2 (accuracy ↑)" in text
    assert f"- glue/qnli* (tiny-bert): {note}" in text


def test_runs_that_only_look_like_seeds_are_flagged(tmp_path: Path) -> None:
    write_run(tmp_path, "lora", "glue/sst2", "1e-4", 0, 0.8, name="first")
    write_run(tmp_path, "lora", "glue/sst2", "1e-4", 0, 0.9, name="second")

    board = aggregate(load_runs(tmp_path))

    assert cell(board, "glue/sst2", "lora")["n"] == 2
    assert board.notes == [
        "tiny-bert glue/sst2 lora lr 0.0001: 2 runs share seed 0 (other overrides or another sweep "
        "under this folder) and are averaged together."
    ]


def test_records_disagreeing_on_direction_follow_the_majority_with_a_note(tmp_path: Path) -> None:
    write_run(tmp_path, "lora", "glue/stsb", "1e-4", 0, 0.2, direction="min")
    write_run(tmp_path, "lora", "glue/stsb", "1e-4", 1, 0.3, direction="min")
    write_run(tmp_path, "lora", "glue/stsb", "3e-4", 0, 0.1, direction="max")

    board = aggregate(load_runs(tmp_path))

    assert board.tasks.iloc[0]["direction"] == "min"
    assert cell(board, "glue/stsb", "lora")["lr"] == pytest.approx(3e-4)  # 0.1 is the lowest mean
    assert len(board.notes) == 1 and "disagree" in board.notes[0] and "loss (min)" in board.notes[0]


# --- several models, and the text formats ----------------------------------------------------------------------------


def test_one_table_per_model(tmp_path: Path) -> None:
    write_run(tmp_path, "lora", "glue/sst2", "1e-4", 0, 0.80, model="tiny-bert")
    write_run(tmp_path, "dora", "glue/sst2", "1e-4", 0, 0.70, model="tiny-bert")
    write_run(tmp_path, "lora", "glue/sst2", "1e-4", 0, 0.60, model="minilm-l6")
    write_run(tmp_path, "dora", "glue/sst2", "1e-4", 0, 0.65, model="minilm-l6")

    board = aggregate(load_runs(tmp_path))
    text = markdown(board)

    assert board.models() == ["minilm-l6", "tiny-bert"]
    assert cell(board, "glue/sst2", "dora", model="minilm-l6")["best"]
    assert cell(board, "glue/sst2", "lora", model="tiny-bert")["best"]
    minilm, bert = text.split("## minilm-l6")[1].split("## tiny-bert")
    assert "**0.650 (n=1)** lr 1e-4" in minilm and "**0.800 (n=1)** lr 1e-4" in bert
    assert "| rank | lora (baseline) | 0.600 (n=1) lr 1e-4 |" in minilm


def test_latex_is_booktabs_with_the_best_cell_bold(tmp_path: Path) -> None:
    for seed, (lora, dora) in enumerate([(0.90, 0.80), (0.92, 0.82)]):
        write_run(tmp_path, "lora", "glue/sst2", "1e-4", seed, lora)
        write_run(tmp_path, "dora", "glue/sst2", "1e-4", seed, dora)

    tex = latex(aggregate(load_runs(tmp_path)))

    assert r"\begin{tabular}{llcrrrr}" in tex  # axis, variant, one task, four cost columns
    assert r"\toprule" in tex and r"\midrule" in tex and r"\bottomrule" in tex
    assert r"lora (baseline) & \textbf{0.910 $\pm$ 0.014}" in tex
    assert r"dora & 0.810 $\pm$ 0.014" in tex
    assert r"glue/sst2 (accuracy $\uparrow$)" in tex


@pytest.mark.parametrize(("lr", "text"), [(3e-4, "3e-4"), (1.5e-3, "1.5e-3"), (0.0005, "5e-4"), (1e-2, "1e-2")])
def test_format_lr(lr: float, text: str) -> None:
    assert format_lr(lr) == text


def test_format_mean_without_spread_for_one_seed() -> None:
    assert format_mean(0.9123, float("nan"), 1) == "0.912 (n=1)"
    assert format_mean(0.9123, 0.0041, 3) == "0.912 ± 0.004 (n=3)"


# --- sweep progress --------------------------------------------------------------------------------------------------


def start_run(folder: Path, overrides: list[str], checkpoint: bool = False) -> Path:
    """What Hydra leaves in a run folder before the record: `.hydra/overrides.yaml`, and maybe a checkpoint."""
    (folder / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), folder / ".hydra" / "overrides.yaml")
    if checkpoint:
        (folder / "checkpoints").mkdir()
        (folder / "checkpoints" / "last.ckpt").write_bytes(b"")
    return folder


def write_multirun(sweep: Path, task: list[str], params: dict[str, str] | None = None) -> None:
    sweep.mkdir(parents=True, exist_ok=True)
    cfg = {
        "name": sweep.name,
        "hydra": {
            "sweep": {"dir": "runs/${name}"},
            "sweeper": {"params": params},
            "overrides": {"hydra": ["hydra.mode=MULTIRUN"], "task": task},
        },
    }
    OmegaConf.save(OmegaConf.create(cfg), sweep / "multirun.yaml")


def test_status_counts_done_failed_running_and_missing(tmp_path: Path) -> None:
    sweep = tmp_path / "study"
    # 2 variants × 2 lrs × 2 seeds = 8 runs; the lrs come from the sweep config, the rest from the command line.
    write_multirun(sweep, ["task=glue/sst2", "variant=lora,dora", "seed=0,1"], {"optim.lr": "1e-4,3e-4"})
    for variant, lr, seed, status in [
        ("lora", "1e-4", 0, "ok"),
        ("lora", "1e-4", 1, "ok"),
        ("lora", "3e-4", 0, "ok"),
        ("dora", "1e-4", 0, "failed"),
        ("dora", "3e-4", 1, "diverged"),
    ]:
        run_dir = write_run(tmp_path, variant, "glue/sst2", lr, seed, 0.9, status=status)
        start_run(run_dir, [f"optim.lr={lr}", "task=glue/sst2", f"variant={variant}", f"seed={seed}"])
    start_run(
        sweep / "tiny-bert/glue/sst2/dora/0000aaaa-s1",
        ["optim.lr=1e-4", "task=glue/sst2", "variant=dora", "seed=1"],
        checkpoint=True,
    )

    status = sweep_status(sweep)

    assert (len(status.done), len(status.failed), len(status.diverged), len(status.running)) == (3, 1, 1, 1)
    assert status.expected == 8
    assert status.missing_count == 2
    # Spelled as Hydra launches them (it writes 3e-4 as 0.0003); matching folders did not depend on the spelling.
    assert sorted(status.missing) == [
        ["optim.lr=0.0003", "task=glue/sst2", "variant=dora", "seed=0"],
        ["optim.lr=0.0003", "task=glue/sst2", "variant=lora", "seed=1"],
    ]


def test_status_matches_records_without_hydra_files_by_their_overrides(tmp_path: Path) -> None:
    write_multirun(tmp_path / "study", ["variant=lora", "task=glue/sst2", "optim.lr=1e-4", "seed=0,1,2"])
    write_run(tmp_path, "lora", "glue/sst2", "1e-4", 2, 0.9)

    status = sweep_status(tmp_path / "study")

    assert (status.expected, status.missing_count, len(status.done)) == (3, 2, 1)
    assert sorted(job[-1] for job in status.missing) == ["seed=0", "seed=1"]


def test_status_falls_back_to_counting_when_folders_cannot_be_matched(tmp_path: Path) -> None:
    sweep = tmp_path / "study"
    write_multirun(sweep, ["variant=lora,dora", "seed=0,1,2"])
    (sweep / "tiny-bert/glue/sst2/lora/1234abcd-s0/checkpoints").mkdir(parents=True)  # no .hydra, no record
    start_run(sweep / "tiny-bert/glue/sst2/lora/1234abcd-s1", ["variant=lora", "seed=1"])

    status = sweep_status(sweep)

    assert (status.expected, status.missing_count, status.missing, len(status.running)) == (6, 4, [], 2)


def test_status_of_an_optuna_search_does_not_guess_missing_runs(tmp_path: Path) -> None:
    """Its trials are decided as it goes, even when every searched value is a choice() a grid could expand."""
    sweep = tmp_path / "search"
    write_multirun(sweep, ["variant=lora"], {"variant.r": "choice(4, 8)", "optim.lr_scale": "choice(0.5, 1, 2)"})
    cfg = OmegaConf.load(sweep / "multirun.yaml")
    cfg.hydra.sweeper.optuna = {"n_trials": 3}
    OmegaConf.save(cfg, sweep / "multirun.yaml")
    write_run(tmp_path, "lora", "glue/sst2", "1e-4", 0, 0.9)

    status = sweep_status(sweep)

    assert (status.expected, status.missing_count) == (None, None)


def test_status_without_multirun_yaml_does_not_guess_missing_runs(tmp_path: Path) -> None:
    write_run(tmp_path, "lora", "glue/sst2", "1e-4", 0, 0.9)

    status = sweep_status(tmp_path)

    assert (status.expected, status.missing_count, len(status.done)) == (None, None, 1)


def test_a_best_learning_rate_at_the_edge_of_the_grid_is_flagged(tmp_path: Path) -> None:
    for lr, value in (("1e-4", 0.70), ("3e-4", 0.80), ("1e-3", 0.90)):  # still rising at the largest lr
        write_run(tmp_path, "lora", "glue/sst2", lr, 0, value)
    for lr, value in (("1e-4", 0.70), ("3e-4", 0.95), ("1e-3", 0.90)):  # optimum bracketed
        write_run(tmp_path, "dora", "glue/sst2", lr, 0, value)
    board = aggregate(load_runs(tmp_path))
    edge = [note for note in board.notes if "widen the grid" in note]
    assert edge == [
        "tiny-bert glue/sst2 lora: the best learning rate, 1e-3, is the largest tried; widen the grid to bracket its "
        "optimum."
    ]


def test_sensitivity_compares_the_variant_spread_with_the_learning_rate_range(tmp_path: Path) -> None:
    by_lr = {"lora": (0.60, 0.90, 0.85), "dora": (0.80, 0.88, 0.70), "pissa": (0.86, 0.84, 0.83)}
    for variant, values in by_lr.items():
        for lr, value in zip(("1e-4", "3e-4", "1e-3"), values, strict=True):
            write_run(tmp_path, variant, "glue/sst2", lr, 0, value)
    [row] = aggregate(load_runs(tmp_path)).sensitivity().to_dict("records")
    assert row["variant_spread"] == pytest.approx(0.90 - 0.86)  # best lrs: lora 0.90, dora 0.88, pissa 0.86
    assert row["lr_range_median"] == pytest.approx(0.18)  # ranges: lora 0.30, dora 0.18, pissa 0.03
    assert row["lr_range_max"] == pytest.approx(0.30) and row["lr_range_max_variant"] == "lora"
    assert "span 0.040" in markdown(aggregate(load_runs(tmp_path)))


def test_the_variant_spread_is_the_adapters_with_the_baselines_aside(tmp_path: Path) -> None:
    """The head alone (0.55) and full fine-tuning (0.95) would set the spread: it is about the adapters."""
    by_lr = {"lora": (0.60, 0.90), "dora": (0.80, 0.88), "head_only": (0.50, 0.55), "full": (0.95, 0.40)}
    for variant, values in by_lr.items():
        for lr, value in zip(("1e-4", "1e-3"), values, strict=True):
            write_run(tmp_path, variant, "glue/sst2", lr, 0, value, taxonomy=TAXONOMY.get(variant, "baseline"))
    board = aggregate(load_runs(tmp_path))
    [row] = board.sensitivity().to_dict("records")
    assert row["baselines_aside"] and row["variant_spread"] == pytest.approx(0.90 - 0.88)
    assert row["lr_range_max"] == pytest.approx(0.30) and row["lr_range_max_variant"] == "lora"  # not full's 0.55
    assert "the adapters (the baselines aside) span 0.020" in markdown(board)


# --- honest selection: chosen on one split, reported on another ------------------------------------------------------


def test_learning_rates_are_chosen_on_the_selection_split_and_reported_on_the_other(tmp_path: Path) -> None:
    # On the reported split 1e-2 looks best (0.90, a lucky draw); the selection split prefers 1e-3.
    for lr, final, selection in [("1e-3", 0.85, 0.88), ("1e-2", 0.90, 0.80)]:
        for seed in (0, 1):
            write_run(
                tmp_path,
                "dora",
                "glue/sst2",
                lr,
                seed,
                final,
                selection_metric=selection,
                selection_source="held-out training examples",
            )
    board = aggregate(load_runs(tmp_path))
    chosen = cell(board, "glue/sst2", "dora")
    assert (chosen["lr"], chosen["mean"], chosen["chosen_on"]) == (1e-3, 0.85, "selection")
    assert board.selection_notes == [
        "tiny-bert glue/sst2: learning rates chosen on held-out training examples; scores reported on the other split."
    ]


def test_without_a_selection_metric_on_every_run_the_choice_falls_back_and_says_so(tmp_path: Path) -> None:
    write_run(tmp_path, "dora", "glue/sst2", "1e-3", 0, 0.85, selection_metric=0.88)
    write_run(tmp_path, "dora", "glue/sst2", "1e-2", 0, 0.90)  # an older record: no selection split
    write_run(tmp_path, "lora", "glue/sst2", "1e-3", 0, 0.80)
    board = aggregate(load_runs(tmp_path))
    assert cell(board, "glue/sst2", "dora")["lr"] == 1e-2  # chosen on the reported split, as before
    assert cell(board, "glue/sst2", "dora")["chosen_on"] == "reported"
    assert board.selection_notes == [
        "tiny-bert glue/sst2: learning rates chosen on the split the scores are reported on (the records have no "
        "selection split): the best scores are optimistic, most for the noisiest variants."
    ]
