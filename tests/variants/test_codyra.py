"""CoDyRA: the threshold schedule of the official training loop, the dense phase, the unscaled update, pruning."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lorafactory.variants import build_variant


def adapted(**cfg):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.Linear(10, 6))
    variant = build_variant({"name": "codyra", "targets": ["0", "1"], "r": 4, **cfg})
    variant.adapt(model, head=())
    return variant, model


def official_thresholds(total: int, max_kappa: float, lambda_num: int, dense_frac: float) -> list[float]:
    """The κ the official `train_model` loop applies after each iteration (0 when it applies none), replayed."""
    lambdas = np.linspace(0, max_kappa, lambda_num)
    threshold_id, threshold = 0, lambdas[0]
    dense_iters = dense_frac * total
    lambda_step_iters = int((total - dense_iters) // lambda_num)
    applied = []
    for iteration in range(total):
        if lambda_step_iters > 0 and iteration >= dense_iters and iteration % lambda_step_iters == 0:
            threshold_id += 1
            threshold = lambdas[min(len(lambdas) - 1, threshold_id)]
        applied.append(float(threshold) if iteration > dense_iters else 0.0)
    return applied


@pytest.mark.parametrize(("total", "steps", "dense"), [(500, 50, 0.5), (137, 10, 0.3), (40, 50, 0.5), (64, 4, 0.0)])
def test_threshold_schedule_replays_the_official_loop(total, steps, dense):
    variant, _ = adapted(total_steps=total, max_threshold=5e-3, threshold_steps=steps, dense_fraction=dense)
    ours = [variant.threshold(step) for step in range(1, total + 1)]
    np.testing.assert_allclose(ours, official_thresholds(total, 5e-3, steps, dense), rtol=1e-12, atol=0)


def test_dense_phase_leaves_the_weights_alone_then_small_ones_are_cut():
    variant, model = adapted(total_steps=100, max_threshold=0.5, threshold_steps=2, dense_fraction=0.5)
    before = model[0].gate.detach().clone()
    for step in range(1, 51):
        variant.on_train_batch_end(model, step)
    assert torch.equal(model[0].gate, before)
    variant.on_train_batch_end(model, 76)  # κ = 0.5 from the second stage on
    expected = before.sign() * (before.abs() - 0.5).clamp_min(0)
    assert torch.equal(model[0].gate.detach(), expected)


def test_update_is_not_divided_by_the_rank():
    _, model = adapted(alpha=1.0)
    layer = model[0]
    with torch.no_grad():
        layer.lora_B.normal_()
    expected = (layer.lora_B * layer.gate) @ layer.lora_A
    torch.testing.assert_close(layer.delta_weight(), expected)


def test_end_of_training_keeps_the_non_zero_weights_only():
    variant, model = adapted(total_steps=10)
    with torch.no_grad():
        model[0].lora_B.normal_()
        model[1].lora_B.normal_()
        model[0].gate[:3] = 0
    x = torch.randn(5, 12)
    expected = model(x)
    variant.on_train_end(model)
    assert variant.summary(model)["ranks"] == {"0": 1, "1": 4}
    assert model[0].lora_A.shape == (1, 12)
    torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=1e-6)
