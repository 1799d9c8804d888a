"""The study's statistics against SciPy, the project's own GLUE metrics, hand-computed cases and Demšar's (2006)
worked example; the bootstrap's coverage and the paired test's power and size on synthetic data (seeded, fast)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lorafactory.results import significance as sig
from lorafactory.tasks import TASKS, glue
from lorafactory.tasks.data import Rows

stats = pytest.importorskip("scipy.stats")

# --- metrics on resampled examples ----------------------------------------------------------------------------------


def project_metric(name: str, outputs: np.ndarray, labels: np.ndarray) -> float:
    """The same metric as lorafactory/tasks/glue.py computes it in training."""
    preds, target = torch.as_tensor(outputs), torch.as_tensor(labels)
    if name == "accuracy":
        return (preds == target).double().mean().item()
    if name == "f1":
        return glue.f1(preds.long(), target.long())
    if name == "mcc":
        return glue.mcc(preds.long(), target.long(), int(max(outputs.max(), labels.max())) + 1)
    if name == "pearson":
        return glue.correlation(preds.double(), target.double())
    return glue.correlation(glue.ranks(preds.double()), glue.ranks(target.double()))


def example_data(metric: str, rng: np.random.Generator, n: int = 60) -> tuple[np.ndarray, np.ndarray]:
    if metric in ("pearson", "spearman"):  # STS-B style: scores on a coarse grid, so resamples and ranks have ties
        labels = rng.integers(0, 11, n) / 2
        return np.round(labels + rng.normal(0, 1.2, n), 1), labels
    classes = 3 if metric == "mcc" else 2
    labels = rng.integers(0, classes, n)
    return np.where(rng.random(n) < 0.7, labels, rng.integers(0, classes, n)), labels


TEXT_METRICS = {"bleu": "nlg/e2e", "exact_match": "math/gsm8k"}
"""Metrics of generated text, checked against their task's own scoring (below), by the task that scores them."""


@pytest.mark.parametrize("metric", sorted(set(sig.EXAMPLE_METRICS) - set(TEXT_METRICS)))
def test_each_resample_scores_as_the_project_metric_does(metric: str) -> None:
    rng = np.random.default_rng(1)
    outputs, labels = example_data(metric, rng)
    index = rng.integers(0, len(labels), size=(25, len(labels)))

    resampled = sig.EXAMPLE_METRICS[metric](outputs, labels, index)

    expected = [project_metric(metric, outputs[row], labels[row]) for row in index]
    np.testing.assert_allclose(resampled, expected, rtol=1e-10, atol=1e-12)


WORDS = "the a cat dog sat ran on mat eagle serves french food in riverside 1 2 3 18 42".split()


def generated_text(task: str, rng: np.random.Generator, n: int = 40) -> tuple[list[str], list[list[str]]]:
    """Predictions and references of `task`'s kind: 1-3 references of 2-9 words sharing words with the prediction
    (E2E), or worked answers ending in a number, right about half of the time (GSM8K)."""
    if task == "math/gsm8k":
        answers = [str(int(x)) for x in rng.integers(0, 30, n)]
        guesses = [a if rng.random() < 0.5 else str(int(rng.integers(0, 30))) for a in answers]
        return [f"so the total is {g}.\n#### {g}" for g in guesses], [[a] for a in answers]
    predictions, references = [], []
    for _ in range(n):
        sentence = list(rng.choice(WORDS, size=int(rng.integers(2, 10))))
        predictions.append(" ".join(sentence))
        refs = []
        for _ in range(int(rng.integers(1, 4))):
            kept = [w if rng.random() < 0.7 else str(rng.choice(WORDS)) for w in sentence]
            refs.append(" ".join(kept[: int(rng.integers(2, len(kept) + 2))]))
        references.append(refs)
    return predictions, references


@pytest.mark.parametrize("metric", sorted(TEXT_METRICS))
def test_resampled_text_metrics_equal_the_tasks_own_score_of_the_resampled_examples(metric: str) -> None:
    """A resample's BLEU from the summed per-example statistics is sacrebleu's corpus BLEU of those examples (repeats
    included); a resample's exact match is the extraction-based exact match of those answers."""
    task = TASKS.get(TEXT_METRICS[metric])
    rng = np.random.default_rng(3)
    predictions, references = generated_text(task.name, rng)
    examples = task.example_scores(predictions, Rows({"references": references}))
    outputs, labels = np.asarray(examples["outputs"], dtype=np.float64), np.asarray(examples["labels"], np.float64)
    index = np.vstack([np.arange(len(labels)), rng.integers(0, len(labels), size=(20, len(labels)))])

    resampled = sig.EXAMPLE_METRICS[metric](outputs, labels, index)

    expected = [
        task.score([predictions[i] for i in row], Rows({"references": [references[i] for i in row]}))[0][metric]
        for row in index
    ]
    np.testing.assert_allclose(resampled, expected, rtol=1e-9, atol=1e-9)
    assert 0 < resampled.min() < resampled.max()  # the data are neither hopeless nor perfect: the test can fail


