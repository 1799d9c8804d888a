"""NOLA's own properties: trainable count independent of the layer's shape and rank, bases regenerated bit-identically
from the seed and shared by the model, and coefficient gradients equal to autograd through explicit bases."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lorafactory.variants.lora as lora_module
from lorafactory.variants import adapter_layers, adapter_state_dict, build_variant


def adapted(r: int = 4, seed: int = 0, **cfg) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(48, 40), nn.ReLU(), nn.Linear(40, 7))
    build_variant({"name": "nola", "targets": ["0", "2"], "r": r, **cfg}).adapt(model, head=())
    return model


def randomize(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model):
            layer.nola_alpha.copy_(torch.randn(layer.nola_alpha.shape, generator=g))
            layer.nola_beta.copy_(torch.randn(layer.nola_beta.shape, generator=g))


@pytest.mark.parametrize("r", [2, 16])
def test_nola_trainable_count_is_independent_of_the_layer_shape_and_rank(r):
    model = adapted(r=r, num_basis_a=30, num_basis_b=20)
    for layer in adapter_layers(model):
        trainable = {n: p.numel() for n, p in layer.named_parameters() if p.requires_grad}
        assert trainable == {"nola_alpha": 30, "nola_beta": 20}


def test_nola_bases_are_regenerated_bit_identically_from_the_seed_and_not_saved():
    model = adapted(num_basis_a=30, num_basis_b=20)
    shared = model.lf_shared
    assert shared.nola_A.shape == (48, 4, 30) and shared.nola_B.shape == (40, 4, 20)  # the largest d_in, d_out
    assert shared.nola_A.abs().max() <= 1 / math.sqrt(30) and shared.nola_B.abs().max() <= 1 / math.sqrt(20)
    again = adapted(seed=7, num_basis_a=30, num_basis_b=20)  # another global random state: bases come from the seed
    assert torch.equal(again.lf_shared.nola_A, shared.nola_A) and torch.equal(again.lf_shared.nola_B, shared.nola_B)
    other = adapted(num_basis_a=30, num_basis_b=20, basis_seed=1)
    assert not torch.equal(other.lf_shared.nola_A, shared.nola_A)
    state = adapter_state_dict(model)
    assert not [k for k in state if "lf_shared" in k]
    assert {k for k in state if "A0" in k} == {"0.nola_A0", "2.nola_A0"}  # per-layer anchors are saved


def test_nola_starts_at_the_anchor_with_b_zero():
    model = adapted(num_basis_a=30, num_basis_b=20)
    for layer in adapter_layers(model):
        A, B = layer.factors(*layer.factor_inputs())
        assert torch.equal(A, layer.nola_A0) and torch.count_nonzero(B) == 0
        bound = 1 / math.sqrt(layer.in_features)  # Kaiming-uniform, as LoRA's A
        assert layer.nola_A0.abs().max() <= bound and layer.nola_A0.abs().max() > 0.8 * bound


@pytest.mark.parametrize("threshold", [0.0, math.inf])  # merged weight and two branches
def test_nola_coefficient_gradients_equal_autograd_through_explicit_bases(threshold, monkeypatch):
    monkeypatch.setattr(lora_module, "MERGE_THRESHOLD", threshold)
    model = adapted(num_basis_a=30, num_basis_b=20, alpha=8.0).double()
    randomize(model)
    x = torch.randn(6, 48, dtype=torch.float64)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        model(x).square().sum().backward()
    assert not [t.shape for t in saved if t.dim() >= 2 and 4 in t.shape]  # no A, B nor basis slice kept

    shared = model.lf_shared
    h = x
    grads = []
    for layer in (model[0], model[2]):
        alpha = layer.nola_alpha.detach().clone().requires_grad_(True)
        beta = layer.nola_beta.detach().clone().requires_grad_(True)
        basis_A = shared.nola_A[: layer.in_features].permute(2, 1, 0)  # (k_A, r, d_in): Â_i
        basis_B = shared.nola_B[: layer.out_features].permute(2, 0, 1)  # (k_B, d_out, r): B̂_j
        A = layer.nola_A0 + sum(alpha[i] * basis_A[i] for i in range(30))
        B = sum(beta[j] * basis_B[j] for j in range(20))
        h = layer.base(h) + 2.0 * h @ (B @ A).t()
        h = torch.relu(h) if layer is model[0] else h
        grads.append((layer, alpha, beta))
    h.square().sum().backward()
    for layer, alpha, beta in grads:
        torch.testing.assert_close(layer.nola_alpha.grad, alpha.grad)
        torch.testing.assert_close(layer.nola_beta.grad, beta.grad)


def test_nola_coefficients_train_faster_than_the_head():
    model = adapted(num_basis_a=30, num_basis_b=20)
    head = nn.Linear(7, 2)
    model.append(head)
    variant = build_variant({"name": "nola", "targets": ["0", "2"], "r": 4})
    groups = {g["name"]: g for g in variant.param_groups(model, 1e-3)}
    assert groups["coefficients"]["lr"] == pytest.approx(1e-2) and groups["head"]["lr"] == 1e-3
    assert {id(p) for p in groups["head"]["params"]} == {id(p) for p in head.parameters()}
    assert len(groups["coefficients"]["params"]) == 4
