"""Statistics for comparing variants: confidence intervals of a score, paired differences, and rank tests across
tasks. numpy only (SciPy is a test dependency, not a runtime one); the tests check every function against SciPy.

**Confidence interval of a cell** (one variant on one task at its chosen learning rate, seeds s = 1..S).
- With per-example outputs (the record's `eval_examples`): a two-level percentile bootstrap (Efron & Tibshirani,
  *An Introduction to the Bootstrap*, 1993, ch. 6 and 13). Replicate b draws the evaluation examples with replacement
  (index vector I_b, the same for every seed and every variant of the task: one "other evaluation set"), recomputes the
  metric m_s(I_b) for each seed, draws the seeds with replacement (J_b) and averages:
  θ*_b = mean_{j ∈ J_b} m_j(I_b). The interval is the (α/2, 1 − α/2) quantiles of θ*_1..θ*_B.
- With seeds only: Student's t interval, x̄ ± t_{1−α/2, S−1} · s / √S. Resampling 2–5 numbers is no bootstrap worth
  the name: with two seeds the percentile interval is [min, max], which holds the mean only half of the time.
- One seed and no examples: no interval.

**Paired difference with a reference** (LoRA at its best learning rate, or the best variant of the task), over the
seeds both have (same seed values: same data order) and, where both have examples, the same example draws:
Δ*_b = mean_{j ∈ J_b} (m^A_j(I_b) − m^B_j(I_b)); the interval is its percentile interval and the two-sided p-value the
shifted-bootstrap one (Efron & Tibshirani §16.4): p = (1 + #{|Δ*_b − Δ̂| ≥ |Δ̂|}) / (B + 1). With seeds only, the
paired t test on the per-seed differences.

**Across tasks** (Demšar, *Statistical Comparisons of Classifiers over Multiple Data Sets*, JMLR 7:1–30, 2006): ranks
r_ij of k variants on each of N tasks (1 = best, ties averaged), average ranks R_j; Friedman's
χ²_F = 12N / (k(k+1)) · [Σ_j R_j² − k(k+1)²/4] (χ² with k − 1 df); Iman and Davenport's
F_F = (N − 1) χ²_F / (N(k − 1) − χ²_F) (F with k − 1 and (k − 1)(N − 1) df); the Nemenyi critical difference
CD = q_α √(k(k+1) / (6N)), q_α the studentized range quantile (infinite df) over √2: two variants whose average ranks
differ by at least CD differ significantly.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np

CONFIDENCE = 0.95
N_BOOTSTRAP = 2000
"""Bootstrap replicates: the Monte Carlo error of a 95% percentile bound is about 1% of the interval's width."""
_CHUNK = 1 << 21
"""Resampled values held at once (replicates × examples): bounds memory on large evaluation sets."""


# --- metrics on resampled examples ----------------------------------------------------------------------------------
# Each takes the outputs and labels of one run (n,) and an index matrix (B, n) of resampled example positions, and
# returns the metric on each resample (B,). They match lorafactory/tasks/glue.py, degenerate cases included (a
# constant prediction scores 0 correlation and 0 MCC, F1 is 0 without a true positive).


def _accuracy(outputs: np.ndarray, labels: np.ndarray, index: np.ndarray) -> np.ndarray:
    return (outputs == labels).astype(np.float64)[index].mean(axis=1)


def _f1(outputs: np.ndarray, labels: np.ndarray, index: np.ndarray) -> np.ndarray:
    """F1 of the positive class (label 1): 2TP / (2TP + FP + FN)."""
    tp = ((outputs == 1) & (labels == 1)).astype(np.float64)[index].sum(axis=1)
    wrong = (outputs != labels).astype(np.float64)[index].sum(axis=1)
    return np.where(tp > 0, 2 * tp / np.maximum(2 * tp + wrong, 1), 0.0)