def test_bleu_from_statistics_is_sacrebleus_compute_bleu_on_edge_cases() -> None:
    from sacrebleu.metrics import BLEU

    rng = np.random.default_rng(4)
    total = rng.integers(0, 6, size=(400, 4))
    total = np.sort(total, axis=1)[:, ::-1]  # fewer n-grams at higher orders, some orders absent
    correct = np.minimum(rng.integers(0, 4, size=(400, 4)), total) * (rng.random((400, 4)) < 0.8)
    lengths = np.column_stack([total[:, 0], rng.integers(0, 8, 400)])  # shorter and longer than the references
    stats = np.column_stack([lengths, correct, total])

    expected = [
        BLEU.compute_bleu(
            list(map(int, r[2:6])), list(map(int, r[6:])), int(r[0]), int(r[1]), smooth_method="exp"
        ).score
        for r in stats
    ]
    np.testing.assert_allclose(sig.bleu_from_statistics(stats), expected, rtol=1e-12, atol=1e-12)
    assert (np.asarray(expected) == 0).any() and (np.asarray(expected) > 0).any()


def test_correlations_agree_with_scipy() -> None:
    outputs, labels = example_data("pearson", np.random.default_rng(2), 200)
    assert sig.example_metric("pearson", outputs, labels) == pytest.approx(stats.pearsonr(outputs, labels)[0])
    assert sig.example_metric("spearman", outputs, labels) == pytest.approx(stats.spearmanr(outputs, labels)[0])


@pytest.mark.parametrize(
    ("metric", "outputs", "labels", "expected"),
    [
        ("mcc", [1, 1, 1, 1], [0, 1, 0, 1], 0.0),  # constant prediction
        ("mcc", [0, 1, 2, 0], [0, 1, 2, 0], 1.0),
        ("mcc", [1, 0, 1, 0], [0, 1, 0, 1], -1.0),
        ("f1", [0, 0, 1, 1], [1, 1, 0, 0], 0.0),  # no true positive
        ("f1", [1, 1, 0, 0], [1, 0, 0, 1], 0.5),  # tp 1, fp 1, fn 1: 2 / (2 + 2)
        ("pearson", [2.0, 2.0, 2.0], [1.0, 2.0, 3.0], 0.0),  # constant prediction
        ("spearman", [1.0, 2.0, 2.0, 5.0], [0.1, 0.3, 0.2, 0.9], 0.9486832980505138),  # ties averaged
        ("accuracy", [3, 1, 2, 2], [3, 1, 0, 2], 0.75),
    ],
)
def test_hand_computed_cases(metric, outputs, labels, expected) -> None:
    assert sig.example_metric(metric, outputs, labels) == pytest.approx(expected)


def test_average_ranks_match_scipy_rankdata_along_rows() -> None:
    values = np.random.default_rng(3).integers(0, 5, size=(7, 12)).astype(float)  # many ties
    np.testing.assert_allclose(sig.average_ranks(values), stats.rankdata(values, axis=1))


def test_example_draws_are_the_same_for_every_call_and_bounded_in_memory(monkeypatch) -> None:
    monkeypatch.setattr(sig, "_CHUNK", 1000)  # 1000 / 300 examples: three replicates per chunk
    draws = sig.ExampleDraws(300, replicates=10, seed=4)
    chunks = list(draws.chunks())
    assert [len(c) for c in chunks] == [3, 3, 3, 1]
    assert all(np.array_equal(a, b) for a, b in zip(chunks, draws.chunks(), strict=True))
    outputs = np.arange(300) % 2
    assert draws.metric("accuracy", outputs, outputs).tolist() == [1.0] * 10


# --- distribution functions -----------------------------------------------------------------------------------------


