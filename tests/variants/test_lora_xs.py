"""LoRA-XS: frozen SVD factors of W0, an r × r trainable core, the update confined to W0's top singular subspaces."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorafactory.errors import ConfigError
from lorafactory.variants import build_variant
from lorafactory.variants.base import count_trainable


def xs_layer(d_in: int = 12, d_out: int = 10, r: int = 4, seed: int = 0, **cfg):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d_in, d_out)).double()
    build_variant({"name": "lora_xs", "targets": ["0"], "r": r, **cfg}).adapt(model, head=())
    return model[0]


def test_lora_xs_factors_are_the_truncated_svd_of_w0_and_only_the_core_trains():
    layer = xs_layer()
    W = layer.base.weight.detach()
    U, S, Vh = torch.linalg.svd(W)
    B, A = layer.lora_B, layer.lora_A
    torch.testing.assert_close(B.t() @ B, torch.eye(4, dtype=torch.float64))  # orthonormal columns
    torch.testing.assert_close(B @ A, U[:, :4] @ torch.diag(S[:4]) @ Vh[:4])  # the best rank-4 approximation
    torch.testing.assert_close(A @ A.t(), torch.diag(S[:4] ** 2))  # A = Σ_r V_rᵀ
    assert not B.requires_grad and not A.requires_grad
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_R"]
    assert count_trainable(layer.adapter_parameters()) == 16
    assert {"lora_A", "lora_B", "lora_R"} <= set(layer.state_dict())  # the frozen factors are saved


def test_lora_xs_update_lives_in_the_top_singular_subspaces():
    layer = xs_layer()
    with torch.no_grad():
        layer.lora_R.normal_()
    delta = layer.delta_weight()
    U, _, Vh = torch.linalg.svd(layer.base.weight.detach())
    P_left, P_right = U[:, :4] @ U[:, :4].t(), Vh[:4].t() @ Vh[:4]
    torch.testing.assert_close(P_left @ delta, delta)
    torch.testing.assert_close(delta @ P_right, delta)
    expected = layer.scaling * layer.lora_B @ layer.lora_R @ layer.lora_A
    torch.testing.assert_close(delta, expected.detach())
    assert torch.linalg.matrix_rank(delta) == 4
    x = torch.randn(6, 12, dtype=torch.float64)
    torch.testing.assert_close(layer(x), layer.base(x) + x @ expected.detach().t())


def test_lora_xs_core_gradient_is_the_projected_weight_gradient():
    """∂L/∂R = s · Bᵀ G Aᵀ with G = gᵀ x the full weight gradient."""
    layer = xs_layer()
    x = torch.randn(9, 12, dtype=torch.float64)
    g = torch.randn(9, 10, dtype=torch.float64)
    (layer(x) * g).sum().backward()
    G = g.t() @ x
    torch.testing.assert_close(layer.lora_R.grad, layer.scaling * layer.lora_B.t() @ G @ layer.lora_A.t())


def test_lora_xs_core_starts_as_a_tiny_gaussian_and_zero_std_starts_at_the_base():
    layer = xs_layer(d_in=40, d_out=40, r=16)
    std = layer.lora_R.detach().std().item()
    assert 0.5e-5 < std < 2e-5
    exact = xs_layer(init_std=0.0)
    x = torch.randn(3, 12, dtype=torch.float64)
    assert torch.equal(exact(x), exact.base(x))


def test_lora_xs_randomized_svd_finds_the_same_subspace():
    """On a weight with a decaying spectrum (as pretrained ones have), the randomized SVD's rank-r factors match."""
    torch.manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(24, 24, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(30, 24, dtype=torch.float64))
    weight = U @ torch.diag(0.5 ** torch.arange(24.0, dtype=torch.float64)) @ V.t()
    products = []
    for niter in (0, 4):
        model = nn.Sequential(nn.Linear(30, 24)).double()
        with torch.no_grad():
            model[0].weight.copy_(weight)
        build_variant({"name": "lora_xs", "targets": ["0"], "r": 4, "niter": niter}).adapt(model, head=())
        products.append(model[0].lora_B @ model[0].lora_A)
    torch.testing.assert_close(products[1], products[0], atol=1e-9, rtol=1e-6)


def test_lora_xs_refuses_a_rank_above_the_weight_rank():
    with pytest.raises(ConfigError, match="variant.r=11"):
        xs_layer(d_in=12, d_out=10, r=11)
