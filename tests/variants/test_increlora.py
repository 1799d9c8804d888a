"""IncreLoRA: the importance score, what a growth step does to the function, the budget, the optimizer's hold on the
new parameters (and the moments they inherit), and resuming mid-growth into a model of the grown shapes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_adalora import assert_same_run, toy, train

from lorafactory.training.optim import carry_over_state
from lorafactory.variants import adapter_parameters, adapter_state_dict, load_adapter_state_dict
from lorafactory.variants.base import count_trainable
from lorafactory.variants.increlora import RESERVE_GATE

GROWING = {
    "r": 4,
    "init_r": 1,
    "incre_rank_num": 2,
    "top_h": 1,
    "total_steps": 20,
    "init_warmup": 0.1,
    "incre_interval": 0.1,
}
"""Two layers, budget 8, each growth step gives one layer 2 components: growth at steps 4, 6, 8 (every 10% of 20 steps
after the first 10%), the budget spent at 8."""


def test_importance_is_the_update_weighted_by_its_gradient():
    _, model = toy("increlora", **GROWING)
    layer = model[0]
    with torch.no_grad():
        layer.gate.fill_(0.3)
    x = torch.randn(9, 16)
    model(x).square().sum().backward()
    # the same function with ΔW as a leaf: its gradient is the dense ∂L/∂ΔW
    delta = layer.delta_weight().detach().requires_grad_(True)
    hidden = torch.tanh(F.linear(x, layer.weight + delta, layer.bias))
    model[2](hidden).square().sum().backward()
    expected = (delta.detach() * delta.grad).abs().sum() / math.sqrt(delta.numel())
    assert layer.score == pytest.approx(expected.item(), rel=1e-5)


def test_growth_turns_reserve_components_into_active_ones_and_rescales_by_the_rank():
    _, model = toy("increlora", **GROWING)
    layer = model[0]
    with torch.no_grad():
        layer.gate.fill_(0.7)
    A, B, gates = layer.lora_A.detach().clone(), layer.lora_B.detach().clone(), layer.gate_vector().clone()
    assert (layer.r, layer.scaling) == (1, 16.0) and torch.equal(
        gates, torch.tensor([0.7, RESERVE_GATE, RESERVE_GATE])
    )
    layer.grow(2, torch.Generator().manual_seed(0))
    assert (layer.r, layer.reserve_gate.numel(), layer.scaling) == (3, 2, 16.0 / 3)
    assert torch.equal(layer.lora_A[:3], A) and torch.equal(layer.lora_B[:, :3], B)  # nothing moved
    old = (B * gates) @ A  # the old components; the former reserves keep Λ = ε, now trainable
    fresh = (layer.lora_B[:, 3:] * RESERVE_GATE) @ layer.lora_A[3:]
    torch.testing.assert_close(layer.delta_weight(), 16.0 / 3 * (old + fresh))
    assert layer.gate.requires_grad and torch.equal(layer.gate.detach(), gates)


def test_total_rank_never_exceeds_the_budget_and_the_optimizer_holds_the_new_parameters():
    # 1 + 1 + 4 + 4 would overshoot the budget of 8 (as the official allocator does): the second layer gets 2
    cfg = {**GROWING, "incre_rank_num": 4, "top_h": 2}
    totals = []

    def check(variant, model, optimizer):
        totals.append(sum(variant.summary(model)["ranks"].values()))
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        assert {id(p) for p in adapter_parameters(model) if p.requires_grad} <= held

    variant, model, _ = train("increlora", 8, each_step=check, **cfg)
    assert max(totals) == totals[-1] == 8 and totals[2] == 2
    assert variant.growth[0]["step"] == 4 and sorted(layer.r for layer in (model[0], model[2])) == [3, 5]
    assert all(layer.reserve_gate.numel() == 0 and not layer.scoring for layer in (model[0], model[2]))
    ranks = variant.summary(model)["ranks"]
    assert count_trainable(adapter_parameters(model)) == ranks["0"] * (16 + 12 + 1) + ranks["2"] * (12 + 8 + 1)


def test_grown_tensors_inherit_the_moments_of_the_entries_they_were_made_of():
    variant, model = toy("increlora", **GROWING)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(torch.randn(8, 16)).square().sum().backward()
    variant.on_before_optimizer_step(model, optimizer)
    optimizer.step()
    layer = model[0]
    old = {name: optimizer.state[getattr(layer, name)] for name in ("lora_A", "lora_B", "gate")}
    layer.score, model[2].score = 1.0, 0.0  # the first layer is the one to grow
    assert variant.on_train_batch_end(model, 4)
    new = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    carry_over_state(optimizer, new)
    for name, dim, kept in (("lora_A", 0, 3), ("lora_B", 1, 3), ("gate", 0, 1)):
        state = new.state[getattr(layer, name)]
        assert state["exp_avg"].shape == getattr(layer, name).shape and torch.equal(state["step"], old[name]["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[key].narrow(dim, 0, kept), old[name][key])
            assert torch.count_nonzero(state[key].narrow(dim, kept, 2)) == 0  # new entries start at zero moments


def test_a_grown_adapter_loads_into_a_freshly_adapted_model():
    _, model, _ = train("increlora", 5, **GROWING)
    assert sorted(layer.r for layer in (model[0], model[2])) == [1, 3]
    _, fresh = toy("increlora", adapter_seed=3, **GROWING)
    load_adapter_state_dict(fresh, adapter_state_dict(model))
    x = torch.randn(4, 16)
    torch.testing.assert_close(fresh(x), model(x))
    assert [fresh[0].scaling, fresh[2].scaling] == [16.0 / model[0].r, 16.0 / model[2].r]


@pytest.mark.parametrize("resume_at", [5, 9])  # between two growth steps; after the budget is spent
def test_resuming_mid_growth_continues_identically(resume_at):
    assert_same_run(train("increlora", 12, **GROWING), train("increlora", 12, resume_at=resume_at, **GROWING))