def test_distribution_functions_match_scipy() -> None:
    for x, df in ((0.5, 1), (3.3, 4), (9.28, 3), (12.0, 7), (30.0, 5), (80.0, 60)):
        assert sig.chi2_sf(x, df) == pytest.approx(stats.chi2.sf(x, df), rel=1e-9)
    for x, d1, d2 in ((3.69, 3, 39), (0.4, 2, 10), (8.0, 5, 4), (1.0, 30, 300)):
        assert sig.f_sf(x, d1, d2) == pytest.approx(stats.f.sf(x, d1, d2), rel=1e-9)
    for t, df in ((0.3, 1), (2.1, 3), (12.7, 1), (4.0, 25)):
        assert sig.t_two_sided(t, df) == pytest.approx(2 * stats.t.sf(t, df), rel=1e-9)
    for p, df in ((0.975, 1), (0.975, 2), (0.975, 9), (0.995, 4)):
        assert sig.t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-9)


@pytest.mark.parametrize("alpha", [0.05, 0.10])
def test_nemenyi_q_is_the_studentized_range_over_root_two(alpha: float) -> None:
    for k in (2, 3, 4, 7, 10, 15, 25):
        expected = stats.studentized_range.ppf(1 - alpha, k, np.inf) / math.sqrt(2)
        assert sig.nemenyi_q(k, alpha) == pytest.approx(expected, rel=1e-8)


# Demšar (2006) Table 5(a): critical values of the two-tailed Nemenyi test for k = 2..10.
DEMSAR_Q = {
    0.05: [1.960, 2.343, 2.569, 2.728, 2.850, 2.949, 3.031, 3.102, 3.164],
    0.10: [1.645, 2.052, 2.291, 2.459, 2.589, 2.693, 2.780, 2.855, 2.920],
}


@pytest.mark.parametrize("alpha", [0.05, 0.10])
def test_nemenyi_q_reproduces_demsars_table(alpha: float) -> None:
    computed = [sig.nemenyi_q(k, alpha) for k in range(2, 11)]
    # The paper's table is rounded to 3 decimals (and, for a few entries, truncated).
    np.testing.assert_allclose(computed, DEMSAR_Q[alpha], atol=1e-3)


# --- Demšar's worked example (JMLR 7:1-30, section 3.2.2, Table 6) ---------------------------------------------------

NAMES = ["C4.5", "C4.5+m", "C4.5+cf", "C4.5+m+cf"]
# The ranks printed in Table 6 for the 14 data sets (adult (sample) ... wine).
TABLE6_RANKS = np.array(
    [
        [4, 3, 2, 1],
        [1, 2, 3, 4],
        [4, 1, 2, 3],
        [4, 1, 3, 2],
        [4, 2, 3, 1],
        [1, 2.5, 4, 2.5],
        [3, 2, 4, 1],
        [2.5, 2.5, 4, 1],
        [4, 3, 2, 1],
        [2.5, 2.5, 2.5, 2.5],
        [4, 2.5, 1, 2.5],
        [3, 2, 4, 1],
        [4, 1, 2, 3],
        [3, 1, 4, 2],
    ]
)
# Their AUCs; voting's C4.5+cf and C4.5+m+cf both print as 0.975 but rank 2 and 3 (unrounded values).
TABLE6_AUC = np.array(
    [
        [0.763, 0.768, 0.771, 0.798],
        [0.599, 0.591, 0.590, 0.569],
        [0.954, 0.971, 0.968, 0.967],
        [0.628, 0.661, 0.654, 0.657],
        [0.882, 0.888, 0.886, 0.898],
        [0.936, 0.931, 0.916, 0.931],
        [0.661, 0.668, 0.609, 0.685],
        [0.583, 0.583, 0.563, 0.625],
        [0.775, 0.838, 0.866, 0.875],
        [1.000, 1.000, 1.000, 1.000],
        [0.940, 0.962, 0.965, 0.962],
        [0.619, 0.666, 0.614, 0.669],
        [0.972, 0.981, 0.975, 0.975],
        [0.957, 0.978, 0.946, 0.970],
    ]
)


def test_ranks_from_the_aucs_are_the_published_ones() -> None:
    ranks = sig.average_ranks(-TABLE6_AUC)
    voting = 12
    np.testing.assert_array_equal(np.delete(ranks, voting, axis=0), np.delete(TABLE6_RANKS, voting, axis=0))
    assert ranks[voting].tolist() == [4, 1, 2.5, 2.5]  # the printed tie; the paper ranks it 2, 3


