"""The study on synthetic records: learning-rate windows on curves with known windows, the cross-family table over two
models and three tasks (intervals, comparisons with LoRA, normalised scores, gap closed, ranks, costs, findings), and
the report's new files and sections, including the one-line reasons when a section cannot be computed."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
from test_results import write_run

from lorafactory.report import main
from lorafactory.results.aggregate import aggregate, load_runs
from lorafactory.results.crossfamily import axis_group, build_study
from lorafactory.results.render import crossfamily_latex, crossfamily_markdown, markdown
from lorafactory.results.sensitivity import interpolate, lr_windows, one_point, window
from lorafactory.tasks import TASKS
from lorafactory.tasks.data import Rows

# --- learning-rate windows ------------------------------------------------------------------------------------------

OCTAVES = ("2.5e-4", "5e-4", "1e-3", "2e-3", "4e-3")  # one octave apart


def windows_of(tmp_path: Path, curves: dict[str, tuple[float, ...]], **kw) -> dict[str, dict]:
    for variant, values in curves.items():
        for lr, value in zip(OCTAVES, values, strict=False):
            if value is None:
                write_run(tmp_path, variant, "glue/sst2", lr, 0, None, status="diverged", **kw)
            else:
                write_run(tmp_path, variant, "glue/sst2", lr, 0, value, **kw)
    return {row["variant"]: row for row in lr_windows(aggregate(load_runs(tmp_path))).to_dict("records")}


def test_the_window_of_a_peak_is_interpolated_in_log_learning_rate(tmp_path: Path) -> None:
    # 0.02 lost per octave on either side of 1e-3: within one point (0.01) for half an octave each way.
    found = windows_of(tmp_path, {"lora": (0.86, 0.88, 0.90, 0.88, 0.86)})["lora"]
    assert found["lr"] == 1e-3 and found["point"] == 0.01
    assert found["width"] == pytest.approx(1.0)
    assert (found["low_lr"], found["high_lr"]) == pytest.approx((1e-3 / math.sqrt(2), 1e-3 * math.sqrt(2)))
    assert found["at_edge"] == "" and found["n_lrs"] == 5
    assert (found["drop_half"], found["drop_double"]) == pytest.approx((0.02, 0.02))
    assert "can move over 1.0 octaves" in markdown(aggregate(load_runs(tmp_path)))


def test_a_window_at_the_end_of_the_grid_is_a_lower_bound_and_drops_outside_it_are_not_known(tmp_path: Path) -> None:
    found = windows_of(tmp_path, {"dora": (0.80, 0.85, 0.88, 0.895, 0.90)})["dora"]  # still rising at 4e-3
    assert found["lr"] == 4e-3 and found["at_edge"] == "high"
    # The threshold 0.89 is crossed a third of the way from 2e-3 (0.895) down to 1e-3 (0.88): 1 + 1/3 octaves.
    assert found["width"] == pytest.approx(1 + 1 / 3)
    assert found["drop_half"] == pytest.approx(0.005) and math.isnan(found["drop_double"])


def test_a_diverged_neighbour_ends_the_window_and_its_drop_is_infinite(tmp_path: Path) -> None:
    found = windows_of(tmp_path, {"pissa": (0.90, 0.90, 0.90, 0.90, None)})["pissa"]
    assert found["lr"] == 2.5e-4  # ties go to the smaller rate
    found = windows_of(tmp_path / "b", {"pissa": (0.80, 0.85, 0.89, 0.90, None)})["pissa"]
    assert found["lr"] == 2e-3 and found["at_edge"] == ""  # the grid goes on, but nothing trained there
    assert found["high_lr"] == pytest.approx(2e-3) and math.isinf(found["drop_double"])
    assert found["n_lrs"] == 4


def test_one_point_is_a_hundredth_of_a_fraction_one_bleu_point_or_one_percent_of_a_loss() -> None:
    assert one_point("accuracy", 0.9) == 0.01 and one_point("mcc", 0.4) == 0.01
    assert one_point("bleu", 65.0) == 1.0 and one_point("rouge_l", 40.0) == 1.0
    assert one_point("loss", 2.5) == pytest.approx(0.025) and one_point("perplexity", 12.0) == pytest.approx(0.12)


def test_window_and_interpolate_on_a_hand_curve() -> None:
    x, y = np.array([0.0, 1.0, 2.0, 3.0]), np.array([0.5, 0.9, 0.7, -np.inf])
    assert window(x, y, 1, 0.8) == pytest.approx((0.75, 1.5, False, False))
    assert interpolate(x, y, 1.5) == pytest.approx(0.8) and interpolate(x, y, 2.5) == -np.inf
    assert math.isnan(interpolate(x, y, -0.1)) and interpolate(x, y, 3.0) == -np.inf


# --- the cross-family study -----------------------------------------------------------------------------------------

CLASSIFICATION = ("glue/sst2", "glue/rte")
QUALITY = {"lora": 0.80, "dora": 0.88, "vera": 0.80, "pissa": 0.70, "full": 0.90, "head_only": 0.60}
LOSS = {"lora": (2.00, 2.01), "dora": (1.90, 1.93), "vera": (2.00, 2.02), "pissa": (2.20, 2.24), "full": (1.80, 1.82)}
FIELDS = {
    "vera": {"taxonomy": "rank", "tags": ["sharing", "random-basis"]},
    "full": {"taxonomy": "baseline", "tags": ["ceiling"]},
    "head_only": {"taxonomy": "baseline", "tags": ["floor"]},
}
PARAMS = {  # (tiny-bert, tiny-llama) trainable parameters
    "lora": (1000, 2000),
    "dora": (1100, 2400),
    "vera": (100, 200),
    "pissa": (1000, 2000),
    "full": (10**6, 10**7),
    "head_only": (50, None),
}
STEP = {"lora": 0.10, "dora": 0.15, "vera": 0.10, "pissa": 0.10, "full": 0.30, "head_only": 0.05}


def costs(variant: str, model: str) -> dict:
    params = PARAMS[variant][0 if model == "tiny-bert" else 1]
    return {"trainable_params": params, "step_time_s": STEP[variant], "activation_mb": 10.0, "train_state_mb": 2.0}


@pytest.fixture(scope="module")
def study_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two models, three tasks: two classification tasks on tiny-bert with per-example outputs (400 examples, 2 seeds,
    each run right on exactly its quality's share of examples, drawn at random), a loss task on tiny-llama (lower is
    better) with seeds only and an untuned score; three learning rates, a peak at 3e-4. head_only exists on tiny-bert
    only, as on a causal LM."""
    root = tmp_path_factory.mktemp("runs")
    rng = np.random.default_rng(0)
    for task in CLASSIFICATION:
        labels = rng.integers(0, 2, 400)
        for variant, quality in QUALITY.items():
            for lr, shift in (("1e-4", -0.06), ("3e-4", 0.0), ("1e-3", -0.08)):
                for seed in (0, 1):
                    right = rng.permutation(400) < round(400 * (quality + shift))
                    outputs = np.where(right, labels, 1 - labels)
                    examples = {"outputs": outputs.tolist(), "labels": labels.tolist()}
                    score = float((outputs == labels).mean())
                    fields = FIELDS.get(variant, {}) | costs(variant, "tiny-bert")
                    write_run(root, variant, task, lr, seed, score, eval_examples=examples, **fields)
    for variant, per_seed in LOSS.items():
        for lr, shift in (("1e-4", 0.3), ("3e-4", 0.0), ("1e-3", 0.5)):
            for seed, value in enumerate(per_seed):
                fields = FIELDS.get(variant, {}) | costs(variant, "tiny-llama") | {"untuned_metric": 3.0}
                write_run(
                    root, variant, "nlg/e2e", lr, seed, value + shift, direction="min", model="tiny-llama", **fields
                )
    return root


