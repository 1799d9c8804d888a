"""Tasks: registry ↔ configs, GLUE metrics against reference formulas, carved splits, the tokenisation cache."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny
from omegaconf import OmegaConf

import lorafactory.tasks.data as data_module
from lorafactory.config import CONF_DIR, group_options
from lorafactory.errors import DataMissingError
from lorafactory.tasks import METRIC_DIRECTIONS, TASKS, get_task
from lorafactory.tasks.data import PadCollator, task_splits


def test_every_task_has_a_config_and_every_config_a_task():
    """A registered task has its YAML; a YAML is a registered task or one its family builds from the YAML."""
    assert set(TASKS.names()) <= set(group_options("task"))
    for option in group_options("task"):
        cfg = OmegaConf.load(CONF_DIR / "task" / f"{option}.yaml")
        assert cfg.name == option and get_task(cfg).name == option


@pytest.mark.parametrize("name", group_options("task"))
def test_task_declares_its_primary_metric_and_direction(name):
    task = get_task(OmegaConf.load(CONF_DIR / "task" / f"{name}.yaml"))
    assert task.primary_metric in task.metrics
    assert task.direction == METRIC_DIRECTIONS[task.primary_metric]
    assert set(task.metrics) <= set(METRIC_DIRECTIONS)


def reference_mcc(pred: np.ndarray, gold: np.ndarray) -> float:
    tp = np.sum((pred == 1) & (gold == 1))
    tn = np.sum((pred == 0) & (gold == 0))
    fp = np.sum((pred == 1) & (gold == 0))
    fn = np.sum((pred == 0) & (gold == 1))
    return (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))


def test_classification_metrics_match_reference_formulas():
    rng = np.random.default_rng(0)
    gold = rng.integers(0, 2, 200)
    pred = np.where(rng.random(200) < 0.7, gold, 1 - gold)
    logits = torch.nn.functional.one_hot(torch.tensor(pred), 2).float() * 3 - 1
    labels = torch.tensor(gold)
    tp = np.sum((pred == 1) & (gold == 1))
    f1 = 2 * tp / (2 * tp + np.sum(pred != gold))
    cola = TASKS.get("glue/cola").compute_metrics(logits, labels)
    mrpc = TASKS.get("glue/mrpc").compute_metrics(logits, labels)
    assert cola["mcc"] == pytest.approx(reference_mcc(pred, gold), abs=1e-6)
    assert cola["accuracy"] == pytest.approx(np.mean(pred == gold))
    assert mrpc["f1"] == pytest.approx(f1, abs=1e-6)
    assert set(TASKS.get("glue/sst2").compute_metrics(logits, labels)) == {"accuracy"}


def test_degenerate_predictions_score_zero_correlation():
    """A model that only learned the majority class (or one constant value) has no correlation with the labels."""
    labels = torch.tensor([1] * 365 + [0] * 162)
    constant = torch.nn.functional.one_hot(torch.ones(527, dtype=torch.long), 2).float()
    assert TASKS.get("glue/cola").compute_metrics(constant, labels)["mcc"] == 0.0
    flat = TASKS.get("glue/stsb").compute_metrics(torch.full((20, 1), 2.5), torch.linspace(0, 5, 20))
    assert flat == {"pearson": 0.0, "spearman": 0.0}


def test_spearman_handles_ties_with_average_ranks():
    from scipy.stats import spearmanr

    pred = torch.tensor([1.0, 2.0, 2.0, 3.0, 5.0, 5.0, 5.0, 0.5])
    gold = torch.tensor([0.0, 1.0, 3.0, 2.0, 4.0, 5.0, 4.0, 1.0])
    out = TASKS.get("glue/stsb").compute_metrics(pred.unsqueeze(1), gold)
    assert out["spearman"] == pytest.approx(spearmanr(pred.numpy(), gold.numpy()).statistic, abs=1e-9)


def test_multiclass_mcc_matches_scikit_style_reference():
    from lorafactory.tasks.glue import mcc

    rng = np.random.default_rng(2)
    gold = rng.integers(0, 3, 300)
    pred = np.where(rng.random(300) < 0.6, gold, rng.integers(0, 3, 300))
    confusion = np.zeros((3, 3))
    np.add.at(confusion, (gold, pred), 1)
    t, p, c, s = confusion.sum(1), confusion.sum(0), np.trace(confusion), confusion.sum()
    expected = (c * s - t @ p) / np.sqrt((s**2 - p @ p) * (s**2 - t @ t))
    assert mcc(torch.tensor(pred), torch.tensor(gold), 3) == pytest.approx(expected)


def test_regression_metrics_match_reference_formulas():
    rng = np.random.default_rng(1)
    gold = rng.uniform(0, 5, 100)
    pred = gold + rng.normal(0, 1, 100)
    out = TASKS.get("glue/stsb").compute_metrics(torch.tensor(pred).unsqueeze(1), torch.tensor(gold))
    ranks = lambda a: np.argsort(np.argsort(a))  # noqa: E731  (no ties in continuous data)
    assert out["pearson"] == pytest.approx(np.corrcoef(pred, gold)[0, 1], abs=1e-5)
    assert out["spearman"] == pytest.approx(np.corrcoef(ranks(pred), ranks(gold))[0, 1], abs=1e-5)


def test_splits_come_from_the_mirror_capped_by_a_fixed_subset(fake_mirror, cache_dir):
    tok = tiny("tiny-bert").tokenizer
    task = TASKS.get("glue/sst2")
    train, evaluation = task_splits(task, tok, 32, cache_dir, fake_mirror, max_train_samples=16)
    again, _ = task_splits(task, tok, 32, cache_dir, fake_mirror, max_train_samples=16)
    assert len(train) == 16 and len(evaluation) == 24
    assert train.columns["input_ids"] == again.columns["input_ids"]  # the same subset for every run
    assert set(train.columns) >= {"input_ids", "attention_mask", "labels"}
    assert all(ids[0] == tok.cls_token_id for ids in train.columns["input_ids"])


def test_regression_labels_are_floats(fake_mirror, cache_dir):
    train, _ = task_splits(TASKS.get("glue/stsb"), tiny("tiny-bert").tokenizer, 32, cache_dir, fake_mirror)
    assert all(isinstance(v, float) for v in train.columns["labels"])


def test_qnli_carves_disjoint_train_and_eval_from_validation(fake_mirror, cache_dir):
    task = TASKS.get("glue/qnli")
    train, evaluation = task_splits(task, tiny("tiny-bert").tokenizer, 64, cache_dir, fake_mirror)
    assert (len(train), len(evaluation)) == (40, 10)
    as_set = lambda rows: {tuple(ids) for ids in rows.columns["input_ids"]}  # noqa: E731
    assert not as_set(train) & as_set(evaluation)
    assert task.carved and "not comparable" in task.split_note


def test_second_run_does_not_tokenise_again(fake_mirror, tmp_path, monkeypatch):
    tok = tiny("tiny-bert").tokenizer
    task = TASKS.get("glue/sst2")
    first = task_splits(task, tok, 32, tmp_path, fake_mirror)

    def no_reload(*args, **kwargs):
        raise AssertionError("raw data loaded again: the tokenisation cache was not used")

    monkeypatch.setattr(data_module, "load_split", no_reload)
    second = task_splits(task, tok, 32, tmp_path, fake_mirror)
    assert first[0].columns == second[0].columns
    # A different max length is a different tokenisation: it must not be served from this cache.
    with pytest.raises(AssertionError, match="cache was not used"):
        task_splits(task, tok, 16, tmp_path, fake_mirror)


def test_missing_data_names_the_dataset_and_how_to_provide_it(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataMissingError) as err:
        task_splits(TASKS.get("glue/rte"), tiny("tiny-bert").tokenizer, 32, tmp_path / "cache", tmp_path)
    message = str(err.value)
    assert "nyu-mll/glue" in message and "rte" in message
    assert str(tmp_path) in message and "LORAFACTORY_DATA_DIR" in message and "network" in message


def test_collator_pads_to_a_multiple_of_eight():
    collate = PadCollator(pad_id=7, regression=False)
    batch = collate(
        [
            {"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "labels": 1},
            {"input_ids": [1] * 10, "attention_mask": [1] * 10, "labels": 0},
        ]
    )
    assert batch["input_ids"].shape == (2, 16)
    assert batch["input_ids"][0, 3:].eq(7).all() and batch["attention_mask"][0, 3:].eq(0).all()
    assert batch["labels"].dtype == torch.long
    assert PadCollator(0, regression=True)([{"input_ids": [1], "labels": 2.5}])["labels"].dtype == torch.float32


# --- the selection split: chosen on, never trained on, never reported ------------------------------------------------


def test_selection_cut_is_fixed_disjoint_and_at_most_a_quarter():
    from lorafactory.tasks.data import selection_cut

    keep, chosen = selection_cut(100, 10)
    assert len(chosen) == 10 and sorted(keep + chosen) == list(range(100))
    assert selection_cut(100, 10) == (keep, chosen)  # the same for every run
    assert len(selection_cut(100, 60)[1]) == 25  # a tiny mirror keeps three quarters to train on
    assert selection_cut(100, 0) == (list(range(100)), []) and selection_cut(100, None)[1] == []
    assert chosen != list(range(10))  # a random draw, not the head of the split


@pytest.mark.parametrize("name", ["glue/sst2", "glue/qnli"])
@pytest.mark.parametrize("cap", [None, 8])
def test_the_selection_split_is_never_trained_on_whatever_the_budget(fake_mirror, cache_dir, name, cap):
    from lorafactory.tasks.data import task_selection

    tok, task = tiny("tiny-bert").tokenizer, TASKS.get(name)
    train, evaluation = task_splits(task, tok, 64, cache_dir, fake_mirror, cap, None, 8)
    selection = task_selection(task, tok, 64, cache_dir, fake_mirror, 8)
    as_set = lambda rows: {tuple(ids) for ids in rows.columns["input_ids"]}  # noqa: E731
    assert len(selection) == 8 and not as_set(selection) & as_set(train) and not as_set(selection) & as_set(evaluation)
    full, _ = task_splits(task, tok, 64, cache_dir, fake_mirror, None, None, 0)
    assert len(train) == (cap or len(full) - 8)  # the budget caps what is left; the selection split stays the same
    assert as_set(selection) < as_set(full)
    assert as_set(task_selection(task, tok, 64, cache_dir, fake_mirror, 8)) == as_set(selection)
    assert task_selection(task, tok, 64, cache_dir, fake_mirror, 0) is None


def test_causal_tasks_choose_on_validation_not_on_a_selection_split():
    task = TASKS.get("nlg/e2e")
    assert task.selection_set(None, OmegaConf.create({"selection_samples": 50}), Path("."), None) is None


def test_example_outputs_are_classes_or_values_with_their_labels():
    sst2, stsb = TASKS.get("glue/sst2"), TASKS.get("glue/stsb")
    logits = torch.tensor([[0.1, 0.9], [2.0, -1.0], [0.0, 0.5]])
    assert sst2.example_outputs({"logits": logits, "labels": torch.tensor([1, 1, 0])}) == {
        "outputs": [1, 0, 1],
        "labels": [1, 1, 0],
    }
    values = stsb.example_outputs({"logits": torch.tensor([[1.25], [3.5]]), "labels": torch.tensor([1.0, 4.0])})
    assert values == {"outputs": [1.25, 3.5], "labels": [1.0, 4.0]}
    assert sst2.example_outputs({"loss_sum": torch.tensor([1.0])}) is None
