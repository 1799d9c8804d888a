"""VB-LoRA's own properties (top-k admixtures of one shared bank, sparse gradients, dimensions b does not divide) and
parity with PEFT's VB-LoRA."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import batch_for
from peft_twin import with_peft_twin
from torch import nn

import lorafactory.variants.lora as lora_module
from lorafactory.variants import adapter_layers, adapter_parameters, build_variant
from lorafactory.variants.base import count_trainable

CFG = {"r": 3, "num_vectors": 10, "vector_length": 4, "topk": 2}


def adapted(**cfg) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(27, 8), nn.Linear(8, 12))
    build_variant({"name": "vblora", "targets": ["0", "1"], **CFG, **cfg}).adapt(model, head=())
    return model


def test_vblora_sub_vectors_are_convex_combinations_of_k_bank_rows_cut_to_the_layer():
    """d_in = 27 is not a multiple of b = 4: each row of A is 7 sub-vectors end to end, cut to 27 entries."""
    model = adapted()
    layer, bank = model[0], model.lf_shared.vblora_bank
    assert layer.vblora_logits_A.shape == (3, 7, 10) and layer.vblora_logits_B.shape == (2, 3, 10)
    A, B = layer.factors(*layer.factor_inputs())
    assert A.shape == (3, 27) and B.shape == (8, 3)
    for row in range(3):
        for piece in range(7):
            logits = layer.vblora_logits_A[row, piece]
            top = logits.topk(2).indices
            weights = torch.softmax(logits[top], dim=0)
            expected = (weights[:, None] * bank[top]).sum(0)[: 27 - 4 * piece]
            torch.testing.assert_close(A[row, 4 * piece : 4 * piece + 4], expected)
    for col in range(3):  # B's columns are built the same way, along d_out
        logits = layer.vblora_logits_B[1, col]
        top = logits.topk(2).indices
        torch.testing.assert_close(B[4:8, col], (torch.softmax(logits[top], 0)[:, None] * bank[top]).sum(0))
    with torch.no_grad():  # logits outside the top k do not matter
        low = layer.vblora_logits_A.min() - 1
        masked = layer.vblora_logits_A.clone()
        masked[masked < masked.topk(2, dim=-1).values[..., -1:]] = low
        layer.vblora_logits_A.copy_(masked)
    torch.testing.assert_close(layer.factors(*layer.factor_inputs())[0], A)
    x = torch.randn(5, 27)
    torch.testing.assert_close(layer(x), layer.base(x) + x @ (B @ A).t(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("threshold", [0.0, math.inf])
def test_vblora_gradient_reaches_only_the_top_k_logits_and_the_bank_rows_they_pick(threshold, monkeypatch):
    monkeypatch.setattr(lora_module, "MERGE_THRESHOLD", threshold)
    model = adapted(num_vectors=40)
    model(torch.randn(6, 27)).square().sum().backward()
    picked = set()
    for layer in adapter_layers(model):
        for logits in (layer.vblora_logits_A, layer.vblora_logits_B):
            top = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, logits.topk(2, dim=-1).indices, True)
            assert torch.all(logits.grad[~top] == 0) and torch.all(logits.grad[top] != 0)
            picked |= set(logits.topk(2, dim=-1).indices.flatten().tolist())
    bank_grad = model.lf_shared.vblora_bank.grad
    used = torch.tensor([i in picked for i in range(40)])
    assert torch.all(bank_grad[~used] == 0) and torch.all(bank_grad[used].abs().sum(1) > 0)
    assert (~used).any()


def test_vblora_bank_is_one_parameter_shared_by_all_layers_and_counted_once():
    model = adapted()
    bank = model.lf_shared.vblora_bank
    assert all(layer.factor_inputs()[2] is bank for layer in adapter_layers(model))
    assert not any("bank" in n for layer in adapter_layers(model) for n, _ in layer.named_parameters())
    # logits: h·r·(⌈27/4⌉ + ⌈8/4⌉) + h·r·(⌈8/4⌉ + ⌈12/4⌉), bank h·b once
    assert count_trainable(adapter_parameters(model)) == 10 * 3 * (7 + 2) + 10 * 3 * (2 + 3) + 10 * 4


def test_vblora_logits_train_faster_than_the_bank():
    model = adapted()
    variant = build_variant({"name": "vblora", "targets": ["0", "1"], **CFG})
    groups = {g["name"]: g for g in variant.param_groups(model, 1e-3)}
    assert groups["logits"]["lr"] == pytest.approx(1e-2) and groups["bank+head"]["lr"] == 1e-3
    assert [p is model.lf_shared.vblora_bank for p in groups["bank+head"]["params"]] == [True]
    assert len(groups["logits"]["params"]) == 4


@pytest.mark.parametrize("path", ["merged", "two-branch"])
def test_vblora_matches_peft(path, monkeypatch):
    """b = 32 divides every tiny-bert dimension (PEFT requires it): same bank, same logits, same outputs and
    gradients."""
    monkeypatch.setattr(lora_module, "MERGE_THRESHOLD", 0.0 if path == "merged" else math.inf)
    loaded, variant, theirs, names = with_peft_twin(
        "tiny-bert",
        {"name": "vblora", "targets": "all-linear", "r": 4, "num_vectors": 16, "vector_length": 32, "topk": 2},
    )
    ours = loaded.module
    pairs = [(ours.get_submodule(n), theirs.base_model.model.get_submodule(n)) for n in names]
    their_bank = theirs.base_model.vblora_vector_bank["default"]
    with torch.no_grad():
        their_bank.copy_(ours.lf_shared.vblora_bank)
        for mine, twin in pairs:
            twin.vblora_logits_A["default"].copy_(mine.vblora_logits_A)
            twin.vblora_logits_B["default"].copy_(mine.vblora_logits_B)
    for model in (ours, theirs):
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
    batch = batch_for(loaded, batch_size=4, seq=12)
    out, ref = ours.train()(**batch), theirs.train()(**batch)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    ref.loss.backward()
    torch.testing.assert_close(ours.lf_shared.vblora_bank.grad, their_bank.grad, atol=1e-5, rtol=1e-4)
    for mine, twin in pairs:
        their_A, their_B = twin.vblora_logits_A["default"].grad, twin.vblora_logits_B["default"].grad
        torch.testing.assert_close(mine.vblora_logits_A.grad, their_A, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(mine.vblora_logits_B.grad, their_B, atol=1e-5, rtol=1e-4)
