"""AltLoRA: one factor per step, projected steps, momentum re-aligned in rank space, invariance to B → BK, A → K⁻¹A,
resume from a checkpoint."""

from __future__ import annotations

import copy

import torch
from conftest import batch_for, tiny
from omegaconf import OmegaConf
from torch import nn

from lorafactory.models import unfreeze
from lorafactory.training.optim import warmup_schedule
from lorafactory.variants import adapter_state_dict, build_variant, load_adapter_state_dict

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


def no_dropout(model):
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


def fresh(seed=0):
    loaded = tiny("tiny-bert")
    torch.manual_seed(seed)
    variant = build_variant({"name": "altlora", "targets": "all-linear", "r": 4})
    variant.adapt(loaded.module, head=loaded.head)
    unfreeze(loaded.module, loaded.head)
    no_dropout(loaded.module)
    optimizer = variant.build_optimizer(variant.param_groups(loaded.module, 1e-2), OPTIM)
    return loaded, optimizer, warmup_schedule(optimizer, 6, "linear", 0.2)


def steps(loaded, optimizer, scheduler, batches):
    for batch in batches:
        loaded.module(**batch).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def test_resuming_from_a_checkpoint_continues_the_uninterrupted_run():
    """Resumed mid-way (after an odd number of steps, so in an A phase) it continues the uninterrupted run."""
    loaded, optimizer, scheduler = fresh()
    batches = [batch_for(loaded, batch_size=4, seed=i) for i in range(6)]
    steps(loaded, optimizer, scheduler, batches[:3])
    checkpoint = copy.deepcopy(
        {"model": adapter_state_dict(loaded.module), "optim": optimizer.state_dict(), "sched": scheduler.state_dict()}
    )
    torch.manual_seed(1)  # the same random stream (attention dropout) after the checkpoint in both runs
    steps(loaded, optimizer, scheduler, batches[3:])

    loaded2, optimizer2, scheduler2 = fresh(seed=123)
    load_adapter_state_dict(loaded2.module, checkpoint["model"])
    optimizer2.load_state_dict(checkpoint["optim"])
    scheduler2.load_state_dict(checkpoint["sched"])
    torch.manual_seed(1)
    steps(loaded2, optimizer2, scheduler2, batches[3:])
    resumed = adapter_state_dict(loaded2.module)
    for key, value in adapter_state_dict(loaded.module).items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-6, atol=1e-6, msg=key)


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