@pytest.fixture(scope="module")
def study(study_runs: Path):
    runs = load_runs(study_runs)
    board = aggregate(runs)
    return board, build_study(board, runs, bootstrap=1000)


def test_variants_group_by_axis_with_the_rank_axis_split_by_its_tags(study) -> None:
    _, found = study
    assert list(found.variants["variant"]) == ["full", "head_only", "lora", "dora", "vera", "pissa"]
    assert list(found.variants["group"]) == [
        "baseline",
        "baseline",
        "rank",
        "rank",
        "rank / sharing",
        "initialization",
    ]
    assert axis_group("rank", ("expansion", "sharing")) == "rank / expansion"
    assert axis_group("rank", ("frequency",)) == "rank" and axis_group("", ()) == "unclassified"


def test_every_score_has_the_interval_its_data_allow(study) -> None:
    _, found = study
    sst2 = found.cell("tiny-bert", "glue/sst2", "dora")
    assert (sst2["method"], sst2["seeds"], sst2["examples"]) == ("bootstrap (examples × seeds)", 2, 400)
    assert sst2["low"] < sst2["mean"] < sst2["high"] and sst2["high"] - sst2["low"] < 0.1
    e2e = found.cell("tiny-llama", "nlg/e2e", "dora")
    assert (e2e["method"], e2e["examples"]) == ("t (seeds)", 0)
    # Student's t with 1 degree of freedom over two seeds (1.90, 1.93): mean ± 12.706 · s / √2.
    assert (e2e["low"], e2e["high"]) == pytest.approx((1.915 - 12.706 * 0.015, 1.915 + 12.706 * 0.015), abs=1e-3)


