"""Shared check of the optimizer-level variants (their state lives in their optimizer): a run resumed from a checkpoint
of adapter, optimizer and schedule continues exactly as the uninterrupted run."""

from __future__ import annotations

import copy

import torch
from conftest import batch_for, tiny
from torch import nn

from lorafactory.models import unfreeze
from lorafactory.training.optim import warmup_schedule
from lorafactory.variants import adapter_state_dict, build_variant, load_adapter_state_dict


def _fresh(name: str, optim_cfg, schedule: str, seed: int):
    loaded = tiny("tiny-bert")
    torch.manual_seed(seed)
    variant = build_variant({"name": name, "targets": "all-linear", "r": 4})
    variant.adapt(loaded.module, head=loaded.head)
    unfreeze(loaded.module, loaded.head)
    for m in loaded.module.modules():  # dropout aside, both runs compute the same function
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    optimizer = variant.build_optimizer(variant.param_groups(loaded.module, 1e-2), optim_cfg)
    return loaded, optimizer, warmup_schedule(optimizer, 6, schedule, 0.2)


def _steps(loaded, optimizer, scheduler, batches) -> None:
    for batch in batches:
        loaded.module(**batch).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def assert_resume_is_exact(name: str, optim_cfg, schedule: str, before: int, after: int) -> None:
    """Train `before` steps, checkpoint, train `after` more; a fresh model loaded from the checkpoint and trained the
    same `after` steps ends with the same adapter."""
    loaded, optimizer, scheduler = _fresh(name, optim_cfg, schedule, seed=0)
    batches = [batch_for(loaded, batch_size=4, seed=i) for i in range(before + after)]
    _steps(loaded, optimizer, scheduler, batches[:before])
    checkpoint = copy.deepcopy(
        {"model": adapter_state_dict(loaded.module), "optim": optimizer.state_dict(), "sched": scheduler.state_dict()}
    )
    torch.manual_seed(1)  # the same random stream after the checkpoint in both runs
    _steps(loaded, optimizer, scheduler, batches[before:])

    loaded2, optimizer2, scheduler2 = _fresh(name, optim_cfg, schedule, seed=123)
    load_adapter_state_dict(loaded2.module, checkpoint["model"])
    optimizer2.load_state_dict(checkpoint["optim"])
    scheduler2.load_state_dict(checkpoint["sched"])
    torch.manual_seed(1)
    _steps(loaded2, optimizer2, scheduler2, batches[before:])
    resumed = adapter_state_dict(loaded2.module)
    for key, value in adapter_state_dict(loaded.module).items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-6, atol=1e-6, msg=key)
