"""S2-LoRA: A and B shared per weight shape, a sparse rank-coefficient vector per layer, soft-thresholded each step."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorafactory.variants import adapter_layers, adapter_state_dict, build_variant
from lorafactory.variants.base import count_trainable


def s2_model(seed: int = 0, **cfg) -> tuple[nn.Sequential, object]:
    """Two 8 × 8 linears and one 5 × 8: two shape groups."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 5)).double()
    variant = build_variant({"name": "s2_lora", "targets": ["0", "2", "4"], "r": 4, "alpha": 8, **cfg})
    variant.adapt(model, head=())
    return model, variant


def test_s2_lora_shares_one_pair_per_shape_and_keeps_r_coefficients_per_layer():
    model, variant = s2_model()
    shared = model.lf_shared
    assert {n: tuple(p.shape) for n, p in shared.named_parameters()} == {
        "A_8x8": (4, 8),
        "B_8x8": (8, 4),
        "A_5x8": (4, 8),
        "B_5x8": (5, 4),
    }
    first, second, third = adapter_layers(model)
    assert first.factor_inputs()[0] is second.factor_inputs()[0] is shared.A_8x8
    assert first.factor_inputs()[1] is second.factor_inputs()[1] is shared.B_8x8
    assert third.factor_inputs()[0] is shared.A_5x8
    for layer in (first, second, third):
        assert [n for n, _ in layer.named_parameters() if not n.startswith("base.")] == ["coef"]
        assert not layer.coef.any()  # λ = 0: the model starts at the base
    assert 0.01 < shared.A_8x8.std() < 0.04 and 0.01 < shared.B_5x8.std() < 0.04  # AdaLoRA's N(0, 0.02²)
    count = 3 * 4 + 4 * (8 + 8) + 4 * (8 + 5)
    assert count_trainable(p for p in model.parameters()) == count == variant.expected_params(model)
    assert sum(k.startswith("lf_shared.") for k in adapter_state_dict(model)) == 4


def test_s2_lora_update_is_the_shared_pair_weighted_by_the_coefficients():
    """ΔW = s · B diag(λ) A; zero coefficients drop their component, so the rank is the number of non-zero λ."""
    model, _ = s2_model()
    layer = model[2]
    with torch.no_grad():
        layer.coef.copy_(torch.tensor([0.7, 0.0, -1.3, 0.0], dtype=torch.float64))
    A, B = model.lf_shared.A_8x8, model.lf_shared.B_8x8
    kept = [0, 2]
    expected = 2.0 * B[:, kept] @ torch.diag(layer.coef[kept]) @ A[kept]
    torch.testing.assert_close(layer.delta_weight(), expected.detach())
    assert torch.linalg.matrix_rank(layer.delta_weight()) == 2
    x = torch.randn(3, 8, dtype=torch.float64)
    torch.testing.assert_close(layer(x), layer.base(x) + x @ expected.detach().t())


def test_s2_lora_first_gradient_reaches_the_coefficients_only():
    """At λ = 0 only λ moves: ∂L/∂λ = s · diag(Bᵀ G Aᵀ), and A, B get zero gradient."""
    model, _ = s2_model()
    layer = model[4]
    x = torch.randn(6, 8, dtype=torch.float64)
    g = torch.randn(6, 5, dtype=torch.float64)
    (layer(x) * g).sum().backward()
    A, B = model.lf_shared.A_5x8, model.lf_shared.B_5x8
    G = g.t() @ x
    torch.testing.assert_close(layer.coef.grad, 2.0 * torch.diagonal(B.t() @ G @ A.t()).detach())
    assert not A.grad.any() and not B.grad.any()


@pytest.mark.parametrize("l1", [0.1, 0.0])
def test_s2_lora_soft_thresholds_the_coefficients_at_lr_times_l1(l1):
    model, variant = s2_model(l1=l1)
    values = torch.tensor([0.5, -0.005, 0.02, -0.3], dtype=torch.float64)
    for layer in adapter_layers(model):
        with torch.no_grad():
            layer.coef.copy_(values)
    others = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
    coefs = [layer.coef for layer in adapter_layers(model)]
    optimizer = torch.optim.SGD([{"params": others, "lr": 1.0}, {"params": coefs, "lr": 0.1}])
    variant.on_before_optimizer_step(model, optimizer)
    optimizer.step()  # no gradients: only the proximal step moves λ
    variant.on_train_batch_end(model, 1)
    expected = torch.tensor([0.49, 0.0, 0.01, -0.29], dtype=torch.float64) if l1 else values
    for layer in adapter_layers(model):
        torch.testing.assert_close(layer.coef.detach(), expected)
    ranks = variant.summary(model)["ranks"]
    assert ranks == {name: 3 if l1 else 4 for name in ("0", "2", "4")}


def test_s2_lora_training_keeps_the_coefficients_the_task_needs_and_zeroes_the_others():
    """The target is reachable through the first layer alone: its coefficients grow from zero despite the threshold,
    while the other layers' (started off zero, never pushed by the task) end exactly at zero."""
    model, variant = s2_model()
    with torch.no_grad():
        for layer in (model[2], model[4]):
            layer.coef.fill_(0.05)
    torch.manual_seed(1)
    x = torch.randn(64, 8, dtype=torch.float64)
    first = model[0]
    target = (first.base(x) + 0.3 * x @ torch.randn(8, 8, dtype=torch.float64).t()).detach()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.02)
    for step in range(60):
        (first(x) - target).square().mean().backward()
        variant.on_before_optimizer_step(model, optimizer)
        optimizer.step()
        optimizer.zero_grad()
        variant.on_train_batch_end(model, step + 1)
    assert variant.summary(model)["ranks"] == {"0": 4, "2": 0, "4": 0}
