"""The task's own evaluation (`Task.evaluate`: generation, option scoring, held-out loss), run the same way for every
task and variant: in eval mode, without gradients, with the adapters merged into the base weights when the variant's
update is a weight (so evaluation costs what the base model costs) and unmerged afterwards.

The untuned model's evaluation (stage `untuned`, before any adapter exists) is the same for every variant, learning
rate and seed of a sweep: it is cached under `paths.cache_dir/untuned/`, keyed by the model, the evaluation settings
and the data files, and computed once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from lorafactory.results.record import write_json_atomic
from lorafactory.tasks import Evaluation, Task
from lorafactory.tasks.data import source_stamp
from lorafactory.training.data import TaskData
from lorafactory.variants.base import merged

log = logging.getLogger(__name__)
UNTUNED_CACHE_VERSION = 1
# Task settings that change what is trained but not how the untuned model is evaluated: not part of its cache key.
TRAINING_ONLY = (
    "lr",
    "epochs",
    "max_steps",
    "batch_size",
    "max_train_samples",
    "train_in_full",
    "mask_prompt",
    "val_samples",
    "length_buckets",
    "eval_every_n_steps",
)


class Evaluator:
    """`evaluator(model, stage)`: the task's evaluation at `stage` (`tasks.EVAL_STAGES`) on the examples of that stage
    (the validation set, or the task's test set), or None when the task has nothing to evaluate there."""

    def __init__(self, task: Task, data: TaskData, merge: bool):
        self.task = task
        self.data = data
        self.merge = merge

    @property
    def has_test(self) -> bool:
        return self.data.test is not None

    def __call__(self, model: nn.Module, stage: str) -> Evaluation | None:
        examples = self.data.eval if stage == "validation" else self.data.test
        if examples is None:
            return None
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), merged(model, self.merge and stage != "untuned"):
                result = self.task.evaluate(model, self.data.preprocessor, examples, self.data.task_cfg, stage)
        finally:
            model.train(was_training)
        if result is not None:
            result.cost["merged"] = float(self.merge and stage != "untuned")
        return result

    def untuned(self, model: nn.Module, model_cfg: Any, cache_dir: Path, data_dir: Path | None) -> Evaluation | None:
        """Stage `untuned` on the model before it is adapted, from the cache when an earlier run computed it."""
        if not self.has_test:
            return None
        task_cfg = OmegaConf.to_container(self.data.task_cfg, resolve=True)
        spec = {
            "v": UNTUNED_CACHE_VERSION,
            "model": OmegaConf.to_container(model_cfg, resolve=True),
            "task": {k: v for k, v in task_cfg.items() if k not in TRAINING_ONLY},
            "source": source_stamp(self.task, data_dir),
        }
        key = hashlib.sha1(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]
        path = cache_dir / "untuned" / self.task.name.replace("/", "__") / f"{key}.json"
        if path.is_file():
            try:
                log.info("Untuned model's evaluation from the cache: %s", path)
                return Evaluation(**json.loads(path.read_text()))
            except (OSError, ValueError, TypeError) as err:  # a damaged cache entry: measure again
                log.warning("Ignoring unreadable cache entry %s (%s)", path, err)
        result = self(model, "untuned")
        if result is not None:
            write_json_atomic(path, dataclasses.asdict(result))
        return result
