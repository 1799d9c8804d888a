"""Parity with Hugging Face PEFT for every variant that PEFT also implements: same weights in both, same outputs
(to 1e-5) and the same gradients for the adapter parameters."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import batch_for, tiny

import lorafactory.variants.lora as lora_module
from lorafactory.models import unfreeze
from lorafactory.variants import VARIANTS, adapter_layers, build_variant
from lorafactory.variants.base import find_targets

peft = pytest.importorskip("peft")

# How to ask PEFT for each method; `Variant.peft` says which variants have a PEFT twin, this says how to build it.
PEFT_KWARGS = {
    "lora": {},
    "rslora": {"use_rslora": True},
    "dora": {"use_dora": True},
    "pissa": {"init_lora_weights": "pissa"},
}
OPTIMIZER_ONLY = {"loraplus"}  # same forward as LoRA; parity is in the optimizer's parameter groups


def test_every_variant_with_a_peft_twin_has_a_parity_case():
    twins = {name for name in VARIANTS.names() if VARIANTS.get(name).peft}
    assert twins == set(PEFT_KWARGS) | OPTIMIZER_ONLY


def both(variant: str, model: str, r: int = 4, alpha: float = 8.0):
    """Our adapted model and PEFT's, from the same base weights and targets."""
    loaded = tiny(model)
    theirs = copy.deepcopy(loaded.module)
    names = find_targets(loaded.module, "all-linear", loaded.head)
    build_variant({"name": variant, "r": r, "alpha": alpha, "targets": "all-linear"}).adapt(
        loaded.module, head=loaded.head
    )
    unfreeze(loaded.module, loaded.head)
    config = peft.LoraConfig(
        r=r, lora_alpha=alpha, target_modules=names, modules_to_save=list(loaded.head), **PEFT_KWARGS.get(variant, {})
    )
    theirs = peft.get_peft_model(theirs, config)
    return loaded, theirs


def twin_layers(ours: torch.nn.Module, theirs) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    inner = theirs.base_model.model
    return [
        (layer, inner.get_submodule(name)) for name, layer in ours.named_modules() if layer in adapter_layers(ours)
    ]


def randomize_and_copy(ours: torch.nn.Module, theirs, seed: int = 0) -> None:
    """Non-trivial adapter weights (B ≠ 0, magnitude ≠ ‖W0‖) in ours, copied into PEFT's."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mine, twin in twin_layers(ours, theirs):
            mine.lora_A.add_(0.1 * torch.randn(mine.lora_A.shape, generator=g))
            mine.lora_B.copy_(0.1 * torch.randn(mine.lora_B.shape, generator=g))
            twin.lora_A["default"].weight.copy_(mine.lora_A)
            twin.lora_B["default"].weight.copy_(mine.lora_B)
            if hasattr(mine, "magnitude"):
                mine.magnitude.mul_(1 + 0.1 * torch.rand(mine.magnitude.shape, generator=g))
                twin.lora_magnitude_vector["default"].weight.copy_(mine.magnitude)


def no_dropout(*models: torch.nn.Module) -> None:
    for model in models:
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0


@pytest.mark.parametrize("path", ["merged", "two-branch"])
@pytest.mark.parametrize("model", ["tiny-bert", "tiny-llama", "tiny-vit"])
@pytest.mark.parametrize("variant", sorted(PEFT_KWARGS))
def test_outputs_and_gradients_match_peft(variant, model, path, monkeypatch):
    """Both of our computation paths (see lora.py) against PEFT's."""
    monkeypatch.setattr(lora_module, "MERGE_THRESHOLD", 0.0 if path == "merged" else math.inf)
    loaded, theirs = both(variant, model)
    ours = loaded.module
    if variant == "pissa":  # both initialise from the SVD of the same weights: compare before touching anything
        for mine, twin in twin_layers(ours, theirs):
            torch.testing.assert_close(mine.lora_A, twin.lora_A["default"].weight, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(mine.lora_B, twin.lora_B["default"].weight, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(mine.base.weight, twin.base_layer.weight, atol=1e-5, rtol=1e-4)
    randomize_and_copy(ours, theirs)
    no_dropout(ours, theirs)
    batch = batch_for(loaded, batch_size=4, seq=12)

    ours.train(), theirs.train()
    out, ref = ours(**batch), theirs(**batch)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    ref.loss.backward()
    for mine, twin in twin_layers(ours, theirs):
        torch.testing.assert_close(mine.lora_A.grad, twin.lora_A["default"].weight.grad, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(mine.lora_B.grad, twin.lora_B["default"].weight.grad, atol=1e-5, rtol=1e-4)
        if hasattr(mine, "magnitude"):
            torch.testing.assert_close(
                mine.magnitude.grad, twin.lora_magnitude_vector["default"].weight.grad, atol=1e-5, rtol=1e-4
            )

    ours.eval(), theirs.eval()
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        torch.testing.assert_close(ours(**inputs).logits, theirs(**inputs).logits, atol=1e-5, rtol=1e-5)


def test_loraplus_learning_rates_match_peft():
    from peft.optimizers import create_loraplus_optimizer

    loaded, theirs = both("lora", "tiny-bert")
    ratio, lr = 16.0, 1e-3
    plus = build_variant({"name": "loraplus", "lr_ratio": ratio})
    ours_lr = {id(p): g["lr"] for g in plus.param_groups(loaded.module, lr) for p in g["params"]}
    optimizer = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio)
    theirs_lr = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    for mine, twin in twin_layers(loaded.module, theirs):
        assert ours_lr[id(mine.lora_A)] == theirs_lr[id(twin.lora_A["default"].weight)] == lr
        assert ours_lr[id(mine.lora_B)] == theirs_lr[id(twin.lora_B["default"].weight)] == lr * ratio