def _mcc(outputs: np.ndarray, labels: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Multiclass Matthews correlation (Gorodkin 2004) from each resample's confusion matrix C (true × predicted):
    (c·n − Σ_k t_k p_k) / √((n² − Σ p_k²)(n² − Σ t_k²)), c = trace, t / p the true / predicted totals."""
    k = int(max(outputs.max(), labels.max())) + 1  # classes never seen in either add nothing to any term
    codes = labels.astype(np.int64) * k + outputs.astype(np.int64)
    rows = len(index)
    flat = codes[index] + (np.arange(rows, dtype=np.int64) * k * k)[:, None]
    confusion = np.bincount(flat.ravel(), minlength=rows * k * k).reshape(rows, k, k).astype(np.float64)
    n = confusion.sum(axis=(1, 2))
    correct = np.trace(confusion, axis1=1, axis2=2)
    true_totals, pred_totals = confusion.sum(axis=2), confusion.sum(axis=1)
    numerator = correct * n - (true_totals * pred_totals).sum(axis=1)
    denominator = np.sqrt((n**2 - (pred_totals**2).sum(axis=1)) * (n**2 - (true_totals**2).sum(axis=1)))
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)


def _correlation(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson's r of each row pair; 0 when either row is constant."""
    x = x - x.mean(axis=1, keepdims=True)
    y = y - y.mean(axis=1, keepdims=True)
    numerator = (x * y).sum(axis=1)
    denominator = np.sqrt((x * x).sum(axis=1) * (y * y).sum(axis=1))
    # Rows that are constant up to rounding have a denominator at floating-point noise level: treat them as constant.
    tiny = 1e-12 * (np.abs(x).max(axis=1) + np.abs(y).max(axis=1) + 1.0) ** 2
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > tiny)


