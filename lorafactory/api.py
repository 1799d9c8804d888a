"""The variants in your own training loop: `lorafactory.adapt(model, "dora", r=16, targets="all-linear")`.

The returned `Adapted` holds the model (adapted in place: frozen, its target layers replaced by the variant's) and the
calls the framework's own loop makes, in the same order, so that a method with training machinery of its own (LoRA+'s
learning-rate ratio, AdaLoRA's rank schedule, LoRA-Pro's gradient edit, a data-dependent initialisation) behaves as
it does under `python -m lorafactory`:

    adapted = lorafactory.adapt(model, "adalora", r=8, targets="attn", head=["classifier"])
    adapted.init_from_data(batches, lambda m, b: m(**b).loss)      # LoRA-GA, PiSSA's relatives...; a no-op for most
    optimizer = adapted.optimizer(lr=2e-3)
    adapted.start(total_steps)
    for step, batch in enumerate(batches, 1):
        adapted.loss(model(**batch).loss).backward()                # the variant's auxiliary loss added
        adapted.after_backward()
        adapted.before_step(optimizer)
        optimizer.step(); optimizer.zero_grad()
        optimizer = adapted.after_step(step, optimizer)              # a new optimizer when the variant changed its
    adapted.end()                                                    # parameters (state carried over)
    merged = adapted.merge_and_unload()                              # a plain model, when the variant merges
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from lorafactory.models import unfreeze
from lorafactory.training.optim import build_optimizer, carry_over_state
from lorafactory.variants.base import (
    Variant,
    adapter_state_dict,
    build_variant,
    count_trainable,
    load_adapter_state_dict,
    merge_and_unload,
)


@dataclass
class Adapted:
    """An adapted model and its variant's hooks, for a training loop of your own (see the module docstring)."""

    model: nn.Module
    variant: Variant
    head: tuple[str, ...] = ()
    """Modules trained in full beside the adapter (a task head): they train at LoRA's rate, `lr / lr_mult`."""

    @property
    def trainable_parameters(self) -> int:
        return count_trainable(self.model.parameters())

    def init_from_data(self, batches: Iterable[Any], loss_fn: Callable[[nn.Module, Any], Tensor]) -> None:
        """Data-dependent initialisation, for the variants that have one: call once, before `optimizer`."""
        self.variant.init_from_data(self.model, iter(batches), loss_fn)

    def optimizer(
        self, lr: float, weight_decay: float = 0.0, optimizer: type[torch.optim.Optimizer] = torch.optim.AdamW
    ) -> torch.optim.Optimizer:
        """The variant's parameter groups (LoRA+'s two rates, ...) or its own optimizer, the head's group at
        `lr / lr_mult`; `optimizer` is the class used when the variant brings none."""
        cfg = OmegaConf.create(
            {
                "lr": lr,
                "weight_decay": weight_decay,
                "optimizer": {"_target_": f"{optimizer.__module__}.{optimizer.__qualname__}", "_partial_": True},
            }
        )
        self._optim_cfg = cfg
        return build_optimizer(cfg, self.variant, self.model)

    def start(self, total_steps: int) -> None:
        """Before the first step: schedules (AdaLoRA's budget, phase lengths) are laid out over `total_steps`."""
        self.variant.on_train_start(self.model, total_steps)

    def loss(self, loss: Tensor) -> Tensor:
        """`loss` plus the variant's auxiliary loss (orthogonality, gate priors...), if it has one."""
        aux = self.variant.aux_loss(self.model)
        return loss if aux is None else loss + aux

    def after_backward(self) -> None:
        self.variant.on_after_backward(self.model)

    def before_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.variant.on_before_optimizer_step(self.model, optimizer)

    def after_step(self, step: int, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """After optimizer step `step` (counted from 1): the optimizer to go on with. A variant that grew, pruned or
        swapped its trainable parameters gets a new one over them, with the state of those that remain."""
        if not self.variant.on_train_batch_end(self.model, step):
            return optimizer
        new = build_optimizer(self._optim_cfg, self.variant, self.model)
        carry_over_state(optimizer, new)
        return new

    def end(self) -> None:
        """After the last step (a final pruning, thresholding gates...)."""
        self.variant.on_train_end(self.model)

    def merge_and_unload(self) -> nn.Module:
        """The model with every update folded into its weights and the adapter layers gone."""
        return merge_and_unload(self.model)

    def state_dict(self) -> dict[str, Tensor]:
        """What the adapter (and the head) trained: load it into a model adapted the same way."""
        return adapter_state_dict(self.model)

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        load_adapter_state_dict(self.model, state)


def adapt(model: nn.Module, variant: str = "lora", *, head: Sequence[str] = (), **config: Any) -> Adapted:
    """Adapt `model` in place with `variant` (any name of `python -m lorafactory.variants`), configured as
    `variant.<key>=<value>` would be on the command line (`r`, `alpha`, `targets`, the method's own fields), and
    train `head` (module names, e.g. a classifier) in full beside it. An unknown name raises `UnknownNameError`
    listing the valid ones, a bad value `ConfigError` naming the field (both `lorafactory.errors.UserError`)."""
    built = build_variant({"name": variant, **config})
    built.adapt(model, head=tuple(head))
    unfreeze(model, tuple(head))
    return Adapted(model, built, tuple(head))
