"""DiffoRA: the gated search, the discretisation to the top ⌈ρ·M⌉ modules, and resuming across the switch."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lorafactory.errors import ConfigError
from lorafactory.variants import adapter_parameters, adapter_state_dict, build_variant, load_adapter_state_dict
from lorafactory.variants.base import count_trainable, named_adapter_layers

R = 2


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 5), nn.Linear(5, 3))


def adapted(seed: int = 0, **cfg):
    model = mlp(seed)
    variant = build_variant({"name": "diffora", "targets": ["0", "2", "4", "5"], "r": R, **cfg})
    variant.adapt(model, head=())
    return variant, model


def perturb(model: nn.Module, logits: list[float]) -> None:
    with torch.no_grad():
        for (_, layer), logit in zip(named_adapter_layers(model), logits, strict=True):
            layer.lora_B.normal_()
            layer.gate_logit.fill_(logit)


def test_search_forward_is_the_gated_lora_branch():
    _, model = adapted()
    perturb(model, [0.3, -1.0, 2.0, 0.0])
    layer = model[2]
    x = torch.randn(4, 8)
    gate = torch.sigmoid(torch.tensor(-1.0))
    expected = layer.base(x) + gate * layer.scaling * x @ layer.lora_A.t() @ layer.lora_B.t()
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-5)
    layer(x).square().sum().backward()
    assert layer.gate_logit.grad.abs().item() > 0
    torch.testing.assert_close(layer.delta_weight(), gate * layer.scaling * layer.lora_B @ layer.lora_A)


def test_discretization_keeps_exactly_the_top_modules_and_the_rest_equal_the_base():
    variant, model = adapted(keep_ratio=0.5, search_steps=3)
    perturb(model, [0.3, -1.0, 2.0, 0.0])
    x = torch.randn(5, 6)
    inputs = {}  # each layer's input and output before the switch
    hooks = [
        layer.register_forward_hook(lambda m, args, out, n=name: inputs.__setitem__(n, (args[0], out.detach())))
        for name, layer in named_adapter_layers(model)
    ]
    model(x)
    for hook in hooks:
        hook.remove()
    assert variant.on_train_batch_end(model, 2) is None  # still searching
    assert variant.on_train_batch_end(model, 3) is True
    assert variant.selected == ["0", "4"]  # the two largest gates (σ(2.0), σ(0.3)), in model order
    for name, layer in named_adapter_layers(model):
        layer_in, before = inputs[name]
        assert layer.gate_logit.numel() == 0 and not layer.gate_logit.requires_grad
        if name in variant.selected:  # the gate folded into B: the module computes what it did
            torch.testing.assert_close(layer(layer_in), before, atol=1e-6, rtol=1e-5)
            assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
        else:
            assert layer.lora_A.numel() == layer.lora_B.numel() == 0
            torch.testing.assert_close(layer(layer_in), layer.base(layer_in), atol=0, rtol=0)
            assert torch.count_nonzero(layer.delta_weight()) == 0
    trainable = count_trainable(adapter_parameters(model))
    assert trainable == variant.expected_params(model) == R * (6 + 8) + R * (8 + 5)
    assert variant.on_train_batch_end(model, 4) is None  # the switch happens once


@pytest.mark.parametrize(("ratio", "kept"), [(0.1, 1), (0.5, 2), (0.6, 3), (1.0, 4)])
def test_keep_ratio_rounds_up(ratio, kept):
    variant, model = adapted(keep_ratio=ratio, search_steps=1)
    perturb(model, [0.1, 0.2, 0.3, 0.4])
    variant.on_train_batch_end(model, 1)
    assert len(variant.selected) == kept == math.ceil(ratio * 4)
    assert variant.selected == ["0", "2", "4", "5"][4 - kept :]


class TwoBranches(nn.Module):
    """`a(x)` is the output; `b(x)` is computed but multiplied by 0, so its LoRA branch cannot lower the loss."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.a(x) + 0 * self.b(x)


