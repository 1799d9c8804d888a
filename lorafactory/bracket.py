"""Learning-rate bracketing: for one (model, task, variant), which learning rates to try next so that its optimum is
known, not guessed from a grid that may end too soon.

The LoRAFactory study's central finding is that the learning rate explains more than the variant; a comparison is
fair only when each variant's best rate is *bracketed*: tried, with a worse rate tried on each side. The search
works in log learning rate (here, in `optim.lr_scale`, a multiple of the variant's default rate):

1. run the starting grid;
2. while the best mean sits at an edge of what was tried, extend past that edge by `step` (×2 by default);
3. once bracketed, refine: try the geometric midpoints between the best and its neighbours, `refine` times;
4. stop when nothing is left to try, or the cell has used its `budget` of learning rates.

Diverged or failed runs count as worse than any score. Scores are means over seeds, oriented so higher is better.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

WORSE = -math.inf
"""The score of a learning rate whose runs diverged or failed."""


@dataclass(frozen=True)
class BracketRule:
    grid: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    """Starting learning-rate scales."""
    step: float = 2.0
    """Factor by which the grid is extended past an edge holding the best."""
    budget: int = 8
    """Most learning rates tried per (model, task, variant)."""
    refine: int = 1
    """Rounds of midpoints between the bracketed best and its neighbours."""

    def __post_init__(self) -> None:
        if not self.grid or any(x <= 0 for x in self.grid):
            raise ValueError("the grid needs positive learning-rate scales")
        if self.step <= 1 or self.budget < len(self.grid) or self.refine < 0:
            raise ValueError("step must be > 1, budget at least the grid's size, refine >= 0")


def canonical(x: float) -> float:
    """Learning rates as written in overrides and run ids: 6 significant digits, so √2 midpoints stay stable."""
    return float(f"{x:.6g}")


def best(scores: Mapping[float, float]) -> float | None:
    """The learning rate with the best score; ties go to the smaller rate; None if every run diverged."""
    finite = [(s, -lr) for lr, s in scores.items() if s > WORSE]
    return -max(finite)[1] if finite else None


def is_bracketed(scores: Mapping[float, float]) -> bool:
    """Whether the best learning rate has a tried neighbour on each side, both worse."""
    top = best(scores)
    if top is None:
        return False
    lrs = sorted(scores)
    i = lrs.index(top)
    return 0 < i < len(lrs) - 1 and scores[lrs[i - 1]] < scores[top] and scores[lrs[i + 1]] < scores[top]


def next_lrs(scores: Mapping[float, float], rule: BracketRule) -> list[float]:
    """The learning rates to run next for one cell (all at once), or [] when its search is over.

    `scores` maps every learning rate tried so far to its mean score (WORSE for diverged)."""
    tried = {canonical(lr) for lr in scores}
    todo = [canonical(lr) for lr in rule.grid if canonical(lr) not in tried]
    if todo:
        return sorted(todo)[: max(0, rule.budget - len(tried))]
    left = rule.budget - len(tried)
    if left <= 0:
        return []
    lrs = sorted(scores)
    top = best(scores)
    if top is None:  # everything diverged: the rates are too large
        return [canonical(lrs[0] / rule.step)]
    i = lrs.index(top)
    if not is_bracketed(scores):
        out = []
        if i == 0:
            out.append(canonical(top / rule.step))
        if i == len(lrs) - 1:
            out.append(canonical(top * rule.step))
        if not out:  # the best's neighbour is as good as the best (a tie): no edge to push; refine instead
            return _midpoints(scores, top, rule, left)
        return out[:left]
    return _midpoints(scores, top, rule, left)


def _midpoints(scores: Mapping[float, float], top: float, rule: BracketRule, left: int) -> list[float]:
    """Geometric midpoints between the best and its neighbours, while closer than `step ** -refine` allows."""
    lrs = sorted(scores)
    i = lrs.index(top)
    finest = rule.step ** (1.0 / 2**rule.refine)  # after `refine` halvings of the log-step
    out = []
    for j in (i - 1, i + 1):
        if 0 <= j < len(lrs):
            ratio = max(lrs[j], top) / min(lrs[j], top)
            if ratio > finest * (1 + 1e-6):
                out.append(canonical(math.sqrt(lrs[j] * top)))
    return [lr for lr in out if lr not in {canonical(x) for x in scores}][:left]


def summarise(scores: Mapping[float, float]) -> dict[str, object]:
    """What a report says about one cell's search."""
    top = best(scores)
    return {"best": top, "tried": len(scores), "bracketed": is_bracketed(scores)}


def search(objective: Callable[[float], float], rule: BracketRule) -> dict[float, float]:
    """Run the whole search against a function (tests, and a reading aid): the scores of every rate tried."""
    scores: dict[float, float] = {}
    while proposals := next_lrs(scores, rule):
        for lr in proposals:
            scores[lr] = objective(lr)
    return scores
