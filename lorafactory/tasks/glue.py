"""GLUE (Wang et al., 2019) from `nyu-mll/glue`: CoLA, SST-2, MRPC, RTE, STS-B, QNLI with GLUE's metrics.

Offline, the mirror holds train and validation for all but QNLI, which has validation only: QNLI trains on a fixed
80% of validation and evaluates on the rest, and its records say so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lorafactory.tasks import TASKS, Task


@dataclass(frozen=True)
class GlueTask(Task):
    text_fields: tuple[str, ...] = ("sentence",)

    def example_inputs(self, batch: dict[str, list[Any]]) -> tuple[list[Any], ...]:
        return tuple(batch[f] for f in self.text_fields)

    def compute_metrics(self, outputs: Tensor, labels: Tensor) -> dict[str, float]:
        outputs = outputs.double()
        if self.num_labels == 1:
            preds, target = outputs.view(-1), labels.double().view(-1)
            found = {"pearson": correlation(preds, target), "spearman": correlation(ranks(preds), ranks(target))}
        else:
            preds, target = outputs.argmax(dim=-1), labels.long()
            found = {
                "accuracy": (preds == target).double().mean().item(),
                "mcc": mcc(preds, target, self.num_labels),
                "f1": f1(preds, target) if self.num_labels == 2 else float("nan"),
            }
        return {name: float(found[name]) for name in self.metrics}


# GLUE's metrics, written out: library versions disagree on degenerate cases. A constant prediction (a model that
# learned only the majority class, or collapsed to one value) scores 0 correlation, as in scikit-learn, not NaN.


def correlation(x: Tensor, y: Tensor) -> float:
    """Pearson's r; 0 when either side is constant."""
    x, y = x - x.mean(), y - y.mean()
    denominator = (x.square().sum() * y.square().sum()).sqrt()
    return 0.0 if denominator == 0 else float((x * y).sum() / denominator)


def ranks(x: Tensor) -> Tensor:
    """Average ranks (ties share the mean of their positions), so Pearson on ranks is Spearman's ρ."""
    order = x.argsort()
    sorted_x = x[order]
    positions = torch.arange(len(x), dtype=torch.double)
    _, inverse, counts = torch.unique_consecutive(sorted_x, return_inverse=True, return_counts=True)
    mean_position = torch.zeros(len(counts), dtype=torch.double).index_add_(0, inverse, positions) / counts
    out = torch.empty(len(x), dtype=torch.double)
    out[order] = mean_position[inverse]
    return out


def mcc(preds: Tensor, target: Tensor, num_classes: int) -> float:
    """Matthews correlation (multiclass form, Gorodkin 2004); 0 when predictions or labels are constant."""
    confusion = torch.bincount(target * num_classes + preds, minlength=num_classes**2).view(num_classes, num_classes)
    confusion = confusion.double()
    n, correct = confusion.sum(), confusion.trace()
    true_totals, pred_totals = confusion.sum(dim=1), confusion.sum(dim=0)
    numerator = correct * n - (true_totals * pred_totals).sum()
    denominator = ((n**2 - pred_totals.square().sum()) * (n**2 - true_totals.square().sum())).sqrt()
    return 0.0 if denominator == 0 else float(numerator / denominator)


def f1(preds: Tensor, target: Tensor) -> float:
    """F1 of the positive class (label 1)."""
    tp = ((preds == 1) & (target == 1)).sum().item()
    wrong = (preds != target).sum().item()
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + wrong)


def _glue(name: str, **kw: Any) -> None:
    TASKS.register(f"glue/{name}")(GlueTask(name=f"glue/{name}", hub_id="nyu-mll/glue", subset=name, **kw))


_glue("cola", num_labels=2, metrics=("mcc", "accuracy"), primary_metric="mcc")
_glue("sst2", num_labels=2, metrics=("accuracy",), primary_metric="accuracy")
_glue("mrpc", num_labels=2, metrics=("f1", "accuracy"), primary_metric="f1", text_fields=("sentence1", "sentence2"))
_glue("rte", num_labels=2, metrics=("accuracy",), primary_metric="accuracy", text_fields=("sentence1", "sentence2"))
_glue(
    "stsb",
    num_labels=1,
    metrics=("pearson", "spearman"),
    primary_metric="pearson",
    text_fields=("sentence1", "sentence2"),
)
_glue(
    "qnli",
    num_labels=2,
    metrics=("accuracy",),
    primary_metric="accuracy",
    text_fields=("question", "sentence"),
    train_split=None,
)
