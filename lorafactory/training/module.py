"""The LightningModule: forward, task loss, evaluation with the task's metrics. It knows nothing of variants or task
names: the optimizer, the auxiliary loss and the task's own evaluation (generation, option scoring) come in as
functions, the other variant hooks run from `VariantHooks`, and what a validation keeps and computes is the task's
(`Task.validation_outputs`, `Task.validation_metrics`)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from lorafactory.errors import Diverged, UserError
from lorafactory.tasks import Evaluation, Task
from lorafactory.training.distributed import gather_examples
from lorafactory.training.optim import SchedulerFactory, advance, carry_over_state
from lorafactory.variants.base import adapter_state_dict


class AdapterModule(L.LightningModule):
    def __init__(
        self,
        model: nn.Module,
        task: Task,
        make_optimizer: Callable[[], torch.optim.Optimizer],
        make_scheduler: SchedulerFactory,
        aux_loss: Callable[[nn.Module], Tensor | None],
        evaluate: Callable[[nn.Module, str], Evaluation | None] | None = None,
    ):
        super().__init__()
        self.model = model
        self.task = task
        self.make_optimizer = make_optimizer
        self.make_scheduler = make_scheduler
        self.aux_loss = aux_loss
        self.evaluate = evaluate
        """The task's evaluation beyond the validation loop (`training.evaluation.Evaluator`), run at stage
        `validation` after each validation: generation on a small subset, option scoring."""
        # Checkpoints hold the adapter state only (see on_save_checkpoint), not the frozen model.
        self.strict_loading = False
        self.history: list[dict[str, float]] = []
        self.chance: dict[str, float] = {}
        """The task's metrics for predicting the majority class (a constant for regression) on the evaluation set."""
        self._outputs: list[dict[str, Tensor]] = []
        self.last_outputs: dict[str, Tensor] = {}
        """The last validation's per-example outputs (`Task.validation_outputs`, concatenated)."""
        # Batches carry what the tokenizer made (token_type_ids, ...); pass only what this model's forward takes.
        self._inputs = set(inspect.signature(model.forward).parameters)

    def forward(self, batch: dict[str, Tensor]) -> Any:
        return self.model(**{k: v for k, v in batch.items() if k in self._inputs})

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        loss = self(batch).loss
        aux = self.aux_loss(self.model)
        if aux is not None:
            loss = loss + aux
        # Over every rank's share of the batch: the ranks then all stop together on a NaN, and all judge divergence
        # (`DivergenceGuard`) on the same number.
        mean = loss.detach()
        if self.trainer.world_size > 1:
            mean = self.trainer.strategy.reduce(mean, reduce_op="mean")
        if not torch.isfinite(mean):
            raise Diverged(f"training loss became {mean.item()} at step {self.global_step}")
        self.log("train/loss", mean, prog_bar=True, batch_size=len(batch["labels"]))
        # The loggers write it at the optimizer step this batch completes, the step the record and the validation rows
        # count (Lightning's own, the steps done before it, is one less: a resumed run logged its checkpoint's step
        # twice). A logged `step` replaces Lightning's, and its `epoch` column with it: logged here too.
        position = {"step": float(self.global_step + 1), "epoch": float(self.current_epoch)}
        self.log_dict(position, batch_size=len(batch["labels"]))
        return {"loss": loss, "mean_loss": mean}

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._outputs.append(self.task.validation_outputs(self(batch), batch))

    def on_validation_epoch_end(self) -> None:
        # Several ranks: each validated its share of the set; every rank computes the metrics of the whole of it.
        outputs = gather_examples(self._outputs) if self.trainer.world_size > 1 else concat(self._outputs)
        self._outputs.clear()
        metrics = self.task.validation_metrics(outputs)
        if self.trainer.sanity_checking:
            return
        self.last_outputs = outputs
        if not self.chance:
            self.chance = self.task.validation_chance(outputs)
        # Every rank runs the task's own evaluation (a small validation subset): it merges and unmerges the adapters,
        # which changes the weights by round-off, and the ranks' weights must stay the same.
        extra = self.evaluate(self.model, "validation") if self.evaluate is not None else None
        if extra is not None:
            metrics.update(extra.metrics)
            self.chance = self.chance or extra.chance
        # Logged at the optimizer step they follow, the step the record's history gives (Lightning's own logging
        # would count one less).
        for logger in self.loggers:
            logger.log_metrics({f"val/{k}": v for k, v in metrics.items()}, step=self.global_step)
        self.history.append({"step": self.global_step, **metrics})

    @torch.no_grad()
    def score(self, loader: Any) -> dict[str, float]:
        """The task's metrics of the model as it is on every batch of `loader` (in eval mode, without gradients,
        outside the trainer: nothing is logged or added to the history)."""
        was_training = self.model.training
        self.model.eval()
        try:
            outputs = concat([self.task.validation_outputs(self(batch), batch) for batch in loader])
        finally:
            self.model.train(was_training)
        return self.task.validation_metrics(outputs)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.make_optimizer()
        scheduler = self.make_scheduler(optimizer, int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def rebuild_optimizer(self) -> None:
        """The variant changed its trainable parameters mid-run: a new optimizer over the current ones, carrying the
        state of every parameter that is still there, with the schedule at the step it had reached."""
        if self.trainer.world_size > 1:
            # DDP synchronises the gradients of the parameters the model had when it was wrapped, and no others.
            raise UserError(
                "this variant changes its trainable parameters during training (rank growth or pruning), which DDP "
                "cannot follow: train it on one device (trainer=cpu or trainer=gpu)"
            )
        old = self.trainer.optimizers[0]
        config = self.trainer.lr_scheduler_configs[0]
        optimizer = self.make_optimizer()
        carry_over_state(old, optimizer)
        config.scheduler = advance(
            self.make_scheduler(optimizer, int(self.trainer.estimated_stepping_batches)), config.scheduler.last_epoch
        )
        self.trainer.strategy.optimizers = [optimizer]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {f"model.{k}": v for k, v in adapter_state_dict(self.model).items()}
        checkpoint["lf_history"] = self.history

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.history = list(checkpoint.get("lf_history", []))


def concat(outputs: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Per-batch outputs joined along the batch dimension (scalars stacked)."""
    return {
        key: torch.cat([o[key] for o in outputs]) if outputs[0][key].dim() else torch.stack([o[key] for o in outputs])
        for key in outputs[0]
    }