def test_comparisons_with_tuned_lora_find_the_planted_differences(study) -> None:
    _, found = study
    verdicts = {(c.task, c.variant): c.vs_lora for c in found.cells.itertuples()}
    assert verdicts[("glue/sst2", "dora")] == verdicts[("glue/rte", "dora")] == "better"  # +0.08 on 400 examples
    assert verdicts[("glue/sst2", "pissa")] == "worse" and verdicts[("glue/sst2", "lora")] == "reference"
    assert verdicts[("glue/sst2", "vera")] == "indistinguishable"  # same quality as LoRA
    # Lower is better on the loss task: dora's -0.09 over two seeds is within the t interval's noise.
    e2e = found.cell("tiny-llama", "nlg/e2e", "dora")
    assert e2e["lora_diff"] == pytest.approx(-0.09) and e2e["vs_lora"] == "indistinguishable"
    assert e2e["lora_method"] == "t (seeds)" and e2e["lora_low"] < 0 < e2e["lora_high"]
    assert found.cell("tiny-llama", "nlg/e2e", "pissa")["vs_lora"] == "worse"  # +0.215 ± 0.076 (t, 1 df)


def test_the_best_of_each_task_and_those_indistinguishable_from_it(study) -> None:
    board, found = study
    marks = {(c.task, c.variant): c.vs_best for c in found.cells.itertuples()}
    assert marks[("glue/sst2", "full")] == "best" and marks[("nlg/e2e", "full")] == "best"
    assert marks[("glue/sst2", "dora")] == "indistinguishable"  # 0.88 vs 0.90
    assert marks[("glue/sst2", "lora")] == "worse"
    assert found.cell("tiny-bert", "glue/sst2", "dora")["best_variant"] == "full"
    assert "0.880 ± " in markdown(board, found) and " ≈ lr 3e-4" in markdown(board, found)


def test_normalised_scores_gap_closed_and_ranks(study) -> None:
    _, found = study
    cells = found.cells.set_index(["task", "variant"])
    lora, dora = cells.loc[("glue/sst2", "lora"), "mean"], cells.loc[("glue/sst2", "dora"), "mean"]
    assert cells.loc[("glue/sst2", "dora"), "normalised"] == pytest.approx(dora / lora)
    assert cells.loc[("nlg/e2e", "dora"), "normalised"] == pytest.approx(2.005 / 1.915)  # LoRA's loss over dora's
    floor, ceiling = cells.loc[("glue/sst2", "head_only"), "mean"], cells.loc[("glue/sst2", "full"), "mean"]
    assert cells.loc[("glue/sst2", "dora"), "gap_closed"] == pytest.approx((dora - floor) / (ceiling - floor))
    # No head_only on the causal LM: the floor is the untuned model (loss 3.0).
    assert cells.loc[("nlg/e2e", "dora"), "gap_closed"] == pytest.approx((1.915 - 3.0) / (1.81 - 3.0))
    assert found.tasks.set_index("task").loc["nlg/e2e", "floor_source"] == "untuned"
    variants = found.variants.set_index("variant")
    assert variants.loc["full", "avg_rank"] == 1.0 and variants.loc["dora", "avg_rank"] == pytest.approx(2.0)
    assert variants.loc["dora", "mean_normalised"] == pytest.approx(
        cells.xs("dora", level="variant")["normalised"].mean()
    )
    assert (variants.loc["dora", "n_better"], variants.loc["dora", "n_same"]) == (2, 1)


