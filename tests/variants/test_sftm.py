"""SFTM / LT-SFT: dense phase, global top-K selection, reset and rewind, the fixed sparse mask, and resuming."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lorafactory.errors import ConfigError
from lorafactory.variants import (
    adapter_parameters,
    adapter_state_dict,
    build_variant,
    load_adapter_state_dict,
    merge_and_unload,
)
from lorafactory.variants.base import count_trainable, named_adapter_layers

R = 1


class Net(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.a, self.b, self.classifier = nn.Linear(6, 8), nn.Linear(8, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.classifier(torch.tanh(self.b(torch.tanh(self.a(x)))))


def adapted(seed: int = 0, **cfg):
    model = Net(seed)
    variant = build_variant({"name": "sftm", "targets": ["a", "b"], "r": R, **cfg})
    variant.adapt(model, head=("classifier",))
    return variant, model


def fill_deltas(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in named_adapter_layers(model):
            layer.delta.copy_(torch.randn(layer.delta.shape, generator=g))


def test_dense_phase_is_full_fine_tuning_of_the_weight():
    _, model = adapted()
    fill_deltas(model)
    layer = model.a
    weight = (layer.base.weight + layer.delta).detach().requires_grad_(True)
    x = torch.randn(2, 4, 6, requires_grad=True)
    out = layer(x)
    ref = nn.functional.linear(x, weight, layer.base.bias)
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(out)
    out.backward(grad)
    x_grad = x.grad.clone()
    x.grad = None
    ref.backward(grad)
    torch.testing.assert_close(layer.delta.grad, weight.grad)
    torch.testing.assert_close(x_grad, x.grad)


def test_switch_keeps_the_global_top_k_entries_and_resets_the_update():
    variant, model = adapted(full_steps=3)
    fill_deltas(model)
    with torch.no_grad():
        model.b.delta.mul_(3.0)  # a global threshold gives layer b more than its LoRA-sized share
    deltas = {name: layer.delta.detach().clone() for name, layer in named_adapter_layers(model)}
    k = R * (6 + 8) + R * (8 + 5)
    assert variant.budget(model) == k
    everything = torch.cat([d.abs().flatten() for d in deltas.values()])
    threshold = everything.topk(k).values.min()
    x = torch.randn(4, 6)
    base_out = model.classifier(torch.tanh(model.b.base(torch.tanh(model.a.base(x)))))

    assert variant.on_train_batch_end(model, 2) is None
    assert variant.on_train_batch_end(model, 3) is True
    for name, layer in named_adapter_layers(model):
        expected = (deltas[name].abs().flatten() >= threshold).nonzero().flatten()
        assert torch.equal(layer.indices, expected), name
        assert layer.delta.numel() == 0 and not layer.delta.requires_grad
        assert layer.values.requires_grad and torch.count_nonzero(layer.values) == 0
    assert model.b.values.numel() > R * (8 + 5)
    assert count_trainable(adapter_parameters(model)) == variant.expected_params(model) == k
    torch.testing.assert_close(model(x), base_out, atol=0, rtol=0)  # ΔW reset: the base model again
    assert variant.threshold == pytest.approx(threshold.item())
    assert variant.on_train_batch_end(model, 4) is None  # one selection


def test_density_sets_the_budget_as_a_share_of_the_weights():
    variant, model = adapted(density=0.25, full_steps=1)
    fill_deltas(model)
    variant.on_train_batch_end(model, 1)
    assert sum(layer.values.numel() for _, layer in named_adapter_layers(model)) == round(0.25 * (48 + 40))


def test_sparse_phase_trains_only_the_masked_entries():
    variant, model = adapted(full_steps=1)
    fill_deltas(model)
    variant.on_train_batch_end(model, 1)
    layer = model.b
    x = torch.randn(3, 8)
    out = layer(x)
    grad = torch.randn_like(out)
    out.backward(grad)
    dense = grad.t() @ x  # ∂L/∂W
    torch.testing.assert_close(layer.values.grad, dense.flatten()[layer.indices])

    mask_before = {name: lay.indices.clone() for name, lay in named_adapter_layers(model)}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        model(torch.randn(5, 6)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, lay in named_adapter_layers(model):
        assert torch.equal(lay.indices, mask_before[name])  # the mask stays fixed
        changed = lay.delta_weight().flatten().nonzero().flatten()
        assert set(changed.tolist()) <= set(lay.indices.tolist()) and changed.numel() > 0
    originals = {name: lay.base.weight.detach().clone() for name, lay in named_adapter_layers(model)}
    merged = merge_and_unload(copy.deepcopy(model))
    for name, weight in originals.items():
        differs = (merged.get_submodule(name).weight != weight).sum().item()
        assert 0 < differs <= model.get_submodule(name).values.numel()


def test_switch_rewinds_the_head_and_restarts_its_moments():
    variant, model = adapted(full_steps=2)
    model.classifier.requires_grad_(True)
    start = model.classifier.weight.detach().clone()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for step in (1, 2):
        model(torch.randn(4, 6)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        switched = variant.on_train_batch_end(model, step)
    assert switched
    torch.testing.assert_close(model.classifier.weight, start, atol=0, rtol=0)
    rebuilt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for p in model.classifier.parameters():  # what the loop does: carry the state of parameters still there
        rebuilt.state[p] = optimizer.state[p]
    model(torch.randn(4, 6)).square().sum().backward()
    variant.on_before_optimizer_step(model, rebuilt)
    assert all(p not in rebuilt.state for p in model.classifier.parameters())
    rebuilt.step()
    assert all(rebuilt.state[p]["step"] == 1 for p in model.classifier.parameters())  # Adam starts afresh
    variant.on_before_optimizer_step(model, rebuilt)
    assert all(p in rebuilt.state for p in model.classifier.parameters())  # only once


def test_state_round_trips_across_the_switch_into_a_fresh_model():
    variant, model = adapted(full_steps=1)
    fill_deltas(model)
    variant.on_train_batch_end(model, 1)
    with torch.no_grad():
        for _, layer in named_adapter_layers(model):
            layer.values.normal_()
    state, progress = adapter_state_dict(model), copy.deepcopy(variant.state_dict())
    x = torch.randn(3, 6)
    expected = model(x)

    fresh_variant, fresh = adapted(seed=0, full_steps=1)  # dense phase, same base weights
    load_adapter_state_dict(fresh, state)
    fresh_variant.load_state_dict(progress, fresh)
    torch.testing.assert_close(fresh(x), expected, atol=0, rtol=0)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }
    assert fresh_variant.on_train_batch_end(fresh, 2) is None
    assert fresh_variant.summary(fresh) == variant.summary(model)
    assert fresh_variant.reset_head_moments  # the pending restart of the head's moments survives a resume


def test_a_dense_state_loads_into_a_sparse_layer():
    variant, model = adapted(full_steps=1)
    fill_deltas(model)
    state = adapter_state_dict(model)
    x = torch.randn(3, 6)
    expected = model(x)
    variant.on_train_batch_end(model, 1)
    load_adapter_state_dict(model, state)
    torch.testing.assert_close(model(x), expected, atol=0, rtol=0)
    assert all(layer.dense and layer.delta.requires_grad for _, layer in named_adapter_layers(model))


def test_two_sparse_fine_tunings_compose_by_addition():
    """θ0 + φ1 + φ2: merge one SFT, adapt again and load the other; the weights are the sum of both differences."""
    states = []
    for seed in (1, 2):
        variant, model = adapted(full_steps=1)
        fill_deltas(model, seed)
        variant.on_train_batch_end(model, 1)
        with torch.no_grad():
            for _, layer in named_adapter_layers(model):
                layer.values.normal_()
        states.append((adapter_state_dict(model), {n: lay.delta_weight() for n, lay in named_adapter_layers(model)}))
    variant, model = adapted()
    w0 = {name: layer.base.weight.detach().clone() for name, layer in named_adapter_layers(model)}
    load_adapter_state_dict(model, states[0][0])
    merge_and_unload(model)
    variant.adapt(model, head=("classifier",))
    load_adapter_state_dict(model, states[1][0])
    merge_and_unload(model)
    for name, weight in w0.items():
        expected = weight + states[0][1][name] + states[1][1][name]
        torch.testing.assert_close(model.get_submodule(name).weight, expected)


def test_summary_records_both_phases():
    variant, model = adapted(full_steps=1)
    assert variant.summary(model) == {"phase": "dense", "full_steps": 1}
    fill_deltas(model)
    variant.on_train_batch_end(model, 1)
    summary = variant.summary(model)
    assert summary["phase"] == "sparse" and summary["switched_at"] == 1
    assert summary["budget"] == sum(summary["entries"].values()) == R * (6 + 8) + R * (8 + 5)


@pytest.mark.parametrize(
    ("cfg", "message"),
    [({"full_steps": 0}, "variant.full_steps must be >= 1"), ({"density": 1.5}, r"variant.density must be in")],
)
def test_config_errors_name_the_override(cfg, message):
    with pytest.raises(ConfigError, match=message):
        build_variant({"name": "sftm", **cfg})
