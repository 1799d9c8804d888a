"""LoRA-FA: A frozen, B trained on the projected gradient; parity with PEFT's optimizer; resume from a checkpoint."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import batch_for, tiny
from omegaconf import OmegaConf
from peft_twin import with_peft_twin
from torch import nn

from lorafactory.models import unfreeze
from lorafactory.training.optim import warmup_schedule
from lorafactory.variants import adapter_layers, adapter_state_dict, build_variant, load_adapter_state_dict

OPTIM = {"lr": 1e-2, "weight_decay": 0.01, "optimizer": {"betas": [0.9, 0.999], "eps": 1e-8}}


def optim_cfg(**overrides):
    return OmegaConf.merge(OmegaConf.create(OPTIM), OmegaConf.create(overrides))


def single(d_in=12, d_out=10, r=4, seed=0, **cfg):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d_in, d_out))
    variant = build_variant({"name": "lora_fa", "targets": ["0"], "r": r, "alpha": 8, **cfg})
    variant.adapt(model, head=())
    return variant, model


def test_a_is_frozen_and_never_changes():
    variant, model = single()
    layer = model[0]
    assert not layer.lora_A.requires_grad and layer.lora_B.requires_grad
    A0 = layer.lora_A.detach().clone()
    optimizer = variant.build_optimizer(variant.param_groups(model, 1e-2), optim_cfg())
    for _ in range(3):
        model(torch.randn(7, 12)).square().sum().backward()
        assert layer.lora_A.grad is None
        optimizer.step()
        optimizer.zero_grad()
    assert torch.equal(layer.lora_A, A0)
    assert layer.lora_B.abs().sum() > 0


def test_projected_update_is_the_full_gradient_projected_on_a_row_space():
    """s·g_B·A = G·P_A with G = ∂L/∂W, P_A = Aᵀ(AAᵀ)⁻¹A: the best an update of B alone can do."""
    variant, model = single(d_in=20, d_out=9, r=3)
    layer = model[0].double()
    with torch.no_grad():
        layer.lora_B.normal_()
    x, target = torch.randn(16, 20, dtype=torch.float64), torch.randn(16, 9, dtype=torch.float64)
    nn.functional.mse_loss(layer(x), target).backward()
    # G from a plain linear with the merged weight (same function, dense gradient)
    W = (layer.weight + layer.delta_weight()).detach().requires_grad_(True)
    nn.functional.mse_loss(nn.functional.linear(x, W, layer.bias), target).backward()
    A, s = layer.lora_A.detach(), layer.scaling
    from lorafactory.variants.lora_fa import project_b_grad

    g_B = project_b_grad(layer.lora_B.grad, A, s, delta=0.0)
    P_A = A.t() @ torch.linalg.inv(A @ A.t()) @ A
    torch.testing.assert_close(s * g_B @ A, W.grad @ P_A, rtol=1e-9, atol=1e-12)
    # ... and it is the least-squares solution of min ‖s·D·A − G‖ over D
    D = torch.linalg.lstsq((s * A).t(), W.grad.t()).solution.t()
    torch.testing.assert_close(g_B, D, rtol=1e-8, atol=1e-10)


def test_optimizer_step_is_adamw_on_the_projected_gradient():
    variant, model = single()
    layer = model[0]
    with torch.no_grad():
        layer.lora_B.normal_()
    reference = copy.deepcopy(layer.lora_B).detach().requires_grad_(True)
    adamw = torch.optim.AdamW([reference], lr=1e-2, weight_decay=0.01)
    optimizer = variant.build_optimizer(variant.param_groups(model, 1e-2), optim_cfg())
    from lorafactory.variants.lora_fa import project_b_grad

    for step in range(3):
        model(torch.randn(5, 12, generator=torch.Generator().manual_seed(step))).square().sum().backward()
        reference.grad = project_b_grad(layer.lora_B.grad.clone(), layer.lora_A, layer.scaling, 1e-8)
        optimizer.step(), adamw.step()
        optimizer.zero_grad(), adamw.zero_grad()
        torch.testing.assert_close(layer.lora_B, reference, rtol=1e-6, atol=1e-7)


def test_a_learning_rate_schedule_reaches_every_layer_group():
    variant, model = single()
    optimizer = variant.build_optimizer(variant.param_groups(model, 1e-2), optim_cfg())
    scheduler = warmup_schedule(optimizer, total_steps=10, kind="linear")
    B0 = model[0].lora_B.detach().clone()
    optimizer.step()  # no gradients yet: a no-op that keeps the scheduler's order check quiet
    scheduler.step()  # lr factor 0.9
    assert all(g["lr"] == pytest.approx(9e-3) for g in optimizer.param_groups)
    for g in optimizer.param_groups:
        g["lr"] = 0.0
    model(torch.randn(5, 12)).square().sum().backward()
    optimizer.step()
    torch.testing.assert_close(model[0].lora_B, B0)  # lr 0 (and wd·lr = 0): nothing moves


def test_merged_path_saves_the_rank_r_projection_not_the_input():
    """The activation-memory saving: the merged function keeps x Aᵀ (r per token) for B's gradient, never x."""
    variant, model = single(d_in=64, d_out=48, r=4)
    layer = model[0]
    x = torch.randn(200, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        layer(x)
    assert (200, 64) not in saved and (200, 4) in saved


def no_dropout(*models):
    for model in models:
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0


def steps(variant, loaded, optimizer, scheduler, batches):
    model = loaded.module
    for batch in batches:
        model(**batch).loss.backward()
        variant.on_after_backward(model)
        variant.on_before_optimizer_step(model, optimizer)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def fresh(seed=0):
    loaded = tiny("tiny-bert")
    torch.manual_seed(seed)
    variant = build_variant({"name": "lora_fa", "targets": "all-linear", "r": 4})
    variant.adapt(loaded.module, head=loaded.head)
    unfreeze(loaded.module, loaded.head)
    no_dropout(loaded.module)  # the base model's dropout would draw different masks in the two runs
    optimizer = variant.build_optimizer(variant.param_groups(loaded.module, 1e-2), optim_cfg())
    return variant, loaded, optimizer, warmup_schedule(optimizer, 6, "linear", 0.2)


def test_resuming_from_a_checkpoint_continues_the_uninterrupted_run():
    variant, loaded, optimizer, scheduler = fresh()
    batches = [batch_for(loaded, batch_size=4, seed=i) for i in range(5)]
    steps(variant, loaded, optimizer, scheduler, batches[:2])
    checkpoint = copy.deepcopy(
        {"model": adapter_state_dict(loaded.module), "optim": optimizer.state_dict(), "sched": scheduler.state_dict()}
    )
    torch.manual_seed(1)  # the same random stream (attention dropout) after the checkpoint in both runs
    steps(variant, loaded, optimizer, scheduler, batches[2:])

    variant2, loaded2, optimizer2, scheduler2 = fresh(seed=123)
    load_adapter_state_dict(loaded2.module, checkpoint["model"])
    optimizer2.load_state_dict(checkpoint["optim"])
    scheduler2.load_state_dict(checkpoint["sched"])
    torch.manual_seed(1)
    steps(variant2, loaded2, optimizer2, scheduler2, batches[2:])
    for key, value in adapter_state_dict(loaded.module).items():
        torch.testing.assert_close(adapter_state_dict(loaded2.module)[key], value, rtol=1e-6, atol=1e-6, msg=key)


def test_lora_fa_matches_peft(monkeypatch):
    """Same weights, same batches: outputs, B's gradients and B after three optimizer steps agree with PEFT's
    `create_lorafa_optimizer` (its bf16 autocast off, eps → 0 in both, where HF's and torch's AdamW coincide)."""
    pytest.importorskip("peft")
    import peft.optimizers.lorafa as peft_lorafa

    monkeypatch.setattr(peft_lorafa, "is_bf16_available", lambda: False)
    loaded, variant, theirs, names = with_peft_twin(
        "tiny-bert", {"name": "lora_fa", "targets": "all-linear", "r": 4, "alpha": 8}
    )
    theirs = theirs.double()
    ours = loaded.module.double()  # Adam's first steps are sign-like: fp32 rounding would flip near-zero entries
    no_dropout(ours, theirs)
    inner = theirs.base_model.model
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, layer in ours.named_modules():
            if layer in adapter_layers(ours):
                layer.lora_B.copy_(0.05 * torch.randn(layer.lora_B.shape, generator=g))
                twin = inner.get_submodule(name)
                twin.lora_A["default"].weight.copy_(layer.lora_A)
                twin.lora_B["default"].weight.copy_(layer.lora_B)
        for name in loaded.head:
            for (_, p), (_, q) in zip(
                ours.get_submodule(name).named_parameters(),
                inner.get_submodule(name).modules_to_save["default"].named_parameters(),
                strict=True,
            ):
                q.copy_(p)
    optimizer = variant.build_optimizer(variant.param_groups(ours, 1e-3), optim_cfg(lr=1e-3, weight_decay=0.0))
    for group in optimizer.param_groups:
        group["eps"] = 1e-30
    theirs_optimizer = peft_lorafa.create_lorafa_optimizer(theirs, r=4, lora_alpha=8, lr=1e-3)
    theirs_optimizer.param_groups[0]["eps"] = 1e-30
    ours.train(), theirs.train()
    twins = [
        (layer, inner.get_submodule(name)) for name, layer in ours.named_modules() if layer in adapter_layers(ours)
    ]
    for step in range(3):
        batch = batch_for(loaded, batch_size=4, seq=12, seed=step)
        out, ref = ours(**batch), theirs(**batch)
        torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
        out.loss.backward(), ref.loss.backward()
        for mine, twin in twins:
            assert twin.lora_A["default"].weight.grad is None  # PEFT freezes A as well
            torch.testing.assert_close(mine.lora_B.grad, twin.lora_B["default"].weight.grad, atol=1e-12, rtol=1e-9)
        optimizer.step(), theirs_optimizer.step()
        optimizer.zero_grad(), theirs_optimizer.zero_grad()
        for mine, twin in twins:
            torch.testing.assert_close(
                mine.lora_B, twin.lora_B["default"].weight, atol=1e-9, rtol=1e-7, msg=f"step {step}"
            )
            torch.testing.assert_close(mine.lora_A, twin.lora_A["default"].weight)


def test_the_step_calls_the_closure_as_lightning_does():
    results = []
    for with_closure in (False, True):
        variant, model = single()
        optimizer = variant.build_optimizer(variant.param_groups(model, 1e-2), optim_cfg())
        x = torch.randn(5, 12, generator=torch.Generator().manual_seed(0))

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
