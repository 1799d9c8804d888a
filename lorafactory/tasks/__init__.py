"""Tasks, by name (`glue/sst2`): where the data comes from, how an example becomes model input, which metrics count.

Each family lives in its own module and registers its tasks on import. A task declares its primary metric and that
metric's direction; the aggregator reads the direction from the run records, never from a hand-kept list.

The training module and the recipe know no task by name: they call the hooks below, whose defaults are text (or
image) classification. A family overrides what it does differently:

- `head`: the head the model needs (`classification`, or `causal-lm` for generation tasks).
- `splits` / `collator`: the training and validation examples and how they are batched.
- `validation_outputs` / `validation_metrics` / `validation_chance`: what each validation batch keeps (logits and
  labels; a causal LM keeps only its summed token loss) and the metrics computed from all of them.
- `test_set` / `evaluate`: a final evaluation that runs the model itself (generation, option scoring, held-out
  perplexity) on a test subset, also run on a small validation subset during training and on the untuned model
  before training. Classification has none: its final metrics are the last validation's.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lorafactory.registry import Registry

METRIC_DIRECTIONS = {
    "accuracy": "max",
    "mcc": "max",
    "f1": "max",
    "pearson": "max",
    "spearman": "max",
    "loss": "min",
    "bleu": "max",
    "rouge_l": "max",
    "exact_match": "max",
    "perplexity": "min",
}
EVAL_STAGES = ("untuned", "validation", "test")
"""When `Task.evaluate` runs: on the model before training (before any adapter), on a small validation subset at every
validation during training, and on the test subset once training is done."""


@dataclass
class Evaluation:
    """What `Task.evaluate` measured by running the model itself."""

    metrics: dict[str, float]
    """Metric name -> value (`bleu`, `exact_match`, ...), the task's primary metric among them."""
    chance: dict[str, float] = field(default_factory=dict)
    """The metrics of a model that learned nothing (the most frequent answer), where that is defined."""
    heldout_ce: float | None = None
    """Mean token cross-entropy on the fixed held-out text sample (before − after training is the forgetting)."""
    cost: dict[str, float] = field(default_factory=dict)
    """What the evaluation cost: `eval_s`, and for generation `generated_tokens`, `tokens_per_s`."""
    details: dict[str, Any] = field(default_factory=dict)
    """Anything else the record should keep: which answer-extraction rule matched how often, sample outputs."""
    examples: dict[str, list] = field(default_factory=dict)
    """Per evaluated example, `outputs` and `labels` from which the primary metric can be recomputed on any subset
    (`RunRecord.eval_examples`: a report bootstraps the metric over them); empty when the metric is not made that
    way."""


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
    head: str = "classification"
    """The head the task needs (`models.HEAD_KINDS`): `classification` (`num_labels` outputs) or `causal-lm`."""

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

    # --- how a family makes its data: text classification by default; other families override these two ---------
    def splits(self, preprocessor: Any, task_cfg: Any, cache_dir: Path, data_dir: Path | None) -> tuple[Any, Any]:
        """(train, eval) datasets of model-ready examples (dicts with `labels`), capped by the task's budget and
        cached so that a second run does not preprocess again. `preprocessor` is the model's tokenizer or image
        processor."""
        from lorafactory.tasks.data import task_splits

        return task_splits(
            self,
            preprocessor,
            task_cfg.max_length,
            cache_dir,
            data_dir,
            task_cfg.max_train_samples,
            task_cfg.max_eval_samples,
            task_cfg.get("selection_samples"),
        )

    def selection_set(self, preprocessor: Any, task_cfg: Any, cache_dir: Path, data_dir: Path | None) -> Any | None:
        """The selection split: `task.selection_samples` training examples set aside (never trained on) that a run
        is scored on at its end, so that a sweep chooses each variant's learning rate on them and reports the
        evaluation split, which then plays no part in the choice. None: the task selects on its validation set
        (tasks with a test set of their own) or has no selection split."""
        from lorafactory.tasks.data import task_selection

        return task_selection(
            self, preprocessor, task_cfg.max_length, cache_dir, data_dir, task_cfg.get("selection_samples")
        )

    def example_outputs(self, outputs: dict[str, Tensor]) -> dict[str, list] | None:
        """Per evaluation example, what the model answered and the truth (`outputs`: a whole validation's, as
        `validation_outputs` keeps them): predicted classes, or values for regression. The record keeps them so a
        report can bootstrap the metric over examples. None when the task's metric is not made of such answers."""
        if "logits" not in outputs:
            return None
        logits, labels = outputs["logits"], outputs["labels"]
        if self.num_labels == 1:
            return {"outputs": [round(v, 5) for v in logits.reshape(-1).tolist()], "labels": labels.tolist()}
        return {"outputs": logits.argmax(dim=-1).tolist(), "labels": labels.long().tolist()}

    def collator(self, preprocessor: Any) -> Any:
        """Turns a list of examples into a batch of tensors."""
        from lorafactory.tasks.data import PadCollator

        return PadCollator(preprocessor.pad_token_id, regression=self.num_labels == 1)

    def compute_metrics(self, outputs: Tensor, labels: Tensor) -> dict[str, float]:
        raise NotImplementedError

    # --- evaluation: the module and the recipe call these, never a task by name ---------------------------------
    def validation_outputs(self, output: Any, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """What one validation batch keeps (the module concatenates each key over the batches): the logits and labels,
        and the loss summed over the batch's examples."""
        n = len(batch["labels"])
        return {
            "logits": output.logits.detach().float(),
            "labels": batch["labels"],
            "loss_sum": output.loss.detach().float() * n,
            "count": torch.tensor(n),
        }

    def validation_metrics(self, outputs: dict[str, Tensor]) -> dict[str, float]:
        """The task's metrics over the whole validation set, `loss` included."""
        metrics = self.compute_metrics(outputs["logits"], outputs["labels"])
        metrics["loss"] = float(outputs["loss_sum"].sum() / outputs["count"].sum())
        return metrics

    def validation_chance(self, outputs: dict[str, Tensor]) -> dict[str, float]:
        """`chance_metrics` on the validation labels."""
        return self.chance_metrics(outputs["labels"])

    def test_set(self, preprocessor: Any, task_cfg: Any, cache_dir: Path, data_dir: Path | None) -> Any | None:
        """The examples of the final evaluation (`evaluate` at stage `test`), or None when the task has none."""
        return None

    def evaluate(self, model: Any, preprocessor: Any, examples: Any, task_cfg: Any, stage: str) -> Evaluation | None:
        """Metrics measured by running the model itself on `examples` (the validation set at stage `validation`, what
        `test_set` returned at `untuned` and `test`), in eval mode and without gradients; None when there is
        nothing beyond the validation loop's metrics. Stages: `EVAL_STAGES`."""
        return None

    def chance_metrics(self, labels: Tensor) -> dict[str, float]:
        """The metrics of a model that learned nothing: it predicts the majority class (or, for regression, a
        constant). A result within noise of these is no result."""
        if self.num_labels == 1:
            return self.compute_metrics(torch.zeros(len(labels), 1), labels)
        majority = int(torch.bincount(labels.long(), minlength=self.num_labels).argmax())
        outputs = torch.nn.functional.one_hot(torch.full((len(labels),), majority), self.num_labels).float()
        return self.compute_metrics(outputs, labels)


TASKS: Registry[Task] = Registry("task")
TASK_FAMILIES: Registry[Callable[[Any], Task]] = Registry("task family")
"""Families of tasks defined by config alone: a task YAML with `family: <name>` is built by `TASK_FAMILIES[name]` from
its own fields (the dataset, its columns, its labels), so adding such a task is adding a YAML file."""


def get_task(cfg: Any) -> Task:
    """The task a `task` config node describes: built by its family when it names one, else registered by name."""
    family = cfg.get("family")
    if family:
        return TASK_FAMILIES.get(family)(cfg)
    return TASKS.get(cfg.name)


for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("data", "causal", "generation", "text_metrics"):  # helpers, not families
        importlib.import_module(f"{__name__}.{_module.name}")
