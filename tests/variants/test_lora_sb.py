"""LoRA-SB: the init is the rank-r SVD of the estimated first step −η·sign(ΣG); only the r × r core trains, and its
gradient is the full gradient seen through the frozen bases; the state resumes without data."""

from __future__ import annotations

import copy

import torch
from torch import nn

from lorafactory.variants import adapter_layers, adapter_state_dict, build_variant, load_adapter_state_dict
from lorafactory.variants.base import count_trainable


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 8)).double()


def batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(7, 12, generator=g, dtype=torch.float64)} for _ in range(n)]


def loss_fn(model, batch):
    return (model(batch["x"]) - 1).square().mean()


def adapted(model, **cfg):
    variant = build_variant({"name": "lora_sb", "targets": ["0", "2"], "r": 3, "alpha": 3, **cfg})
    variant.adapt(model, head=())
    return variant


def test_init_is_the_rank_r_svd_of_the_signed_first_step():
    reference = mlp()
    model = copy.deepcopy(reference)
    eta = 1e-3
    variant = adapted(model, init_batches=3, first_step_lr=eta)
    data = batches(4)
    variant.init_from_data(model, iter(data), loss_fn)

    for p in reference.parameters():
        p.requires_grad_(True)
    for batch in data[:3]:
        loss_fn(reference, batch).backward()
    for layer, linear in zip(adapter_layers(model), (reference[0], reference[2]), strict=True):
        step = -eta * linear.weight.grad.sign()
        U, S, Vh = torch.linalg.svd(step)
        best = U[:, :3] @ torch.diag(S[:3]) @ Vh[:3]
        torch.testing.assert_close(layer.delta_weight(), best, atol=1e-8, rtol=1e-5)
        eye = torch.eye(3, dtype=torch.float64)
        torch.testing.assert_close(layer.basis_out.t() @ layer.basis_out, eye, atol=2e-6, rtol=0)  # fp32 SVD
        torch.testing.assert_close(layer.basis_in @ layer.basis_in.t(), eye, atol=2e-6, rtol=0)
        torch.testing.assert_close(layer.base.weight, linear.weight.detach(), rtol=0, atol=0)  # not residualized


def test_the_model_starts_one_estimated_step_away_from_the_base():
    base = mlp()
    model = copy.deepcopy(base)
    variant = adapted(model, first_step_lr=1e-2)
    x = batches(1, seed=3)[0]["x"]
    torch.testing.assert_close(model(x), base(x))  # before the data init: R = 0
    data = batches(2)
    variant.init_from_data(model, iter(data), loss_fn)
    assert not torch.allclose(model(x), base(x))
    total = lambda m: sum(loss_fn(m, b) for b in data)  # noqa: E731
    assert total(model) < total(base)  # the estimated step goes downhill on the batches it came from


def test_only_the_r_by_r_core_trains_and_its_gradient_is_the_projected_full_gradient():
    model = mlp()
    variant = adapted(model, alpha=6)  # s = 2
    variant.init_from_data(model, iter(batches(2)), loss_fn)
    assert count_trainable(p for layer in adapter_layers(model) for p in layer.adapter_parameters()) == 2 * 9
    layer = model[0]
    x = batches(1, seed=4)[0]["x"]
    target = torch.randn(7, 10, dtype=torch.float64)
    nn.functional.mse_loss(layer(x), target).backward()
    W = (layer.weight + layer.delta_weight()).detach().requires_grad_(True)
    nn.functional.mse_loss(nn.functional.linear(x, W, layer.bias), target).backward()
    B, A, s = layer.basis_out, layer.basis_in, layer.scaling
    torch.testing.assert_close(layer.core.grad, s * B.t() @ W.grad @ A.t())


def test_initialised_state_loads_into_a_fresh_model_without_data():
    model = mlp()
    variant = adapted(model)
    variant.init_from_data(model, iter(batches(2)), loss_fn)
    with torch.no_grad():
        model[0].core.add_(0.1)
    x = batches(1, seed=5)[0]["x"]
    fresh = mlp()
    adapted(fresh)
    state = adapter_state_dict(model)
    assert {"0.basis_out", "0.basis_in", "0.core"} <= set(state) and "0.base.weight" not in state
    load_adapter_state_dict(fresh, state)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
