"""The training loop talks to variants only through hooks: every hook is called, in its place, for any variant."""

from __future__ import annotations

from functools import partial

import lightning as L
import torch
from conftest import batch_for, tiny
from torch.utils.data import DataLoader

from lorafactory.models import unfreeze
from lorafactory.tasks import TASKS
from lorafactory.training.callbacks import RunStats, VariantHooks
from lorafactory.training.module import AdapterModule
from lorafactory.training.optim import build_optimizer, warmup_schedule
from lorafactory.variants.lora import LoRA, LoRAConfig


class Recording(LoRA):
    """LoRA that writes down every hook call, and uses the hooks that change training."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.calls: list[tuple] = []

    def init_from_data(self, model, batches, loss_fn):
        losses = [float(loss_fn(model, b)) for b in batches]
        self.calls.append(("init_from_data", len(losses)))

    def param_groups(self, model, lr):
        self.calls.append(("param_groups", lr))
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr, "name": "recorded"}]

    def aux_loss(self, model):
        self.calls.append(("aux_loss",))
        return torch.zeros((), requires_grad=True) + 0.0

    def on_after_backward(self, model):
        grads = [p.grad for layer in model.modules() if hasattr(layer, "lora_B") for p in (layer.lora_B,)]
        self.calls.append(("on_after_backward", all(g is not None for g in grads)))

    def on_before_optimizer_step(self, model, optimizer):
        self.calls.append(("on_before_optimizer_step", optimizer.param_groups[0]["name"]))

    def on_train_batch_end(self, model, step):
        self.calls.append(("on_train_batch_end", step))

    def on_train_end(self, model):
        self.calls.append(("on_train_end",))


class Optim:
    lr = 1e-2
    weight_decay = 0.0
    optimizer = {"_target_": "torch.optim.AdamW", "_partial_": True}


def fit(resuming: bool = False) -> list[tuple]:
    loaded = tiny("tiny-bert", num_labels=2)
    variant = Recording(LoRAConfig(name="lora", targets="all-linear"))
    variant.adapt(loaded.module, head=loaded.head)
    unfreeze(loaded.module, loaded.head)
    batches = [batch_for(loaded, batch_size=4, seed=i) for i in range(3)]
    for b in batches:
        b["labels"] = b["labels"] % 2
    module = AdapterModule(
        loaded.module,
        TASKS.get("glue/sst2"),
        make_optimizer=partial(build_optimizer, Optim, variant, loaded.module),
        make_scheduler=partial(warmup_schedule, kind="linear", warmup_ratio=0.0),
        aux_loss=variant.aux_loss,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[VariantHooks(variant, lambda: iter(batches[:2]), resuming=resuming), RunStats(variant)],
    )
    trainer.fit(module, DataLoader(batches, batch_size=None), DataLoader(batches[:1], batch_size=None))
    return variant.calls


def test_every_hook_is_called_in_its_place():
    calls = fit()
    names = [c[0] for c in calls]
    assert calls[0] == ("init_from_data", 2)  # before anything else, with the batches it was given
    assert names[1] == "param_groups" and calls[1][1] == 1e-2  # the optimizer is built from the variant's groups
    steps = [c for c in calls if c[0] == "on_train_batch_end"]
    assert [s[1] for s in steps] == [1, 2, 3, 4, 5, 6]  # 3 batches × 2 epochs, counted in optimizer steps
    assert names.count("aux_loss") == names.count("on_after_backward") == names.count("on_before_optimizer_step") == 6
    assert all(c[1] for c in calls if c[0] == "on_after_backward")  # gradients exist when the hook runs
    assert all(c[1] == "recorded" for c in calls if c[0] == "on_before_optimizer_step")
    per_step = [
        n for n in names if n in ("aux_loss", "on_after_backward", "on_before_optimizer_step", "on_train_batch_end")
    ]
    assert per_step[:4] == ["aux_loss", "on_after_backward", "on_before_optimizer_step", "on_train_batch_end"]
    assert names[-1] == "on_train_end" and names.count("on_train_end") == 1


def test_a_resumed_run_does_not_initialise_from_data_again():
    assert "init_from_data" not in [c[0] for c in fit(resuming=True)]