def test_friedman_and_nemenyi_reproduce_demsars_worked_example() -> None:
    test = sig.friedman(-TABLE6_RANKS)  # scores: a lower published rank is a better score

    np.testing.assert_allclose(test.average_ranks, [3.143, 2.000, 2.893, 1.964], atol=5e-4)
    assert (test.tasks, test.variants) == (14, 4)
    # χ²_F = 9.28 and F_F = 3.69 as printed, from the exact ranks (9.279, 3.686) as from the rounded ones.
    assert (round(test.chi2, 2), round(test.iman_davenport, 2)) == (9.28, 3.69)
    assert round(test.critical_difference, 2) == 1.25  # q_0.05 = 2.569
    # F(3, 39) exceeds its 0.05 critical value, 2.85: the null hypothesis is rejected, as in the paper.
    assert stats.f.ppf(0.95, 3, 39) == pytest.approx(2.85, abs=0.01) and test.iman_davenport_p < 0.05
    assert test.iman_davenport_p == pytest.approx(stats.f.sf(test.iman_davenport, 3, 39))
    assert test.chi2_p == pytest.approx(stats.chi2.sf(test.chi2, 3))

    printed = sig.friedman_from_ranks([3.143, 2.000, 2.893, 1.964], 14)
    assert (round(printed.chi2, 2), round(printed.iman_davenport, 2)) == (9.28, 3.69)
    assert round(sig.critical_difference(4, 14, 0.10), 2) == 1.12  # q_0.10 = 2.291


def test_nemenyi_groups_are_demsars() -> None:
    ranks = [3.143, 2.000, 2.893, 1.964]
    at_05 = [tuple(NAMES[i] for i in group) for group in sig.cliques(ranks, sig.critical_difference(4, 14, 0.05))]
    at_10 = [tuple(NAMES[i] for i in group) for group in sig.cliques(ranks, sig.critical_difference(4, 14, 0.10))]
    # "even the difference between the best and the worst performing algorithm is already smaller than" CD at 0.05
    assert at_05 == [("C4.5+m+cf", "C4.5+m", "C4.5+cf", "C4.5")]
    # At 0.10 pure C4.5 is worse than C4.5+m and C4.5+m+cf; C4.5+cf belongs to both groups (Figure 1a).
    assert at_10 == [("C4.5+m+cf", "C4.5+m", "C4.5+cf"), ("C4.5+cf", "C4.5")]


def test_ranks_a_critical_difference_apart_differ() -> None:
    # "significantly different if the corresponding average ranks differ by at least the critical difference"
    assert sig.cliques([1.0, 2.0], 1.0) == [] and sig.cliques([2.0, 1.0, 1.9], 1.0) == [(1, 2), (2, 0)]
    assert sig.cliques([1.0, 1.5, 2.2, 2.4], 1.0) == [(0, 1), (1, 2, 3)]  # (2, 3) lies inside (1, 2, 3): not listed


def test_friedman_matches_scipy_without_ties() -> None:
    scores = np.random.default_rng(5).normal(size=(9, 5))
    scores[:, 0] += 1.0
    ours = sig.friedman(scores)
    theirs = stats.friedmanchisquare(*scores.T)
    assert ours.chi2 == pytest.approx(theirs.statistic) and ours.chi2_p == pytest.approx(theirs.pvalue)


def test_unanimous_tasks_make_an_infinite_iman_davenport_statistic() -> None:
    test = sig.friedman(np.tile([3.0, 2.0, 1.0], (5, 1)))
    assert test.chi2 == pytest.approx(10.0)  # N (k - 1): the largest χ²_F can be
    assert math.isinf(test.iman_davenport) and test.iman_davenport_p == 0.0
    with pytest.raises(ValueError, match="at least 2 tasks"):
        sig.friedman(np.ones((1, 3)))


# --- intervals ------------------------------------------------------------------------------------------------------


def test_bootstrap_intervals_over_examples_cover_the_truth_at_about_95_percent() -> None:
    rng = np.random.default_rng(6)
    truth, n, trials = 0.7, 150, 1000
    covered = 0
    for trial in range(trials):
        labels = rng.integers(0, 2, n)
        outputs = np.where(rng.random(n) < truth, labels, 1 - labels)
        draws = sig.ExampleDraws(n, replicates=300, seed=trial)
        replicates = draws.metric("accuracy", outputs, labels)[None, :]
        interval = sig.cell_interval(np.array([(outputs == labels).mean()]), replicates, rng, n)
        covered += interval.low <= truth <= interval.high
    # 1000 trials: ±1.4% at two standard errors, so a 90% or a 99% interval would fall outside.
    assert 0.925 <= covered / trials <= 0.975


