"""Learning-rate bracketing on synthetic objectives: it finds and brackets a known optimum, extends at both edges,
respects its budget, treats divergence as worse, and resumes without running anything twice."""

from __future__ import annotations

import math

import pytest

from lorafactory.bracket import WORSE, BracketRule, best, is_bracketed, next_lrs, search


def peak_at(optimum: float, diverge_above: float = math.inf):
    """A concave score in log lr with its maximum at `optimum`; rates above `diverge_above` diverge."""

    def score(lr: float) -> float:
        return WORSE if lr > diverge_above else -((math.log2(lr) - math.log2(optimum)) ** 2)

    return score


def test_an_optimum_inside_the_grid_is_bracketed_then_refined():
    scores = search(peak_at(1.0), BracketRule())
    assert set(scores) >= {0.5, 1.0, 2.0, 4.0}
    assert best(scores) == 1.0 and is_bracketed(scores)
    assert {0.707107, 1.41421} <= set(scores)  # one round of √2 midpoints around the best
    assert len(scores) == 6


@pytest.mark.parametrize("optimum", [16.0, 0.0625])
def test_an_optimum_past_either_edge_is_reached_by_extending(optimum):
    scores = search(peak_at(optimum), BracketRule(budget=12))
    assert best(scores) == pytest.approx(optimum, rel=1e-5) and is_bracketed(scores)


def test_the_budget_stops_the_search_and_the_optimum_stays_unbracketed():
    scores = search(peak_at(1024.0), BracketRule(budget=6))
    assert len(scores) == 6 and best(scores) == 16.0 and not is_bracketed(scores)


def test_diverged_rates_count_as_worse():
    scores = search(peak_at(64.0, diverge_above=3.0), BracketRule())
    # 4 diverged, so it counts as worse: the best is bracketed between 2 and 4, at their midpoint 2√2 (< 3, trains).
    assert best(scores) == 2.82843 and is_bracketed(scores)
    assert scores[4.0] == WORSE


def test_when_everything_diverges_it_goes_down():
    assert next_lrs({0.5: WORSE, 1.0: WORSE, 2.0: WORSE, 4.0: WORSE}, BracketRule()) == [0.25]


def test_a_resumed_search_proposes_only_what_is_missing():
    rule = BracketRule()
    full = search(peak_at(1.0), rule)
    calls = []

    def counted(lr: float) -> float:
        calls.append(lr)
        return peak_at(1.0)(lr)

    partial = {lr: peak_at(1.0)(lr) for lr in list(full)[:3]}  # an interrupted search: some runs done
    while proposals := next_lrs(partial, rule):
        for lr in proposals:
            partial[lr] = counted(lr)
    assert partial == full
    assert len(calls) == len(full) - 3 and not set(calls) & set(list(full)[:3])


def test_a_tie_at_the_top_refines_rather_than_extending():
    scores = {0.5: -1.0, 1.0: 0.0, 2.0: 0.0, 4.0: -1.0}  # best ties go to the smaller rate
    assert best(scores) == 1.0 and not is_bracketed(scores)
    assert next_lrs(scores, BracketRule()) == [0.707107, 1.41421]


def test_bad_rules_are_refused():
    with pytest.raises(ValueError):
        BracketRule(step=1.0)
    with pytest.raises(ValueError):
        BracketRule(budget=2)
