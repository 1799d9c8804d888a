"""AltLoRA: one factor per step, projected steps, momentum re-aligned in rank space, invariance to B → BK, A → K⁻¹A,
resume from a checkpoint."""

from __future__ import annotations

import copy

import torch
from omegaconf import OmegaConf
from resume_check import assert_resume_is_exact
from torch import nn

from lorafactory.variants import build_variant

OPTIM = OmegaConf.create({"lr": 1e-2, "weight_decay": 0.0, "optimizer": {"betas": [0.9, 0.999], "eps": 1e-8}})


def single(d_in=12, d_out=10, r=3, seed=0, **cfg):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d_in, d_out)).double()
    variant = build_variant({"name": "altlora", "targets": ["0"], "r": r, "alpha": 6, "ridge": 1e-14, **cfg})
    variant.adapt(model, head=())
    return variant, model


def data(step, d_in=12, d_out=10):
    g = torch.Generator().manual_seed(step)
    return torch.randn(16, d_in, generator=g, dtype=torch.float64), torch.randn(
        16, d_out, generator=g, dtype=torch.float64
    )


def loss_step(model, optimizer, step):
    x, y = data(step)
    nn.functional.mse_loss(model(x), y).backward()
    optimizer.step()
    optimizer.zero_grad()


def dense_gradient(layer, step):
    x, y = data(step)
    W = (layer.weight + layer.delta_weight()).detach().requires_grad_(True)
    nn.functional.mse_loss(nn.functional.linear(x, W, layer.bias), y).backward()
    return W.grad


def test_one_factor_moves_per_step_b_first():
    for switch_every, expected in ((1, "BABAB"), (2, "BBAAB")):
        variant, model = single(switch_every=switch_every)
        layer = model[0]
        optimizer = variant.build_optimizer(variant.param_groups(model, 1e-2), OPTIM)
        moved = ""
        for step in range(5):
            A, B = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
            loss_step(model, optimizer, step)
            changed = [
                name for name, old, new in (("A", A, layer.lora_A), ("B", B, layer.lora_B)) if (old != new).any()
            ]
            assert len(changed) == 1, changed
            moved += changed[0]
        assert moved == expected


def test_steps_are_the_projections_of_the_full_gradient():
    """First B-step: s·ΔB·A = −lr·G P_A; first A-step: s·B·ΔA = −lr·P_B G (momentum starts at 0, bias-corrected)."""
    variant, model = single()
    layer = model[0]
    lr, s = 1e-2, layer.scaling
    optimizer = variant.build_optimizer(variant.param_groups(model, lr), OPTIM)
    A, G = layer.lora_A.detach().clone(), dense_gradient(layer, 0)
    loss_step(model, optimizer, 0)
    P_A = torch.linalg.pinv(A) @ A
    torch.testing.assert_close(s * layer.lora_B.detach() @ A, -lr * G @ P_A)

    B, A, G = layer.lora_B.detach().clone(), layer.lora_A.detach().clone(), dense_gradient(layer, 1)
    loss_step(model, optimizer, 1)
    P_B = B @ torch.linalg.pinv(B)
    torch.testing.assert_close(s * B @ (layer.lora_A.detach() - A), -lr * P_B @ G)


def test_momentum_is_realigned_when_the_other_factor_moves():
    """After an A-step A_old → A, B's rank-space momentum stands for the same weight-space momentum, projected on the
    new row space: M_B' A = M_B A_old P_A."""
    variant, model = single()
    layer = model[0]
    optimizer = variant.build_optimizer(variant.param_groups(model, 1e-2), OPTIM)
    loss_step(model, optimizer, 0)  # B-step: M_B ≠ 0
    M_B, A_old = optimizer.state[layer.lora_B]["momentum"].clone(), layer.lora_A.detach().clone()
    loss_step(model, optimizer, 1)  # A-step
    A = layer.lora_A.detach()
    assert not torch.equal(A, A_old)
    P_A = torch.linalg.pinv(A) @ A
    torch.testing.assert_close(optimizer.state[layer.lora_B]["momentum"] @ A, M_B @ A_old @ P_A)


def test_updates_are_invariant_to_reparameterising_the_factors():
    """(B K, K⁻¹ A) is the same adapter as (B, A): AltLoRA moves both along the same ΔW trajectory."""
    trajectories = []
    K = torch.tensor([[2.0, 0.5, 0.0], [0.0, 0.5, 0.3], [0.1, 0.0, 1.5]], dtype=torch.float64)
    for reparameterise in (False, True):
        variant, model = single(seed=0)
        layer = model[0]
        with torch.no_grad():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=torch.Generator().manual_seed(5)))
            if reparameterise:
                layer.lora_B.copy_(layer.lora_B @ K)
                layer.lora_A.copy_(torch.linalg.solve(K, layer.lora_A))
        optimizer = variant.build_optimizer(
            variant.param_groups(model, 1e-2), OmegaConf.merge(OPTIM, {"weight_decay": 0.1})
        )
        deltas = []
        for step in range(6):
            loss_step(model, optimizer, step)
            deltas.append(layer.delta_weight().detach().clone())
        trajectories.append(torch.stack(deltas))
    torch.testing.assert_close(trajectories[0], trajectories[1], rtol=1e-8, atol=1e-10)


def test_learning_rate_is_read_from_the_group_at_each_step():
    variant, model = single()
    optimizer = variant.build_optimizer(variant.param_groups(model, 1e-2), OPTIM)
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    before = copy.deepcopy(model.state_dict())
    loss_step(model, optimizer, 0)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key])


def test_resuming_from_a_checkpoint_continues_the_uninterrupted_run():
    """Resumed mid-way (after an odd number of steps, so in an A phase) it continues the uninterrupted run."""
    assert_resume_is_exact("altlora", OPTIM, "linear", before=3, after=3)


def test_the_step_calls_the_closure_as_lightning_does():
    results = []
    for with_closure in (False, True):
        variant, model = single()
        optimizer = variant.build_optimizer(variant.param_groups(model, 1e-2), OPTIM)
        x, y = data(0)

        def closure(model=model, x=x, y=y):
            loss = nn.functional.mse_loss(model(x), y)
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