def test_t_intervals_over_seeds_cover_the_truth_at_95_percent_where_a_bootstrap_would_not() -> None:
    rng = np.random.default_rng(7)
    samples = rng.normal(0.8, 0.02, size=(2000, 3))
    intervals = [sig.cell_interval(values, None, rng) for values in samples]
    coverage = np.mean([i.low <= 0.8 <= i.high for i in intervals])
    assert 0.93 <= coverage <= 0.97
    assert intervals[0].method == "t (seeds)" and intervals[0].seeds == 3
    # The percentile bootstrap of three seeds holds the mean far less often: why seeds alone get a t interval.
    boot = [sig.percentile_interval(rng.choice(values, size=(300, 3)).mean(axis=1)) for values in samples[:300]]
    assert np.mean([low <= 0.8 <= high for low, high in boot]) < 0.85
    low, high = sig.t_interval(samples[0])
    expected = stats.t.interval(0.95, 2, loc=samples[0].mean(), scale=stats.sem(samples[0]))
    assert (low, high) == pytest.approx(expected)


def test_one_seed_without_examples_has_no_interval() -> None:
    rng = np.random.default_rng(8)
    assert sig.cell_interval(np.array([0.9]), None, rng) is None
    assert sig.paired_difference(np.array([0.9]), np.array([0.8]), None, None, rng) is None


def test_seeds_are_resampled_around_the_example_draws() -> None:
    rng = np.random.default_rng(9)
    same = np.tile(np.linspace(0.5, 0.9, 50), (3, 1))  # three seeds with identical replicates: seeds add nothing
    np.testing.assert_allclose(sig.average_over_seeds(same, rng), same[0])
    spread = np.stack([np.full(50, 0.6), np.full(50, 0.8)])  # no example noise: the interval is the seed noise
    low, high = sig.percentile_interval(sig.average_over_seeds(spread, rng))
    assert (low, high) == pytest.approx((0.6, 0.8))


# --- paired comparisons ---------------------------------------------------------------------------------------------


def paired_runs(rng: np.random.Generator, better: float, worse: float, n: int = 400, seeds: int = 2):
    labels = rng.integers(0, 2, n)
    runs = []
    for quality in (better, worse):
        outputs = [np.where(rng.random(n) < quality, labels, 1 - labels) for _ in range(seeds)]
        runs.append(outputs)
    return labels, runs


def compare(labels, runs, seed: int, replicates: int = 500) -> sig.Interval:
    draws = sig.ExampleDraws(len(labels), replicates, seed)
    values, reps = [], []
    for outputs in runs:
        values.append(np.array([(o == labels).mean() for o in outputs]))
        reps.append(np.stack([draws.metric("accuracy", o, labels) for o in outputs]))
    return sig.paired_difference(values[0], values[1], reps[0], reps[1], np.random.default_rng(seed), len(labels))


def test_a_paired_bootstrap_detects_a_planted_difference() -> None:
    labels, runs = paired_runs(np.random.default_rng(10), 0.85, 0.75)
    found = compare(labels, runs, seed=1)
    assert found.low > 0 and found.p_value < 0.01
    assert found.estimate == pytest.approx(0.10, abs=0.04)
    assert found.method == "bootstrap (examples × seeds)" and (found.seeds, found.examples) == (2, 400)


def test_a_paired_bootstrap_rarely_flags_a_null_difference() -> None:
    rng = np.random.default_rng(11)
    flagged = []
    for trial in range(100):
        labels, runs = paired_runs(rng, 0.8, 0.8, n=200, seeds=1)
        found = compare(labels, runs, seed=trial, replicates=300)
        flagged.append(not found.contains_zero())
    assert np.mean(flagged) <= 0.10  # nominal 0.05


def test_identical_predictions_differ_by_exactly_nothing() -> None:
    labels, runs = paired_runs(np.random.default_rng(12), 0.8, 0.8)
    found = compare(labels, [runs[0], runs[0]], seed=2)
    assert (found.estimate, found.low, found.high, found.p_value) == (0.0, 0.0, 0.0, 1.0)


def test_seeds_alone_use_the_paired_t_test() -> None:
    mine, reference = np.array([0.91, 0.93, 0.90, 0.94]), np.array([0.89, 0.90, 0.90, 0.91])
    found = sig.paired_difference(mine, reference, None, None, np.random.default_rng(0))
    scipy_test = stats.ttest_rel(mine, reference)
    assert found.method == "t (seeds)" and found.p_value == pytest.approx(scipy_test.pvalue)
    assert (found.low, found.high) == pytest.approx(tuple(scipy_test.confidence_interval(0.95)))


def test_bootstrap_p_value_counts_the_shifted_replicates_as_extreme() -> None:
    # Centred on the estimate 1.0: |θ* − 1| ≥ 1 for 0.0 and 2.5 only; (1 + 2) / (5 + 1).
    assert sig.bootstrap_p_value(np.array([0.0, 0.5, 1.0, 1.5, 2.5]), 1.0) == pytest.approx(0.5)
