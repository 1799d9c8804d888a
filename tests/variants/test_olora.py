"""OLoRA: B has orthonormal columns, A is the top of the upper-triangular R, W_res + s·BA = W0; parity with PEFT's
`init_lora_weights="olora"` (factors, residual, outputs and gradients)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import batch_for, tiny
from torch import nn

from lorafactory.models import unfreeze
from lorafactory.variants import adapter_layers, build_variant
from lorafactory.variants.base import find_targets


def test_factors_are_the_leading_qr_block_and_the_model_is_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 9)).double()
    W0 = model[0].weight.detach().clone()
    build_variant({"name": "olora", "targets": ["0"], "r": 4, "alpha": 12}).adapt(model, head=())  # s = 3
    layer = model[0]
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    torch.testing.assert_close(B.t() @ B, torch.eye(4, dtype=torch.float64))
    assert torch.all(A.tril(-1) == 0)  # rows of an upper-triangular R
    torch.testing.assert_close(B @ A, W0[:, :4] @ torch.linalg.pinv(A[:, :4]) @ A)  # B spans W0's first 4 columns
    Q, R = torch.linalg.qr(W0)
    torch.testing.assert_close((B @ A).abs(), (Q[:, :4] @ R[:4]).abs())
    torch.testing.assert_close(layer.weight + layer.delta_weight(), W0)
    torch.testing.assert_close(layer.weight, W0 - 3 * B @ A)  # factors not divided by s (PEFT's choice)


def no_dropout(*models):
    for model in models:
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0


@pytest.mark.parametrize("model", ["tiny-bert", "tiny-llama"])
def test_olora_matches_peft(model):
    peft = pytest.importorskip("peft")
    loaded = tiny(model)
    no_dropout(loaded.module)
    theirs = copy.deepcopy(loaded.module)
    names = find_targets(loaded.module, "all-linear", loaded.head)
    variant = build_variant({"name": "olora", "targets": "all-linear", "r": 4, "alpha": 8})
    variant.adapt(loaded.module, head=loaded.head)
    unfreeze(loaded.module, loaded.head)
    theirs = peft.get_peft_model(theirs, variant.peft_config(names, list(loaded.head)))
    inner = theirs.base_model.model
    pairs = [(layer, inner.get_submodule(name)) for name, layer in loaded.module.named_modules() if name in names]
    assert len(pairs) == len(names) == len(adapter_layers(loaded.module))
    g = torch.Generator().manual_seed(0)
    for mine, twin in pairs:  # the same init from the same weights ...
        torch.testing.assert_close(mine.lora_A, twin.lora_A["default"].weight, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(mine.lora_B, twin.lora_B["default"].weight, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(mine.base.weight, twin.base_layer.weight, atol=1e-5, rtol=1e-4)
        with torch.no_grad():  # ... then the same moved factors in both
            mine.lora_A.add_(0.1 * torch.randn(mine.lora_A.shape, generator=g))
            mine.lora_B.add_(0.1 * torch.randn(mine.lora_B.shape, generator=g))
            twin.lora_A["default"].weight.copy_(mine.lora_A)
            twin.lora_B["default"].weight.copy_(mine.lora_B)
            twin.base_layer.weight.copy_(mine.base.weight)
    batch = batch_for(loaded, batch_size=4, seq=12)
    loaded.module.train(), theirs.train()
    out, ref = loaded.module(**batch), theirs(**batch)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    ref.loss.backward()
    for mine, twin in pairs:
        torch.testing.assert_close(mine.lora_A.grad, twin.lora_A["default"].weight.grad, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(mine.lora_B.grad, twin.lora_B["default"].weight.grad, atol=1e-5, rtol=1e-4)
