"""Uni-LoRA's own properties (an isometric, balanced projection of one shared vector; its gradient is Pᵀ of the
LoRA entries') and parity with PEFT's Uni-LoRA."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import batch_for
from peft_twin import with_peft_twin
from torch import nn

import lorafactory.variants.lora as lora_module
from lorafactory.variants import adapter_layers, adapter_parameters, adapter_state_dict, build_variant
from lorafactory.variants.base import count_trainable
from lorafactory.variants.unilora import normalise

D_ENTRIES = 3 * (10 + 8) + 3 * (8 + 6)  # r · (d_in + d_out) over both layers = 96


def adapted(d: int = 20, **cfg) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 6))
    build_variant({"name": "unilora", "targets": ["0", "2"], "r": 3, "theta_d_length": d, **cfg}).adapt(model, head=())
    return model


def projection(model: nn.Module) -> torch.Tensor:
    """P (D × d), rows in the order A_1, B_1, A_2, B_2, each row-major."""
    shared = model.lf_shared
    slots = torch.cat(
        [t.flatten() for layer in adapter_layers(model) for t in (layer.unilora_index_A, layer.unilora_index_B)]
    )
    P = torch.zeros(slots.numel(), shared.unilora_theta.numel(), dtype=torch.float64)
    P[torch.arange(slots.numel()), slots] = shared.unilora_norm.double()[slots]
    return P


def test_unilora_projection_is_a_balanced_isometry():
    model = adapted(d=20)
    P = projection(model)
    assert P.shape == (D_ENTRIES, 20)
    counts = (P != 0).sum(0)
    assert set(counts.tolist()) == {4, 5}  # ⌊96/20⌋ or ⌈96/20⌉ readers per slot
    torch.testing.assert_close(P.t() @ P, torch.eye(20, dtype=torch.float64))
    theta = model.lf_shared.unilora_theta.double()
    entries = torch.cat(
        [t.flatten() for layer in adapter_layers(model) for t in layer.factors(*layer.factor_inputs())]
    )
    torch.testing.assert_close(entries.double(), P @ theta)
    torch.testing.assert_close(entries.double().norm(), theta.norm())


def test_unilora_trains_one_shared_vector_with_an_assignment_from_the_seed():
    model = adapted(d=20)
    theta = model.lf_shared.unilora_theta
    assert count_trainable(adapter_parameters(model)) == 20
    assert all(layer.factor_inputs() == (theta,) for layer in adapter_layers(model))
    assert not any(p.requires_grad for layer in adapter_layers(model) for p in layer.parameters())
    assert torch.equal(projection(adapted(d=20)), projection(model))
    assert not torch.equal(projection(adapted(d=20, projection_seed=1)), projection(model))
    assert [k for k in adapter_state_dict(model) if "unilora" in k] == [
        "lf_shared.unilora_theta"
    ]  # the rest regenerates
    assert theta.abs().max() <= 0.02 and theta.abs().min() > 0


def test_unilora_vector_longer_than_the_entries_leaves_slots_unused_and_the_rest_isometric():
    model = adapted(d=100)  # D = 96 entries: each reads its own slot, 4 slots stay unused
    P = projection(model)
    used = (P != 0).sum(0)
    assert sorted(used.tolist()) == [0] * 4 + [1] * 96
    torch.testing.assert_close(P.t() @ P, torch.diag(used.double()))


@pytest.mark.parametrize("threshold", [0.0, math.inf])
def test_unilora_gradient_is_the_projected_gradient_of_the_lora_entries(threshold, monkeypatch):
    monkeypatch.setattr(lora_module, "MERGE_THRESHOLD", threshold)
    model = adapted(d=20).double()
    x = torch.randn(5, 10, dtype=torch.float64)
    model(x).square().sum().backward()

    P = projection(model)
    flat = (P @ model.lf_shared.unilora_theta.detach()).requires_grad_(True)  # θ_D, a leaf
    A1, B1, A2, B2 = flat.split([30, 24, 24, 18])
    h = torch.tanh(model[0].base(x) + x @ A1.view(3, 10).t() @ B1.view(8, 3).t())
    y = model[2].base(h) + h @ A2.view(3, 8).t() @ B2.view(6, 3).t()
    y.square().sum().backward()
    torch.testing.assert_close(model.lf_shared.unilora_theta.grad, P.t() @ flat.grad)


@pytest.mark.parametrize("path", ["merged", "two-branch"])
def test_unilora_matches_peft(path, monkeypatch):
    """PEFT's slot assignment and θ copied into ours: same outputs and the same gradient for θ."""
    monkeypatch.setattr(lora_module, "MERGE_THRESHOLD", 0.0 if path == "merged" else math.inf)
    loaded, variant, theirs, names = with_peft_twin(
        "tiny-bert", {"name": "unilora", "targets": "all-linear", "r": 4, "theta_d_length": 200}
    )
    ours = loaded.module
    their_theta = theirs.base_model.unilora_theta_d["default"]
    with torch.no_grad():
        ours.lf_shared.unilora_theta.copy_(their_theta)
        for name in names:
            mine, twin = ours.get_submodule(name), theirs.base_model.model.get_submodule(name)
            mine.unilora_index_A.copy_(twin.unilora_indices_A["default"])
            mine.unilora_index_B.copy_(twin.unilora_indices_B["default"])
        normalise(ours)
    for model in (ours, theirs):
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
    batch = batch_for(loaded, batch_size=4, seq=12)
    out, ref = ours.train()(**batch), theirs.train()(**batch)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    ref.loss.backward()
    torch.testing.assert_close(ours.lf_shared.unilora_theta.grad, their_theta.grad, atol=1e-5, rtol=1e-4)