def test_search_opens_the_gate_of_a_useful_module_only():
    """First-order search on the training loss, from LoRA's init (B = 0): as the useful module's B learns, its branch
    lowers the loss and its gate opens; the useless module's gate gets no signal and stays at ½."""
    torch.manual_seed(0)
    model = TwoBranches()
    build_variant({"name": "diffora", "targets": ["a", "b"], "r": R}).adapt(model, head=())
    x = torch.randn(64, 4)
    target = x @ torch.randn(4, 4)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(30):
        nn.functional.mse_loss(model(x), target).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert model.a.gate().item() > 0.55
    assert model.b.gate().item() == 0.5


def test_state_round_trips_across_the_switch_into_a_fresh_model():
    variant, model = adapted(search_steps=1)
    perturb(model, [0.3, -1.0, 2.0, 0.0])
    variant.on_train_batch_end(model, 1)
    with torch.no_grad():
        model[0].lora_A.add_(0.1)
    state, progress = adapter_state_dict(model), copy.deepcopy(variant.state_dict())
    x = torch.randn(3, 6)
    expected = model(x)

    fresh_variant, fresh = adapted(seed=0, search_steps=1)  # same base weights, still searching
    load_adapter_state_dict(fresh, state)
    fresh_variant.load_state_dict(progress, fresh)
    torch.testing.assert_close(fresh(x), expected, atol=0, rtol=0)
    trainable = {n for n, p in fresh.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in model.named_parameters() if p.requires_grad}
    assert fresh_variant.on_train_batch_end(fresh, 2) is None  # already switched
    assert fresh_variant.summary(fresh) == variant.summary(model)


def test_a_search_state_loads_into_a_discretized_layer():
    """The reverse resize: a layer that dropped its factors takes them back from a search-phase state."""
    variant, model = adapted(search_steps=1)
    perturb(model, [0.3, -1.0, 2.0, 0.0])
    state = adapter_state_dict(model)
    x = torch.randn(3, 6)
    expected = model(x)
    variant.on_train_batch_end(model, 1)
    load_adapter_state_dict(model, state)
    torch.testing.assert_close(model(x), expected, atol=0, rtol=0)
    assert all(layer.searching and layer.gate_logit.requires_grad for _, layer in named_adapter_layers(model))


def test_summary_records_both_phases():
    variant, model = adapted(search_steps=2, keep_ratio=0.25)
    perturb(model, [0.3, -1.0, 2.0, 0.0])
    during = variant.summary(model)
    assert during["phase"] == "search" and during["search_gates"]["4"] == pytest.approx(
        torch.sigmoid(torch.tensor(2.0))
    )
    variant.on_train_batch_end(model, 2)
    after = variant.summary(model)
    assert after["phase"] == "fine-tune" and after["switched_at"] == 2
    assert after["selected"] == ["4"] and after["kept"] == 1 and after["candidates"] == 4
    assert after["search_gates"] == during["search_gates"]


def test_training_through_the_switch_keeps_learning():
    """The loop's way: on_train_batch_end returns True, the optimizer is rebuilt over the kept factors, and the loss
    keeps falling after the dropped modules' contributions vanish."""
    variant, model = adapted(search_steps=20, keep_ratio=0.5)
    x = torch.randn(32, 6)
    target = mlp(seed=1)(x).detach()  # a nearby network: learnable

    def optimizer():
        return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)

    opt, losses = optimizer(), []
    for step in range(1, 61):
        loss = nn.functional.mse_loss(model(x), target)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if variant.on_train_batch_end(model, step):
            opt = optimizer()
    assert variant.switched_at == 20
    assert losses[-1] < 0.1 * losses[0] and losses[-1] < 0.5 * losses[20]  # losses[20]: right after the switch


@pytest.mark.parametrize(
    ("cfg", "message"),
    [({"search_steps": 0}, "variant.search_steps must be >= 1"), ({"keep_ratio": 0.0}, r"variant.keep_ratio")],
)
def test_config_errors_name_the_override(cfg, message):
    with pytest.raises(ConfigError, match=message):
        build_variant({"name": "diffora", **cfg})
