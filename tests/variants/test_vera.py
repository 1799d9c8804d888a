"""VeRA's own properties (shared bases, the update formula, the seed) and parity with PEFT's VeRA; also the factored
layer machinery in vera.py that the other shared-state variants reuse."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import batch_for
from peft_twin import with_peft_twin
from torch import nn

import lorafactory.variants.lora as lora_module
from lorafactory.variants import adapter_layers, adapter_state_dict, build_variant
from lorafactory.variants.vera import factor_grads


def minilm_shaped(layers: int = 1) -> nn.Module:
    """A random BERT with MiniLM's widths (384 hidden, 1536 intermediate, 12 heads) and a toy vocabulary."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64, hidden_size=384, num_hidden_layers=layers, num_attention_heads=12, intermediate_size=1536
    )
    return BertForSequenceClassification(config)


def vera_model(r: int = 256, **cfg) -> nn.Module:
    model = minilm_shaped()
    build_variant({"name": "vera", "targets": "all-linear", "r": r, **cfg}).adapt(model, head=("classifier",))
    return model


def test_vera_bases_are_one_storage_shared_by_all_layers(monkeypatch):
    """MiniLM all-linear: one A (r × 1536) and one B (1536 × r) for the model; no layer owns, saves or keeps for its
    backward a copy (a tensor with a dimension r that is not a view of the shared storage), on either path."""
    model = vera_model(r=256)
    shared = model.lf_shared
    assert dict(shared.named_buffers()).keys() == {"vera_A", "vera_B"}
    assert shared.vera_A.shape == (256, 1536) and shared.vera_B.shape == (1536, 256)
    layers = adapter_layers(model)
    assert len(layers) == 7 and {layer.in_features for layer in layers} == {384, 1536}
    for layer in layers:
        own = {n: t for n, t in [*layer.named_parameters(), *layer.named_buffers()] if not n.startswith("base.")}
        assert {n: tuple(t.shape) for n, t in own.items()} == {
            "lambda_b": (layer.out_features,),
            "lambda_d": (256,),
        }
    state = adapter_state_dict(model)
    assert [k for k in state if k.endswith(("vera_A", "vera_B"))] == ["lf_shared.vera_A", "lf_shared.vera_B"]

    shared_storage = {shared.vera_A.untyped_storage().data_ptr(), shared.vera_B.untyped_storage().data_ptr()}
    ids = torch.randint(0, 64, (2, 8))
    for threshold in (0.0, math.inf):  # the merged-weight path and the two-branch path
        monkeypatch.setattr(lora_module, "MERGE_THRESHOLD", threshold)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, saved=saved: saved.append(t) or t, lambda t: t):
            loss = model(input_ids=ids).logits.square().sum()
        copies = [
            tuple(t.shape)
            for t in saved
            if t.dim() == 2 and 256 in t.shape and t.untyped_storage().data_ptr() not in shared_storage
        ]
        assert not copies, f"basis-sized tensors kept for backward: {copies[:4]}"
        loss.backward()
        assert all(layer.lambda_d.grad is not None for layer in layers)


def test_vera_delta_weight_is_the_scaled_slice_of_the_shared_bases():
    model = vera_model(r=16)
    layer = model.bert.encoder.layer[0].intermediate.dense  # 384 → 1536
    with torch.no_grad():
        layer.lambda_b.normal_()
        layer.lambda_d.normal_()
    A, B = model.lf_shared.vera_A[:, :384], model.lf_shared.vera_B[:1536]
    expected = torch.diag(layer.lambda_b) @ B @ torch.diag(layer.lambda_d) @ A
    torch.testing.assert_close(layer.delta_weight(), expected)
    x = torch.randn(5, 384)
    torch.testing.assert_close(layer(x), layer.base(x) + x @ expected.t(), atol=1e-5, rtol=1e-5)


def test_vera_init_starts_at_the_base_with_kaiming_bases_from_the_seed():
    model = vera_model(r=16, d_initial=0.05)
    layer = adapter_layers(model)[0]
    assert torch.count_nonzero(layer.lambda_b) == 0 and torch.all(layer.lambda_d == 0.05)
    A, B = model.lf_shared.vera_A, model.lf_shared.vera_B
    assert A.abs().max() <= math.sqrt(6 / 1536) and A.abs().max() > 0.95 * math.sqrt(6 / 1536)
    assert B.abs().max() <= math.sqrt(6 / 16) and B.abs().max() > 0.95 * math.sqrt(6 / 16)
    again = vera_model(r=16)
    assert torch.equal(again.lf_shared.vera_A, A) and torch.equal(again.lf_shared.vera_B, B)
    other = vera_model(r=16, basis_seed=1)
    assert not torch.equal(other.lf_shared.vera_A, A)


@pytest.mark.parametrize("need", ["A", "B", "both"])
@pytest.mark.parametrize("r", [2, 64])  # r = 2 takes the rank-r products, r = 64 the dense weight gradient
def test_factor_grads_match_autograd_on_either_route(r, need):
    torch.manual_seed(0)
    g, x = torch.randn(12, 10, dtype=torch.float64), torch.randn(12, 9, dtype=torch.float64)
    A = torch.randn(r, 9, dtype=torch.float64, requires_grad=need in ("A", "both"))
    B = torch.randn(10, r, dtype=torch.float64, requires_grad=need in ("B", "both"))
    grad_A, grad_B = factor_grads(g, x, A, B, 0.5)
    (0.5 * (x @ A.t() @ B.t()) * g).sum().backward()
    assert (grad_A is None) == (A.grad is None) and (grad_B is None) == (B.grad is None)
    for mine, ref in ((grad_A, A.grad), (grad_B, B.grad)):
        if ref is not None:
            torch.testing.assert_close(mine, ref)


@pytest.mark.parametrize("path", ["merged", "two-branch"])
def test_vera_matches_peft(path, monkeypatch):
    """Same bases (drawn from the same seed), same λ_b and λ_d: same outputs and gradients as PEFT's VeRA."""
    monkeypatch.setattr(lora_module, "MERGE_THRESHOLD", 0.0 if path == "merged" else math.inf)
    loaded, variant, theirs, names = with_peft_twin("tiny-bert", {"name": "vera", "r": 8, "targets": "all-linear"})
    ours = loaded.module
    torch.testing.assert_close(ours.lf_shared.vera_A, theirs.base_model.vera_A["default"], rtol=0, atol=0)
    torch.testing.assert_close(ours.lf_shared.vera_B, theirs.base_model.vera_B["default"], rtol=0, atol=0)

    g = torch.Generator().manual_seed(0)
    pairs = [(ours.get_submodule(n), theirs.base_model.model.get_submodule(n)) for n in names]
    with torch.no_grad():
        for mine, twin in pairs:
            mine.lambda_b.copy_(torch.randn(mine.lambda_b.shape, generator=g))
            mine.lambda_d.copy_(torch.randn(mine.lambda_d.shape, generator=g))
            twin.vera_lambda_b["default"].copy_(mine.lambda_b)
            twin.vera_lambda_d["default"].copy_(mine.lambda_d)
    for model in (ours, theirs):
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
    batch = batch_for(loaded, batch_size=4, seq=12)
    out, ref = ours.train()(**batch), theirs.train()(**batch)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    ref.loss.backward()
    for mine, twin in pairs:
        torch.testing.assert_close(mine.lambda_b.grad, twin.vera_lambda_b["default"].grad, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(mine.lambda_d.grad, twin.vera_lambda_d["default"].grad, atol=1e-5, rtol=1e-4)
