"""Optimizer and learning-rate schedule construction, with the variant's say in both."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from hydra.utils import instantiate
from torch import nn

from lorafactory.errors import check
from lorafactory.variants.base import Variant


def build_optimizer(optim_cfg: Any, variant: Variant, model: nn.Module) -> torch.optim.Optimizer:
    """The variant's parameter groups (or one group of its trainable parameters) plus the head's group, under the
    configured optimizer, unless the variant brings its own optimizer.

    `optim.lr` is the adapter's learning rate (`task.lr × variant.lr_mult × optim.lr_scale` by default). Everything
    else that trains (the task head, modules trained in full) trains at LoRA's rate for the run, `optim.lr /
    variant.lr_mult`, whatever the variant: a variant that wants its adapter 18× slower than LoRA's must not slow the
    head with it, or the comparison would measure the head."""
    lr = float(optim_cfg.lr)
    check(lr > 0, f"optim.lr must be > 0, got {lr}")
    check(optim_cfg.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {optim_cfg.weight_decay}")
    adapter = {id(p) for p in variant.trained_parameters(model) if p.requires_grad}
    groups = variant.param_groups(model, lr)
    if groups is None:
        groups = [{"params": [p for p in model.parameters() if id(p) in adapter], "lr": lr}]
    groups = with_head_group(groups, model, adapter, lr / variant.cfg.lr_mult)
    optimizer = variant.build_optimizer(groups, optim_cfg)
    if optimizer is not None:
        return optimizer
    factory = instantiate(optim_cfg.optimizer)
    return factory(groups, lr=lr, weight_decay=optim_cfg.weight_decay)


def with_head_group(
    groups: list[dict[str, Any]], model: nn.Module, adapter: set[int], head_lr: float
) -> list[dict[str, Any]]:
    """`groups` with every parameter that is not the adapter's moved out into one `head` group at `head_lr`
    (variants may have put the head in their own groups); groups left empty are dropped."""
    head = [p for p in model.parameters() if p.requires_grad and id(p) not in adapter]
    kept = []
    for group in groups:
        params = [p for p in group["params"] if id(p) in adapter]
        if params:
            kept.append({**group, "params": params})
    if head:
        kept.append({"params": head, "lr": head_lr, "name": "head"})
    return kept


def warmup_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, kind: str = "linear", warmup_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup_ratio` of the steps, then `linear` decay to 0, `cosine` decay to 0, or `constant`.

    Scales every parameter group's own learning rate, so per-group ratios (LoRA+) hold throughout."""
    check(kind in ("linear", "cosine", "constant"), f"scheduler.kind must be linear, cosine or constant, got {kind}")
    check(0.0 <= warmup_ratio < 1.0, f"scheduler.warmup_ratio must be in [0, 1), got {warmup_ratio}")
    warmup = int(warmup_ratio * total_steps)
    decay_steps = max(1, total_steps - warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / decay_steps)
        if kind == "linear":
            return 1.0 - progress
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def carry_over_state(old: torch.optim.Optimizer, new: torch.optim.Optimizer) -> None:
    """Give `new` the per-parameter state (Adam moments, step counts) `old` holds for the parameters both optimise."""
    for group in new.param_groups:
        for param in group["params"]:
            if param in old.state:
                new.state[param] = old.state[param]


def advance(scheduler: torch.optim.lr_scheduler.LRScheduler, steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """A fresh scheduler moved to `steps` (setting the learning rates it would have reached)."""
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": intended here
        warnings.simplefilter("ignore")
        for _ in range(steps):
            scheduler.step()
    return scheduler


SchedulerFactory = Callable[[torch.optim.Optimizer, int], torch.optim.lr_scheduler.LRScheduler]
