"""Tied-LoRA: one trainable A, B per weight shape shared by every layer, per-layer scalings v (d_out) and u (r)."""

from __future__ import annotations

import torch
from conftest import tiny
from torch import nn

from lorafactory.variants import adapter_layers, adapter_state_dict, build_variant


def test_tied_lora_pairs_are_one_storage_per_weight_shape():
    """tiny-llama all-linear: one (A, B) for the 32 × 32 attention projections, one each for the FFN's 64 × 32 and
    32 × 64; every layer of a shape reads the very same tensors, owns only v and u, and the state saves each pair
    once."""
    loaded = tiny("tiny-llama")
    build_variant({"name": "tied_lora", "targets": "all-linear", "r": 4}).adapt(loaded.module, head=loaded.head)
    shared = loaded.module.lf_shared
    shape_keys = {n: tuple(p.shape) for n, p in shared.named_parameters()}
    assert shape_keys == {
        "A_32x32": (4, 32),
        "B_32x32": (32, 4),
        "A_64x32": (4, 32),
        "B_64x32": (64, 4),
        "A_32x64": (4, 64),
        "B_32x64": (32, 4),
    }
    assert all(p.requires_grad for p in shared.parameters())
    layers = adapter_layers(loaded.module)
    assert len(layers) == 14
    for layer in layers:
        key = f"{layer.out_features}x{layer.in_features}"
        A, B, v, u = layer.factor_inputs()
        assert A is getattr(shared, f"A_{key}") and B is getattr(shared, f"B_{key}")
        own = {n: tuple(p.shape) for n, p in layer.named_parameters() if not n.startswith("base.")}
        assert own == {"v": (layer.out_features,), "u": (4,)}
    square = [layer for layer in layers if layer.in_features == layer.out_features == 32]
    assert len(square) == 8 and len({layer.factor_inputs()[0].data_ptr() for layer in square}) == 1
    state = adapter_state_dict(loaded.module)
    assert sorted(k for k in state if k.startswith("lf_shared.")) == sorted(f"lf_shared.{n}" for n in shape_keys)
    assert [k for k in state if k.endswith("A_32x32")] == ["lf_shared.A_32x32"]


def two_tied_linears(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6)).double()
    build_variant({"name": "tied_lora", "targets": ["0", "2"], "r": 3, "alpha": 6}).adapt(model, head=())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.lf_shared.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
        for layer in adapter_layers(model):
            layer.v.copy_(torch.randn(6, generator=g, dtype=torch.float64))
            layer.u.copy_(torch.randn(3, generator=g, dtype=torch.float64))
    return model


def test_tied_lora_update_and_gradients_match_the_hand_formula():
    """ΔW_l = s · diag(v_l) B diag(u_l) A; the tied A and B get the sum of both layers' gradients."""
    model = two_tied_linears()
    A, B = model.lf_shared.A_6x6, model.lf_shared.B_6x6
    first, second = model[0], model[2]
    for layer in (first, second):
        expected = 2.0 * torch.diag(layer.v) @ B @ torch.diag(layer.u) @ A
        torch.testing.assert_close(layer.delta_weight(), expected)
    x = torch.randn(5, 6, dtype=torch.float64)
    model(x).square().sum().backward()
    leaves = {name: t.detach().clone().requires_grad_() for name, t in [("A", A), ("B", B)]}
    h = x
    for layer in (first, second):
        delta = 2.0 * torch.diag(layer.v.detach()) @ leaves["B"] @ torch.diag(layer.u.detach()) @ leaves["A"]
        h = h @ (layer.base.weight + delta).t() + layer.base.bias
        if layer is first:
            h = torch.tanh(h)
    h.square().sum().backward()
    torch.testing.assert_close(A.grad, leaves["A"].grad)
    torch.testing.assert_close(B.grad, leaves["B"].grad)


def test_tied_lora_starts_as_a_shared_lora_with_unit_scalings():
    model = two_tied_linears()
    torch.manual_seed(0)
    fresh = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6))
    build_variant({"name": "tied_lora", "targets": ["0", "2"], "r": 3}).adapt(fresh, head=())
    assert not fresh.lf_shared.B_6x6.any() and fresh.lf_shared.A_6x6.abs().max() > 0
    for layer in adapter_layers(fresh):
        assert torch.equal(layer.v, torch.ones(6)) and torch.equal(layer.u, torch.ones(3))
    # the update is low rank: at most r, whatever v and u do
    assert torch.linalg.matrix_rank(model[0].delta_weight()) == 3