def _pearson(outputs: np.ndarray, labels: np.ndarray, index: np.ndarray) -> np.ndarray:
    return _correlation(outputs.astype(np.float64)[index], labels.astype(np.float64)[index])


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks along the last axis, 1 = smallest, ties sharing the mean of their positions (Spearman's and
    Friedman's convention)."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, axis=-1, kind="stable")
    ordered = np.take_along_axis(values, order, axis=-1)
    n = values.shape[-1]
    positions = np.broadcast_to(np.arange(n), values.shape)
    starts = np.ones(values.shape, dtype=bool)
    starts[..., 1:] = ordered[..., 1:] != ordered[..., :-1]
    ends = np.ones(values.shape, dtype=bool)
    ends[..., :-1] = starts[..., 1:]
    # First and last position of each element's run of ties, carried forward / backward along the sorted axis.
    first = np.maximum.accumulate(np.where(starts, positions, 0), axis=-1)
    last = np.flip(np.minimum.accumulate(np.flip(np.where(ends, positions, n - 1), axis=-1), axis=-1), axis=-1)
    ranks = np.empty(values.shape)
    np.put_along_axis(ranks, order, (first + last) / 2 + 1, axis=-1)
    return ranks


def _spearman(outputs: np.ndarray, labels: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Pearson's r of the average ranks within each resample (repeated examples tie)."""
    x, y = outputs.astype(np.float64)[index], labels.astype(np.float64)[index]
    return _correlation(average_ranks(x), average_ranks(y))


def _mean_output(outputs: np.ndarray, labels: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Metrics that are the mean of a per-example score held in `outputs` (exact match: 1 correct, 0 not)."""
    return outputs.astype(np.float64)[index].mean(axis=1)


def bleu_from_statistics(stats: np.ndarray) -> np.ndarray:
    """Corpus BLEU (0–100) from summed sufficient statistics (..., 10) in sacrebleu's order (hypothesis length,
    reference length, matches for n = 1..4, totals for n = 1..4): sacrebleu's `compute_bleu` with its corpus defaults
    (exponential smoothing of zero matches, all four orders), vectorised over the leading axes."""
    stats = np.asarray(stats, dtype=np.float64)
    sys_len, ref_len, correct, total = stats[..., 0], stats[..., 1], stats[..., 2:6], stats[..., 6:10]
    with np.errstate(divide="ignore", invalid="ignore"):
        brevity = np.where(sys_len < ref_len, np.exp(1 - ref_len / np.where(sys_len > 0, sys_len, 1)), 1.0)
        brevity = np.where((sys_len < ref_len) & (sys_len <= 0), 0.0, brevity)
        # A zero match count at order n gets 100 / (2^k · total), k counting the zero orders so far (mteval's rule).
        halvings = np.cumsum(correct == 0, axis=-1)
        precision = np.where(correct > 0, 100 * correct / total, 100 / (2.0**halvings * total))
        log_mean = np.log(precision).mean(axis=-1)
    # No n-gram of some order at all (a precision of 0 to sacrebleu), or no match of any order: BLEU is 0.
    zero = (total <= 0).any(axis=-1) | (correct <= 0).all(axis=-1)
    return np.where(zero, 0.0, brevity * np.exp(np.where(zero, 0.0, log_mean)))


def _bleu(outputs: np.ndarray, labels: np.ndarray, index: np.ndarray) -> np.ndarray:
    """`outputs` (n, 10): each example's BLEU statistics (`tasks.text_metrics.bleu_statistics`); a resample's BLEU is
    that of their sum."""
    return bleu_from_statistics(outputs[index].sum(axis=1))


MetricOnResamples = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
EXAMPLE_METRICS: dict[str, MetricOnResamples] = {
    "accuracy": _accuracy,
    "f1": _f1,
    "mcc": _mcc,
    "pearson": _pearson,
    "spearman": _spearman,
    "exact_match": _mean_output,
    "bleu": _bleu,
}
"""Primary metrics that can be recomputed from per-example outputs, by name."""


def example_metric(metric: str, outputs: Sequence[float], labels: Sequence[float]) -> float:
    """`metric` on the whole evaluation set (no resampling)."""
    outputs, labels = np.asarray(outputs), np.asarray(labels)
    return float(EXAMPLE_METRICS[metric](outputs, labels, np.arange(len(labels))[None, :])[0])


# --- the bootstrap --------------------------------------------------------------------------------------------------


def rng_for(*keys: object, seed: int = 0) -> np.random.Generator:
    """A generator seeded by `seed` and the names in `keys`: the same cell gets the same draws whatever else the
    report holds, and runs of the report agree to the last digit."""
    return np.random.default_rng([seed, *(zlib.crc32(str(key).encode()) for key in keys)])


@dataclass(frozen=True)
class ExampleDraws:
    """B resamples with replacement of n evaluation examples, regenerated in chunks from one seed: every variant of
    a task sees the same draws (the pairing), and memory stays bounded by `_CHUNK`."""

    n: int
    replicates: int = N_BOOTSTRAP
    seed: int = 0

    def chunks(self) -> Iterator[np.ndarray]:
        rng = np.random.default_rng(self.seed)
        rows = max(1, _CHUNK // max(self.n, 1))
        for start in range(0, self.replicates, rows):
            yield rng.integers(0, self.n, size=(min(rows, self.replicates - start), self.n), dtype=np.int64)

    def metric(self, metric: str, outputs: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """`metric` on each of the B resamples: (B,)."""
        function = EXAMPLE_METRICS[metric]
        return np.concatenate([function(outputs, labels, index) for index in self.chunks()])


def average_over_seeds(replicates: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(S, B) per-seed replicates → (B,): the mean over S seeds drawn with replacement, afresh for each replicate
    (the second level of the bootstrap); one seed is returned as it is."""
    seeds, n_boot = replicates.shape
    if seeds == 1:
        return replicates[0]
    drawn = rng.integers(0, seeds, size=(n_boot, seeds))
    return replicates[drawn, np.arange(n_boot)[:, None]].mean(axis=1)


def percentile_interval(replicates: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    tail = (1 - confidence) / 2
    low, high = np.quantile(replicates, [tail, 1 - tail])
    return float(low), float(high)


def bootstrap_p_value(replicates: np.ndarray, estimate: float) -> float:
    """Two-sided p-value of H0: θ = 0 from the bootstrap distribution shifted to the null (Efron & Tibshirani §16.4):
    (1 + #{|θ*_b − θ̂| ≥ |θ̂|}) / (B + 1). The +1 keeps it from ever reading 0."""
    extreme = np.abs(replicates - estimate) >= abs(estimate) - 1e-12 * max(1.0, abs(estimate))
    return float((1 + extreme.sum()) / (len(replicates) + 1))


def t_interval(values: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Student's t interval of the mean: x̄ ± t_{(1+c)/2, n−1} · s / √n (n ≥ 2)."""
    values = np.asarray(values, dtype=np.float64)
    mean, half = values.mean(), 0.0
    spread = values.std(ddof=1)
    if spread > 0:
        half = t_quantile((1 + confidence) / 2, len(values) - 1) * spread / math.sqrt(len(values))
    return float(mean - half), float(mean + half)


def t_test_p_value(values: np.ndarray) -> float:
    """Two-sided p-value of the one-sample t test of mean 0 (the paired t test on differences)."""
    values = np.asarray(values, dtype=np.float64)
    mean, spread = values.mean(), values.std(ddof=1)
    if spread == 0:
        return 1.0 if mean == 0 else 0.0
    return t_two_sided(abs(mean) / (spread / math.sqrt(len(values))), len(values) - 1)


@dataclass(frozen=True)
class Interval:
    """A point estimate and its confidence interval; `p_value` for differences (H0: 0)."""

    estimate: float
    low: float
    high: float
    method: str
    """`bootstrap (examples × seeds)`, `bootstrap (examples)` or `t (seeds)`."""
    seeds: int
    examples: int = 0
    p_value: float | None = None

    def contains_zero(self) -> bool:
        return self.low <= 0 <= self.high


def _method(examples: int, seeds: int) -> str:
    if not examples:
        return "t (seeds)"
    return "bootstrap (examples × seeds)" if seeds > 1 else "bootstrap (examples)"


def cell_interval(
    values: np.ndarray,
    replicates: np.ndarray | None,
    rng: np.random.Generator,
    n_examples: int = 0,
    confidence: float = CONFIDENCE,
) -> Interval | None:
    """The interval of a cell's score (mean of `values` over seeds). `replicates` (S, B): each seed's metric on the
    task's example draws, or None without examples. None when there is one seed and no examples."""
    values = np.asarray(values, dtype=np.float64)
    if replicates is not None:
        low, high = percentile_interval(average_over_seeds(replicates, rng), confidence)
    elif len(values) >= 2:
        low, high, n_examples = *t_interval(values, confidence), 0
    else:
        return None
    return Interval(float(values.mean()), low, high, _method(n_examples, len(values)), len(values), n_examples)


def paired_difference(
    values: np.ndarray,
    reference: np.ndarray,
    replicates: np.ndarray | None,
    reference_replicates: np.ndarray | None,
    rng: np.random.Generator,
    n_examples: int = 0,
    confidence: float = CONFIDENCE,
) -> Interval | None:
    """Δ = mean over common seeds of (value − reference value), aligned by seed, with its interval and two-sided
    p-value: the paired bootstrap when both sides have replicates on the same draws (S, B), else the paired t test.
    None when there is one common seed and no examples."""
    values, reference = np.asarray(values, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    differences = values - reference
    estimate = float(differences.mean())
    if replicates is not None and reference_replicates is not None:
        draws = average_over_seeds(replicates - reference_replicates, rng)
        low, high = percentile_interval(draws, confidence)
        return Interval(
            estimate,
            low,
            high,
            _method(n_examples, len(values)),
            len(values),
            n_examples,
            bootstrap_p_value(draws, estimate),
        )
    if len(differences) < 2:
        return None
    low, high = t_interval(differences, confidence)
    return Interval(estimate, low, high, "t (seeds)", len(values), 0, t_test_p_value(differences))


# --- ranks across tasks (Demšar 2006) -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RankTest:
    """Friedman's test and the Nemenyi critical difference over N tasks (blocks) and k variants."""

    average_ranks: np.ndarray
    """(k,): 1 = best."""
    tasks: int
    chi2: float
    chi2_p: float
    iman_davenport: float
    iman_davenport_p: float
    alpha: float
    critical_difference: float

    @property
    def variants(self) -> int:
        return len(self.average_ranks)


def friedman(scores: np.ndarray, alpha: float = 0.05) -> RankTest:
    """Friedman / Iman–Davenport / Nemenyi on `scores` (N tasks × k variants, higher is better), as Demšar (2006)
    §3.2.2 writes them (no correction for ties: SciPy's `friedmanchisquare` applies one, and agrees without ties)."""
    scores = np.asarray(scores, dtype=np.float64)
    n, k = scores.shape
    if n < 2 or k < 2:
        raise ValueError(f"a Friedman test needs at least 2 tasks and 2 variants, got {n} and {k}")
    return friedman_from_ranks(average_ranks(-scores).mean(axis=0), n, alpha)


def friedman_from_ranks(ranks: Sequence[float], n: int, alpha: float = 0.05) -> RankTest:
    """The same from average ranks R_j over `n` tasks (as papers print them)."""
    ranks = np.asarray(ranks, dtype=np.float64)
    k = len(ranks)
    chi2 = 12 * n / (k * (k + 1)) * (float((ranks**2).sum()) - k * (k + 1) ** 2 / 4)
    denominator = n * (k - 1) - chi2
    # Every task ranking the variants the same way makes χ²_F = N(k − 1): F_F is infinite, its p-value 0.
    f = math.inf if denominator <= 0 else (n - 1) * chi2 / denominator
    f_p = 0.0 if math.isinf(f) else f_sf(f, k - 1, (k - 1) * (n - 1))
    return RankTest(ranks, n, chi2, chi2_sf(chi2, k - 1), f, f_p, alpha, critical_difference(k, n, alpha))


def critical_difference(k: int, n: int, alpha: float = 0.05) -> float:
    """Nemenyi's CD = q_α √(k(k+1) / (6N)) for k variants over N tasks."""
    return nemenyi_q(k, alpha) * math.sqrt(k * (k + 1) / (6 * n))


@cache
def nemenyi_q(k: int, alpha: float = 0.05) -> float:
    """q_α of the two-tailed Nemenyi test: the 1 − α quantile of the studentized range of k standard normals
    (infinite degrees of freedom), over √2 (Demšar 2006, Table 5a). The range's distribution function is one
    integral over the smallest value z: P(R ≤ q) = k ∫ φ(z) [Φ(z + q) − Φ(z)]^(k−1) dz, inverted by bisection."""
    if k < 2:
        raise ValueError(f"the Nemenyi test compares at least 2 variants, got {k}")
    z = np.linspace(-9.0, 9.0, 1801)  # the integrand is smooth and ~0 beyond ±9: trapezoids of 0.01 give 1e-9
    density, cdf = normal_pdf(z), normal_cdf(z)

    def range_cdf(q: float) -> float:
        return float(k * np.trapezoid(density * (normal_cdf(z + q) - cdf) ** (k - 1), z))

    low, high = 0.0, 20.0
    for _ in range(48):  # 20 / 2^48: far below the 3 decimals tables print
        middle = (low + high) / 2
        low, high = (middle, high) if range_cdf(middle) < 1 - alpha else (low, middle)
    return (low + high) / 2 / math.sqrt(2)


def cliques(ranks: Sequence[float], cd: float) -> list[tuple[int, ...]]:
    """Groups of variants not significantly different from each other, as a CD diagram joins them: the maximal runs
    of variants, in order of average rank, whose ranks span less than `cd`. Indices into `ranks`, best first."""
    order = np.argsort(np.asarray(ranks, dtype=np.float64), kind="stable")
    sorted_ranks = np.asarray(ranks, dtype=np.float64)[order]
    groups, reach = [], -1
    for i in range(len(order)):
        j = i
        while j + 1 < len(order) and sorted_ranks[j + 1] - sorted_ranks[i] < cd:
            j += 1
        if j > i and j > reach:  # a run inside the previous one is not maximal
            groups.append(tuple(int(v) for v in order[i : j + 1]))
            reach = j
    return groups


# --- distribution functions (what SciPy would give; checked against it in the tests) --------------------------------


def normal_pdf(x: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


_ERF = np.frompyfunc(math.erf, 1, 1)


def normal_cdf(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + _ERF(np.asarray(x) / math.sqrt(2)).astype(np.float64))


def chi2_sf(x: float, df: float) -> float:
    """P(χ²_df > x) = Q(df/2, x/2), the regularized upper incomplete gamma function."""
    return 1.0 if x <= 0 else _gamma_q(df / 2, x / 2)


def f_sf(x: float, d1: float, d2: float) -> float:
    """P(F_{d1,d2} > x) = I_{d2/(d2 + d1 x)}(d2/2, d1/2)."""
    return 1.0 if x <= 0 else _beta_i(d2 / 2, d1 / 2, d2 / (d2 + d1 * x))


def t_two_sided(t: float, df: float) -> float:
    """P(|T_df| > t) = I_{df/(df + t²)}(df/2, 1/2)."""
    return _beta_i(df / 2, 0.5, df / (df + t * t))


@cache  # a report asks for the same few (p, df) for every cell
def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with df degrees of freedom (p > 0.5), by bisection on `t_two_sided`."""
    target = 2 * (1 - p)
    low, high = 0.0, 1.0
    while t_two_sided(high, df) > target:
        high *= 2
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if t_two_sided(middle, df) > target else (low, middle)
    return (low + high) / 2


def _beta_i(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (Numerical Recipes §6.4), on
    the side of x where it converges fast."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _beta_fraction(a, b, x) / a
    return 1.0 - front * _beta_fraction(b, a, 1 - x) / b


def _beta_fraction(a: float, b: float, x: float) -> float:
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 1000):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return result


def _gamma_q(a: float, x: float) -> float:
    """The regularized upper incomplete gamma function Q(a, x): the series for P below a + 1, the continued fraction
    for Q above (Numerical Recipes §6.2)."""
    log_front = a * math.log(x) - x - math.lgamma(a)
    if x < a + 1:
        term = total = 1.0 / a
        for n in range(1, 1000):
            term *= x / (a + n)
            total += term
            if abs(term) < abs(total) * 1e-16:
                break
        return max(0.0, 1.0 - total * math.exp(log_front))
    tiny = 1e-300
    b = x + 1 - a
    c, d = 1 / tiny, 1 / b
    result = d
    for n in range(1, 1000):
        numerator = -n * (n - a)
        b += 2
        d = numerator * d + b
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = b + numerator / c
        c = c if abs(c) > tiny else tiny
        result *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * result
