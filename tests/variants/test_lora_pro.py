"""LoRA-Pro: the equivalent gradient is the projection of the full gradient, the Sylvester X, full-size moments,
the first step from B = 0, resume from a checkpoint."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf
from resume_check import assert_resume_is_exact
from torch import nn

from lorafactory.variants import build_variant
from lorafactory.variants.lora_pro import LoRAProAdjustment

OPTIM = OmegaConf.create({"lr": 1e-2, "weight_decay": 0.01, "optimizer": {"betas": [0.9, 0.999], "eps": 1e-8}})


def factors(d_out=7, d_in=9, r=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, d_in, generator=g, dtype=torch.float64)
    B = torch.randn(d_out, r, generator=g, dtype=torch.float64)
    G = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    return A, B, G


def tangent_projection(G, A, B):
    """Least-squares projection of G onto {B Y + Z A}, from an explicit basis (independent of the closed form)."""
    (d_out, r), d_in = B.shape, A.shape[1]
    columns = []
    for i in range(r * d_in):
        Y = torch.zeros(r * d_in, dtype=G.dtype)
        Y[i] = 1
        columns.append((B @ Y.view(r, d_in)).flatten())
    for i in range(d_out * r):
        Z = torch.zeros(d_out * r, dtype=G.dtype)
        Z[i] = 1
        columns.append((Z.view(d_out, r) @ A).flatten())
    # The spanning set is rank-deficient (B Y and Z A overlap in r² directions), and LAPACK's least squares on a
    # rank-deficient system is not reproducible from call to call: project onto an orthonormal basis of its column
    # space from the SVD instead, with the numerical rank cut explicit.
    U, S, _ = torch.linalg.svd(torch.stack(columns, dim=1), full_matrices=False)
    U = U[:, S > S[0] * 1e-10]
    assert U.shape[1] == r * d_in + d_out * r - r * r  # the tangent space's dimension at full-rank A and B
    return (U @ (U.t() @ G.flatten())).view_as(G)


def test_equivalent_gradient_is_the_projection_of_the_full_gradient():
    A, B, G = factors()
    s = 2.0
    adjust = LoRAProAdjustment(A, B, s, delta=1e-12)
    grad_A, grad_B = s * B.t() @ G, s * G @ A.t()  # LoRA's gradients for the full gradient G
    equivalent = adjust.equivalent(*adjust.closed_form(grad_A, grad_B))
    P_B, P_A = B @ torch.linalg.pinv(B), torch.linalg.pinv(A) @ A
    torch.testing.assert_close(equivalent, P_B @ G + G @ P_A - P_B @ G @ P_A, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(equivalent, tangent_projection(G, A, B), rtol=1e-8, atol=1e-10)
    # X moves g_A and g_B but not the equivalent gradient
    torch.testing.assert_close(adjust.equivalent(*adjust.adjusted(grad_A, grad_B)), equivalent, rtol=1e-8, atol=1e-10)


def test_sylvester_x_solves_its_equation_and_keeps_the_gradients_closest_to_loras():
    A, B, G = factors(seed=1)
    s, delta = 2.0, 1e-12
    adjust = LoRAProAdjustment(A, B, s, delta=delta)
    grad_A, grad_B = s * B.t() @ G, s * G @ A.t()
    X = adjust.sylvester_x(grad_A)
    eye = torch.eye(3, dtype=torch.float64)
    rhs = -torch.linalg.inv(B.t() @ B + delta * eye) @ grad_A @ A.t() / s**2
    torch.testing.assert_close((B.t() @ B + delta * eye) @ X + X @ (A @ A.t() + delta * eye), rhs)

    g_A0, g_B0 = adjust.closed_form(grad_A, grad_B)

    def distance(X):
        return (g_A0 + X @ A - grad_A).square().sum() + (g_B0 - B @ X - grad_B).square().sum()

    best = distance(X)
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        assert distance(X + 1e-3 * torch.randn(X.shape, generator=g, dtype=X.dtype)) > best


def test_mapping_an_adam_direction_back_keeps_its_projection():
    """The second adjustment: from D (the full-size Adam direction) to (g_A, g_B) whose step moves W by the
    projection of D onto the tangent space."""
    A, B, D = factors(seed=3)
    s = 0.5
    adjust = LoRAProAdjustment(A, B, s, delta=1e-12)
    g_A, g_B = adjust.adjusted(s * B.t() @ D, s * D @ A.t())
    torch.testing.assert_close(adjust.equivalent(g_A, g_B), tangent_projection(D, A, B), rtol=1e-8, atol=1e-10)


def single(d_in=12, d_out=10, r=4, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d_in, d_out)).double()
    variant = build_variant({"name": "lora_pro", "targets": ["0"], "r": r, "alpha": 8})
    variant.adapt(model, head=())
    return variant, model


def dense_gradient(layer, x, target):
    W = (layer.weight + layer.delta_weight()).detach().requires_grad_(True)
    nn.functional.mse_loss(nn.functional.linear(x, W, layer.bias), target).backward()
    return W.grad


def test_first_step_from_b_zero_is_the_official_first_step_rule():
    """At B = 0: g̃ = G P_A, Adam's first direction D = g̃ / (|g̃| + eps), then B ← −lr·(1/s) D Aᵀ(AAᵀ)⁻¹, A unchanged."""
    variant, model = single()
    layer = model[0]
    x, target = torch.randn(16, 12, dtype=torch.float64), torch.randn(16, 10, dtype=torch.float64)
    G = dense_gradient(layer, x, target)
    A, s, lr, eps = layer.lora_A.detach().clone(), layer.scaling, 1e-2, 1e-8
    optimizer = variant.build_optimizer(variant.param_groups(model, lr), OPTIM)
    nn.functional.mse_loss(model(x), target).backward()
    optimizer.step()
    equivalent = G @ A.t() @ torch.linalg.inv(A @ A.t()) @ A
    D = equivalent / (equivalent.abs() + eps)
    torch.testing.assert_close(layer.lora_A, A * (1 - lr * 0.01))  # weight decay only
    torch.testing.assert_close(layer.lora_B, -lr / s * D @ A.t() @ torch.linalg.inv(A @ A.t()), rtol=1e-6, atol=1e-9)
    state = optimizer.state[layer.lora_B]
    assert state["exp_avg"].shape == (10, 12)  # full-size moments, as the paper keeps them
    torch.testing.assert_close(state["exp_avg"], 0.1 * equivalent, rtol=1e-4, atol=1e-12)