def test_costs_are_relative_to_the_same_models_lora_and_to_the_frozen_reference(study) -> None:
    _, found = study
    variants = found.variants.set_index("variant")
    assert variants.loc["dora", "params_x_lora"] == pytest.approx(math.sqrt(1.1 * 1.2))  # geometric mean of 2 models
    assert variants.loc["dora", "step_x_lora"] == pytest.approx(1.5)
    assert variants.loc["dora", "step_x_frozen"] == pytest.approx(3.0)  # head_only's step, on tiny-bert only
    assert variants.loc["lora", "memory_x_lora"] == 1.0


def test_ranks_across_tasks_use_the_variants_present_on_every_task(study) -> None:
    _, found = study
    test = found.rank_test
    assert (test.tasks, test.variants) == (3, 5) and "head_only" not in found.rank_variants
    ranks = dict(zip(found.rank_variants, test.average_ranks, strict=True))
    assert ranks["full"] == 1.0 and ranks["pissa"] == 5.0
    assert any("leave out head_only" in note for note in found.notes)


def test_the_findings_are_written_from_the_numbers(study) -> None:
    _, found = study
    headline, *groups, ranks = found.findings
    assert headline.startswith("Against tuned LoRA") and "2 of 9 variant × task comparisons are better" in headline
    assert "(1 of 3 variants on at least one task)" in headline
    rank_line = next(line for line in groups if line.startswith("**rank**"))
    assert "vs tuned LoRA, 2 of 3 comparisons better beyond noise (dora on glue/rte (tiny-bert) +0.0" in rank_line
    assert "learning-rate window" in rank_line
    assert ranks.startswith("Across 3 tasks and 5 variants: Friedman χ²_F = ")


def test_tables_in_markdown_and_latex(study) -> None:
    _, found = study
    md = crossfamily_markdown(found)
    header = next(line for line in md.splitlines() if line.startswith("| Axis"))
    assert "glue/sst2 (tiny-bert) ↑" in header and "nlg/e2e (tiny-llama) ↓" in header and "Step ×frozen" in header
    dora = next(line for line in md.splitlines() if line.startswith("|  | dora |"))
    assert "▲≈" in dora and "| 3.00× |" in dora
    assert "| rank / sharing | vera |" in md and "## Findings" in md
    tex = crossfamily_latex(found)
    assert r"\textbf{" in tex and r"$^{+}$$\approx$" in tex and r"head\_only" in tex and r"\bottomrule" in tex


def test_examples_that_do_not_reproduce_the_recorded_score_are_not_used(tmp_path: Path) -> None:
    labels = [0, 1] * 50
    for seed in (0, 1):
        write_run(
            tmp_path,
            "lora",
            "glue/sst2",
            "1e-3",
            seed,
            0.5 + seed / 10,
            eval_examples={"outputs": labels, "labels": labels},
        )  # 100% right, but the record says 50%/60%
    runs = load_runs(tmp_path)
    found = build_study(aggregate(runs), runs, bootstrap=200)
    assert found.cell("tiny-bert", "glue/sst2", "lora")["method"] == "t (seeds)"
    [note] = found.notes
    assert note.startswith(
        "tiny-bert glue/sst2: the per-example outputs of 2 run(s) were not used: the accuracy recomputed from them is "
        "not the recorded one (first: 1 recomputed, 0.5 recorded, in "
    )


