"""ALLoRA: no scale, no dropout, AdamW with a per-row learning rate 1/√(‖row‖² + 1/η²), resume from a checkpoint."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from resume_check import assert_resume_is_exact
from torch import nn

from lorafactory.errors import ConfigError
from lorafactory.variants import build_variant

OPTIM = OmegaConf.create({"lr": 1e-2, "weight_decay": 0.1, "optimizer": {"betas": [0.9, 0.999], "eps": 1e-8}})


def single(seed=0, **cfg):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 10)).double()
    variant = build_variant({"name": "allora", "targets": ["0"], "r": 3, **cfg})
    variant.adapt(model, head=())
    return variant, model


def test_forward_has_no_scale_whatever_alpha_and_dropout_is_refused():
    variant, model = single(alpha=64)
    layer = model[0]
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 12, dtype=torch.float64)
    expected = x @ (layer.weight + layer.lora_B @ layer.lora_A).t() + layer.bias
    torch.testing.assert_close(model(x), expected)
    with pytest.raises(ConfigError, match="variant.dropout must be 0"):
        build_variant({"name": "allora", "dropout": 0.05})


def test_each_row_steps_with_its_own_learning_rate():
    """One step = torch's AdamW step (update and decay) with lr · 1/√(‖θ_i‖² + 1/η²) for row i."""
    variant, model = single(eta=3.0)
    layer = model[0]
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_B[0].zero_()  # a zero row: rate η · lr
    reference = [p.detach().clone().requires_grad_(True) for p in (layer.lora_A, layer.lora_B)]
    adamw = torch.optim.AdamW(reference, lr=1e-2, weight_decay=0.1)
    optimizer = variant.build_optimizer(variant.param_groups(model, 1e-2), OPTIM)
    for step in range(3):
        x = torch.randn(5, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
        model(x).square().sum().backward()
        for p, q in zip((layer.lora_A, layer.lora_B), reference, strict=True):
            q.grad = p.grad.clone()
        rates = [1 / (p.detach().square().sum(dim=1, keepdim=True) + 1 / 9).sqrt() for p in reference]
        before = [q.detach().clone() for q in reference]
        optimizer.step()
        adamw.step()
        optimizer.zero_grad()
        with torch.no_grad():
            for q, old, rate in zip(reference, before, rates, strict=True):
                q.copy_(old + rate * (q - old))  # AdamW's change, each row scaled by its rate
        if step == 0:
            torch.testing.assert_close(rates[1][0], torch.tensor([3.0], dtype=torch.float64))
        torch.testing.assert_close(layer.lora_A, reference[0])
        torch.testing.assert_close(layer.lora_B, reference[1])


def test_zero_initialised_b_starts_eta_times_faster_than_lora():
    """From B = 0, Adam's first step is ±lr per entry: ALLoRA's is ±η·lr on B."""
    for eta in (0.5, 4.0):
        variant, model = single(eta=eta)
        layer = model[0]
        optimizer = variant.build_optimizer(variant.param_groups(model, 1e-3), OmegaConf.merge(OPTIM, {"lr": 1e-3}))
        nn.functional.mse_loss(model(torch.randn(9, 12, dtype=torch.float64)), torch.ones(9, 10)).backward()
        optimizer.step()
        torch.testing.assert_close(layer.lora_B.abs(), torch.full_like(layer.lora_B, eta * 1e-3), rtol=1e-4, atol=0)


def test_resuming_from_a_checkpoint_continues_the_uninterrupted_run():
    assert_resume_is_exact("allora", OPTIM, "cosine", before=2, after=3)


def test_the_step_calls_the_closure_as_lightning_does():
    results = []
    for with_closure in (False, True):
        variant, model = single()
        optimizer = variant.build_optimizer(variant.param_groups(model, 1e-2), OPTIM)
        x = torch.randn(5, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

        def closure(model=model, x=x):
            loss = model(x).square().sum()
            loss.backward()
            return loss

        if with_closure:
            optimizer.step(closure)
        else:
            closure()
            optimizer.step()
        results.append(model[0].lora_B.detach().clone())
    assert results[0].abs().sum() > 0
    torch.testing.assert_close(results[0], results[1])