def test_a_step_moves_the_weight_along_the_projected_adam_direction():
    """Away from B = 0, ΔW = −lr·proj(D) + O(lr²) with D the Adam direction of the projected gradients."""
    variant, model = single()
    layer = model[0]
    with torch.no_grad():
        layer.lora_B.normal_()
    lr = 1e-7  # the O(lr²) cross term is then far below tolerance
    optimizer = variant.build_optimizer(variant.param_groups(model, lr), OmegaConf.merge(OPTIM, {"weight_decay": 0}))
    x, target = torch.randn(16, 12, dtype=torch.float64), torch.randn(16, 10, dtype=torch.float64)
    G = dense_gradient(layer, x, target)
    A, B, before = layer.lora_A.detach().clone(), layer.lora_B.detach().clone(), layer.delta_weight().detach()
    nn.functional.mse_loss(model(x), target).backward()
    optimizer.step()
    equivalent = tangent_projection(G, A, B)
    D = equivalent / (equivalent.abs() + 1e-8)
    torch.testing.assert_close(
        (layer.delta_weight() - before) / lr, -tangent_projection(D, A, B), rtol=1e-5, atol=1e-6
    )


def test_the_step_calls_the_closure_as_lightning_does():
    results = []
    for with_closure in (False, True):
        variant, model = single()
        with torch.no_grad():
            model[0].lora_B.normal_()
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
        results.append(model[0].delta_weight().detach())
    torch.testing.assert_close(results[0], results[1])


def test_resuming_from_a_checkpoint_continues_the_uninterrupted_run():
    assert_resume_is_exact("lora_pro", OPTIM, "linear", before=2, after=3)
