"""Tasks, by name (`glue/sst2`): where the data comes from, how an example becomes model input, which metrics count.

Each family lives in its own module and registers its tasks on import. A task declares its primary metric and that
metric's direction; the aggregator reads the direction from the run records, never from a hand-kept list.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from lorafactory.registry import Registry

METRIC_DIRECTIONS = {"accuracy": "max", "mcc": "max", "f1": "max", "pearson": "max", "spearman": "max", "loss": "min"}


@dataclass(frozen=True)
class Task:
    """A supervised task on a dataset in the Hugging Face Hub layout."""

    name: str
    hub_id: str
    subset: str | None
    num_labels: int
    """Output size of the head; 1 means regression."""
    metrics: tuple[str, ...]
    primary_metric: str
    modality: str = "text"
    train_split: str | None = "train"
    """None: the dataset has no train split here, and training data is carved out of `eval_split`."""
    eval_split: str = "validation"
    carve_fraction: float = 0.8
    """With no train split: the share of `eval_split` that becomes training data (the rest is evaluated on)."""

    @property
    def direction(self) -> str:
        return METRIC_DIRECTIONS[self.primary_metric]

    @property
    def carved(self) -> bool:
        return self.train_split is None

    @property
    def split_note(self) -> str | None:
        """Set when the splits differ from the published ones, so results are not comparable to papers."""
        if not self.carved:
            return None
        pct = round(100 * self.carve_fraction)
        return (
            f"no train split available: trained on {pct}% of '{self.eval_split}', evaluated on the other "
            f"{100 - pct}%; not comparable to published numbers"
        )

    def example_inputs(self, batch: dict[str, list[Any]]) -> tuple[list[Any], ...]:
        raise NotImplementedError

    def compute_metrics(self, outputs: Tensor, labels: Tensor) -> dict[str, float]:
        raise NotImplementedError


TASKS: Registry[Task] = Registry("task")

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("data",):
        importlib.import_module(f"{__name__}.{_module.name}")
