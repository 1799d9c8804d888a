"""SoRA: the proximal step on the gates, the L1 term, the gates' optimizer group, and pruning at the end."""

from __future__ import annotations

import torch
from torch import nn

from lorafactory.variants import adapter_parameters, adapter_state_dict, build_variant, load_adapter_state_dict
from lorafactory.variants.base import count_trainable


def two_layers(adapter_seed: int = 0, **cfg):
    """Two stacked linears (the same base weights every time), adapted with adapters drawn from `adapter_seed`."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.Linear(10, 6))
    torch.manual_seed(adapter_seed)
    variant = build_variant({"name": "sora", "targets": ["0", "1"], "r": 4, "alpha": 8, **cfg})
    variant.adapt(model, head=())
    return variant, model


def test_proximal_step_zeroes_every_gate_within_the_threshold_and_shrinks_the_rest_by_it():
    variant, model = two_layers(threshold=0.25)
    gates = torch.tensor([0.25, -0.25, 0.1, -0.2499, 0.5, -1.0, 0.2500001, 0.0])
    with torch.no_grad():
        model[0].gate.copy_(gates[:4])
        model[1].gate.copy_(gates[4:])
    variant.on_train_batch_end(model, 1)
    after = torch.cat([model[0].gate, model[1].gate]).detach()
    expected = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.25, -0.75, 0.0000001, 0.0])
    assert torch.count_nonzero(after[:4]) == 0 and after[7] == 0  # |g| <= ξ: exactly 0, the boundary included
    torch.testing.assert_close(after, expected, atol=1e-7, rtol=0)


def test_l1_term_is_the_mean_absolute_gate_over_the_whole_model():
    variant, model = two_layers(l1_weight=3.0)
    gates = torch.cat([model[0].gate, model[1].gate]).detach()
    torch.testing.assert_close(variant.aux_loss(model), 3.0 * gates.abs().mean())
    assert build_variant({"name": "sora", "targets": ["0"], "l1_weight": 0}).aux_loss(model) is None


def test_gates_form_their_own_group_without_weight_decay():
    variant, model = two_layers()
    groups = variant.param_groups(model, 1e-3)
    gates = [g for g in groups if g.get("name") == "gates"]
    assert len(gates) == 1 and gates[0]["weight_decay"] == 0.0 and gates[0]["lr"] == 1e-3
    assert {id(p) for p in gates[0]["params"]} == {id(model[0].gate), id(model[1].gate)}
    rest = {id(p) for g in groups if g.get("name") != "gates" for p in g["params"]}
    assert rest == {id(p) for p in (model[0].lora_A, model[0].lora_B, model[1].lora_A, model[1].lora_B)}


def dyadic(shape, generator):
    """Small multiples of 1/4: every product and sum below is exact in float32, so results do not depend on the
    order in which a BLAS kernel sums them."""
    return torch.randint(-4, 5, shape, generator=generator).float() / 4


def test_pruning_deletes_zero_gates_folds_the_rest_into_b_and_leaves_outputs_bit_identical():
    variant, model = two_layers(alpha=8)  # s = 2: exact
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in (model[0], model[1]):
            for p in (layer.base.weight, layer.base.bias, layer.lora_A, layer.lora_B):
                p.copy_(dyadic(p.shape, g))
        model[0].gate.copy_(torch.tensor([0.5, 0.0, -1.25, 0.0]))
        model[1].gate.copy_(torch.tensor([0.0, 0.0, 0.0, 2.0]))
    x = dyadic((5, 12), g)
    expected = model(x)
    delta = [layer.delta_weight().detach() for layer in (model[0], model[1])]
    variant.on_train_end(model)
    assert torch.equal(model(x), expected)
    assert (model[0].r, model[1].r) == (2, 1)
    for layer, before in zip((model[0], model[1]), delta, strict=True):
        assert torch.equal(layer.delta_weight(), before)
        assert torch.equal(layer.gate, torch.ones(layer.r)) and not layer.gate.requires_grad  # folded into B
    assert count_trainable(adapter_parameters(model)) == 2 * (12 + 10) + 1 * (10 + 6)
    assert variant.summary(model)["ranks"] == {"0": 2, "1": 1}


def test_pruning_keeps_random_outputs_to_rounding():
    variant, model = two_layers()
    with torch.no_grad():
        for layer in (model[0], model[1]):
            layer.lora_B.normal_()
            layer.gate[::2] = 0
    x = torch.randn(7, 12)
    expected = model(x)
    variant.on_train_end(model)
    torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=1e-6)


def test_a_pruned_adapter_loads_into_a_freshly_adapted_model():
    variant, model = two_layers()
    with torch.no_grad():
        for layer in (model[0], model[1]):
            layer.lora_B.normal_()
        model[0].gate[1:] = 0
    variant.on_train_end(model)
    x = torch.randn(3, 12)
    state = adapter_state_dict(model)
    _, fresh = two_layers(adapter_seed=1)
    load_adapter_state_dict(fresh, state)
    assert fresh[0].lora_A.shape == (1, 12) and fresh[0].lora_B.shape == (10, 1)
    torch.testing.assert_close(fresh(x), model(x))