def test_bleu_is_bootstrapped_over_meaning_representations_from_their_statistics(tmp_path: Path) -> None:
    """E2E records carry each test example's BLEU statistics: the cell's interval and the paired comparison resample
    examples (corpus BLEU of the summed statistics), not just the two seeds."""
    task = TASKS.get("nlg/e2e")
    rng = np.random.default_rng(5)
    words = "the eagle is a french restaurant near the river with low prices and a family friendly area".split()
    references = [[" ".join(rng.choice(words, size=8)) for _ in range(2)] for _ in range(60)]
    rows = Rows({"references": references})
    for variant, keep in (("lora", 0.5), ("dora", 0.8)):  # dora's outputs copy more of the references' words
        for seed in (0, 1):
            outputs = [" ".join(w if rng.random() < keep else "food" for w in refs[0].split()) for refs in references]
            score = task.score(outputs, rows)[0]["bleu"]
            examples = task.example_scores(outputs, rows)
            write_run(tmp_path, variant, "nlg/e2e", "1e-3", seed, score, primary_metric="bleu", eval_examples=examples)
    runs = load_runs(tmp_path)
    found = build_study(aggregate(runs), runs, bootstrap=500)

    assert not found.notes  # every record's statistics reproduce its BLEU
    dora = found.cell("tiny-bert", "nlg/e2e", "dora")
    assert (dora["method"], dora["seeds"], dora["examples"]) == ("bootstrap (examples × seeds)", 2, 60)
    assert dora["low"] < dora["mean"] < dora["high"]
    assert dora["vs_lora"] == "better" and dora["lora_low"] > 0


# --- the report -----------------------------------------------------------------------------------------------------


def test_the_report_writes_the_study(study_runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    assert main([str(study_runs), "--out", str(out)]) == 0

    assert {"crossfamily.md", "crossfamily.csv", "crossfamily.tex", "cd_diagram.png", "lr_windows.png"} <= {
        p.name for p in out.iterdir()
    }
    assert (out / "cd_diagram.png").read_bytes().startswith(b"\x89PNG")
    with open(out / "crossfamily.csv", newline="") as f:
        rows = {(r["model"], r["task"], r["variant"]): r for r in csv.DictReader(f)}
    assert len(rows) == 17  # 6 variants × 2 tasks + 5 on the causal LM
    assert rows[("tiny-bert", "glue/sst2", "dora")]["vs_lora"] == "better"
    assert rows[("tiny-bert", "glue/sst2", "dora")]["group"] == "rank"
    md = (out / "leaderboard.md").read_text()
    for section in ("## Findings", "## Significance", "## Average ranks across tasks", "## Learning-rate windows"):
        assert section in md
    assert "![" in md and "(cd_diagram.png)" in md
    page = (out / "index.html").read_text()
    assert '<table class="sortable">' in page and 'data-sort="' in page and "<script>" in page
    assert all(f'id="{anchor}"' in page for anchor in ("findings", "crossfamily", "significance", "ranks", "windows"))


def test_a_study_of_one_task_and_one_seed_says_why_instead_of_failing(tmp_path: Path) -> None:
    for variant, value in (("lora", 0.80), ("dora", 0.82)):
        write_run(tmp_path / "runs", variant, "glue/sst2", "1e-3", 0, value)
    out = tmp_path / "report"

    assert main([str(tmp_path / "runs"), "--out", str(out)]) == 0

    md = (out / "leaderboard.md").read_text()
    assert "Not computed: there is only one task (a rank test needs at least two)." in md
    assert "No confidence intervals or paired tests: every variant has one seed and no per-example outputs." in md
    assert not (out / "cd_diagram.png").exists() and not (out / "lr_windows.png").exists()
    assert "| rank | lora | 0.800 |" in (out / "crossfamily.md").read_text()


def test_a_task_without_intervals_beside_one_with_them_is_reported(tmp_path: Path) -> None:
    """One seed and no per-example outputs on SST-2, per-example outputs on a second task (a zoo run on text and on
    images): the first task's rows say they have no interval, the second's give theirs."""
    labels = np.arange(100) % 2
    for variant, value in (("lora", 0.82), ("dora", 0.80)):
        write_run(tmp_path / "runs", variant, "glue/sst2", "1e-3", 0, value)
        outputs = np.where(np.arange(100) < round(100 * value), labels, 1 - labels)
        examples = {"outputs": outputs.tolist(), "labels": labels.tolist()}
        write_run(tmp_path / "runs", variant, "glue/rte", "1e-3", 0, value, eval_examples=examples)
    out = tmp_path / "report"

    assert main([str(tmp_path / "runs"), "--out", str(out)]) == 0

    md = (out / "leaderboard.md").read_text()
    assert "| lora | 0.820 | none (one seed) |" in md and "bootstrap (examples): 1 seed, 100 examples" in md
    assert "Best average rank: lora 1.00; 1 other variant(s)" in md  # LoRA named once when it is the best
