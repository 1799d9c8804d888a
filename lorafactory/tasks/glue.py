"""GLUE (Wang et al., 2019) from `nyu-mll/glue`: CoLA, SST-2, MRPC, RTE, STS-B, QNLI with GLUE's metrics.

Offline, the mirror holds train and validation for all but QNLI, which has validation only: QNLI trains on a fixed
80% of validation and evaluates on the rest, and its records say so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torchmetrics.functional import matthews_corrcoef, pearson_corrcoef, spearman_corrcoef
from torchmetrics.functional.classification import binary_f1_score

from lorafactory.tasks import TASKS, Task


@dataclass(frozen=True)
class GlueTask(Task):
    text_fields: tuple[str, ...] = ("sentence",)

    def example_inputs(self, batch: dict[str, list[Any]]) -> tuple[list[Any], ...]:
        return tuple(batch[f] for f in self.text_fields)

    def compute_metrics(self, outputs: Tensor, labels: Tensor) -> dict[str, float]:
        outputs = outputs.float()
        if self.num_labels == 1:
            preds, target = outputs.view(-1), labels.float().view(-1)
            found = {
                "pearson": pearson_corrcoef(preds, target),
                "spearman": spearman_corrcoef(preds, target),
            }
        else:
            preds, target = outputs.argmax(dim=-1), labels.long()
            found = {
                "accuracy": (preds == target).float().mean(),
                "mcc": matthews_corrcoef(
                    preds, target, task="binary" if self.num_labels == 2 else "multiclass", num_classes=self.num_labels
                ),
                "f1": binary_f1_score(preds, target) if self.num_labels == 2 else torch.tensor(float("nan")),
            }
        return {name: float(found[name]) for name in self.metrics}


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
