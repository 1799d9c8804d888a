"""TLoRA (Tao et al.): the tensor-ring matrix transform and tensor-ring residual against explicit contractions, the
identity/zero init, W' = W0 T + s·Δ on both evaluation orders, the factorisation of any width (odd, prime), and the
paper's parameter count."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

import lorafactory.variants.tlora as tlora
from lorafactory.errors import ConfigError
from lorafactory.variants import build_variant
from lorafactory.variants.base import count_trainable
from lorafactory.variants.tlora import TLoRALinear, ring_chain, tensor_shape, trm_matrix


def digits(index: int, factors: tuple[int, ...]) -> tuple[int, ...]:
    """Row-major multi-index of `index` over `factors` (the first factor most significant)."""
    out = []
    for f in reversed(factors):
        out.append(index % f)
        index //= f
    return tuple(reversed(out))


def tlora_layer(d_in=12, d_out=10, r=2, transform_rank=2, order=3, alpha=3.0, init=False, seed=0) -> TLoRALinear:
    torch.manual_seed(seed)
    layer = TLoRALinear(nn.Linear(d_in, d_out).double(), r, transform_rank, order, alpha / math.sqrt(r))
    if not init:
        with torch.no_grad():
            for p in layer.adapter_parameters():
                p.normal_(0, 0.5)
    return layer


def test_trm_matrix_is_the_trace_of_the_core_products():
    """T[(i…), (j…)] = tr(A_1[i_1, j_1] A_2[i_2, j_2] A_3[i_3, j_3]), entry by entry, rectangular cores too."""
    torch.manual_seed(0)
    rows, cols, R = (2, 3, 2), (3, 1, 2), 3
    cores = [torch.randn(i, j, R, R, dtype=torch.float64) for i, j in zip(rows, cols, strict=True)]
    T = trm_matrix(cores)
    assert T.shape == (12, 6)
    for p, q in itertools.product(range(12), range(6)):
        i, j = digits(p, rows), digits(q, cols)
        expected = torch.linalg.multi_dot([cores[k][i[k], j[k]] for k in range(3)]).trace()
        torch.testing.assert_close(T[p, q], expected, atol=1e-12, rtol=0)


def test_trm_of_ring_rank_one_is_a_kronecker_product():
    torch.manual_seed(0)
    mats = [torch.randn(n, n, dtype=torch.float64) for n in (2, 3, 2)]
    T = trm_matrix([m[:, :, None, None] for m in mats])
    torch.testing.assert_close(T, torch.kron(torch.kron(mats[0], mats[1]), mats[2]), atol=1e-12, rtol=0)


def test_residual_is_the_tensor_ring_of_out_then_in_cores_and_has_rank_at_most_r_squared():
    """Δ[(j…), (i…)] = tr(G_1[j_1] ⋯ G_D[j_D] H_1[i_1] ⋯ H_D[i_D]) on a 6 × 8 layer (2·3 and 2·4 with order 2)."""
    layer = tlora_layer(d_in=8, d_out=6, r=2, order=2)
    assert layer.out_factors == (2, 3) and layer.in_factors == (2, 4)
    delta = layer.residual().detach()
    G, H = [c.detach() for c in layer.residual_out], [c.detach() for c in layer.residual_in]
    for j, i in itertools.product(range(6), range(8)):
        (j1, j2), (i1, i2) = digits(j, (2, 3)), digits(i, (2, 4))
        expected = torch.linalg.multi_dot([G[0][j1], G[1][j2], H[0][i1], H[1][i2]]).trace()
        torch.testing.assert_close(delta[j, i], expected, atol=1e-12, rtol=0)
    assert torch.linalg.matrix_rank(delta) <= 4
    chain = ring_chain(G)
    torch.testing.assert_close(chain[5], G[0][1] @ G[1][2], atol=1e-12, rtol=0)


@pytest.mark.parametrize(("d_in", "d_out"), [(12, 10), (27, 8), (13, 7)])
def test_init_is_the_identity_transform_and_a_zero_residual(d_in, d_out):
    """Proposition 1: cores I/R_T make T = I exactly (also the leading block of a padded TRM, 13 → 16); the first out
    core is zero so Δ = 0, the others are the official code's Gaussians; the layer is the base layer."""
    layer = tlora_layer(d_in, d_out, r=3, transform_rank=3, init=True)
    torch.testing.assert_close(layer.transform(), torch.eye(d_in, dtype=torch.float64), atol=1e-15, rtol=0)
    assert not layer.residual().any()
    assert not layer.residual_out[0].any() and all(c.any() for c in [*layer.residual_out[1:], *layer.residual_in])
    x = torch.randn(4, d_in, dtype=torch.float64)
    torch.testing.assert_close(layer(x), layer.base(x), atol=1e-14, rtol=0)


def test_core_init_scales_follow_the_official_code():
    """In cores std 1/√I_k, out cores (but the first) std √J_k / R² (TTMLoRALinearLayer's 'ttv' residual)."""
    torch.manual_seed(0)
    layer = TLoRALinear(nn.Linear(4096, 4096), r=8, transform_rank=1, order=3, scaling=1.0)
    assert layer.in_factors == (16, 16, 16)
    for core in layer.residual_in:
        assert abs(core.std().item() - 1 / 4) < 0.01
    for core in layer.residual_out[1:]:
        assert abs(core.std().item() - 4 / 64) < 0.003


@pytest.mark.parametrize("merged_path", [True, False])
def test_layer_computes_w0_t_plus_scaled_residual_on_both_evaluation_orders(merged_path, monkeypatch):
    """y = (W0 T + s·Δ) x + b with T on the input side and s = alpha/√r, whether the layer transforms the input or
    forms the merged weight; gradients of every core agree between the two orders."""
    results = []
    for path in (merged_path, not merged_path):
        layer = tlora_layer(d_in=12, d_out=10, r=2, alpha=3.0)
        monkeypatch.setattr(TLoRALinear, "merge_pays", lambda self, x, p=path: p)
        W0, b = layer.base.weight.detach(), layer.base.bias.detach()
        T, delta = layer.transform().detach(), layer.residual().detach()
        x = torch.randn(2, 5, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        out = layer(x)
        torch.testing.assert_close(out, x @ (W0 @ T + 3.0 / math.sqrt(2) * delta).t() + b, atol=1e-12, rtol=0)
        out.square().sum().backward()
        results.append([p.grad.clone() for p in layer.adapter_parameters()])
    for g0, g1 in zip(*results, strict=True):
        torch.testing.assert_close(g0, g1, atol=1e-10, rtol=1e-9)


def test_the_cheaper_order_is_chosen_by_tokens_against_width():
    layer = tlora_layer(d_in=768, d_out=768, init=True)
    assert layer.merge_pays(torch.empty(2048, 768))  # many tokens: one GEMM with W0 T
    assert not layer.merge_pays(torch.empty(16, 768))  # few tokens: transform the input


def test_merge_writes_w0_t_plus_residual_and_unmerge_restores_w0_bit_for_bit():
    layer = tlora_layer(d_in=27, d_out=8)
    W0 = layer.base.weight.detach().clone()
    adapted = (W0 @ layer.transform() + layer.scaling * layer.residual()).detach()
    x = torch.randn(3, 27, dtype=torch.float64)
    expected = layer(x)
    layer.merge()
    torch.testing.assert_close(layer.base.weight, adapted, atol=1e-12, rtol=0)
    torch.testing.assert_close(layer(x), expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(layer.original_weight(), W0, atol=0, rtol=0)
    layer.unmerge()
    assert torch.equal(layer.base.weight, W0)


@pytest.mark.parametrize("d", [*range(1, 70), 320, 640, 768, 1280, 2048, 4099, 11008])
def test_every_width_gets_balanced_factors(d):
    """Any width (odd, prime) factors into `order` factors, padded only when its own factors are unbalanced."""
    for order in (2, 3):
        width, factors = tensor_shape(d, order)
        assert width >= d and math.prod(factors) == width and len(factors) == order
        assert max(factors) <= 2 * width ** (1 / order) + 1e-9
        if width > d:  # padded: d itself had no balanced factorisation
            own = min(tlora._factorisations(d, order), key=lambda fs: sum(f * f for f in fs))
            assert max(own) > 2 * d ** (1 / order)


def test_factors_match_the_official_tensor_shapes():
    """The official code's table (utils.py TENSOR_SHAPE_DICT), except 320: [5, 8, 8] has fewer TRM parameters than
    its [4, 8, 10]; primes pad (13 → 16), tiny-cnn's stem keeps 27 = 3·3·3."""
    official = {640: (8, 8, 10), 768: (8, 8, 12), 1280: (8, 10, 16), 2048: (8, 16, 16)}
    for d, factors in official.items():
        assert tensor_shape(d, 3) == (d, factors)
    assert tensor_shape(320, 3) == (320, (5, 8, 8))
    assert tensor_shape(13, 3) == (16, (2, 2, 4))
    assert tensor_shape(27, 3) == (27, (3, 3, 3))


def test_parameter_count_matches_the_formula_and_the_papers_sd15_budget(monkeypatch):
    """Formula = counted parameters (a padded layer included); with the code's tensor shapes, TLoRA(2, 6) on SD-1.5's
    attention layers (5 blocks at 320 and 640, 6 at 1280; q, k, v, out self-attention plus q, out cross-attention at
    the block width and k, v from 768) has the paper's 0.40M parameters."""
    v = build_variant({"name": "tlora"})
    assert (v.cfg.r, v.cfg.transform_rank, v.cfg.order, v.cfg.alpha) == (6, 2, 3, 1.0)
    for d_in, d_out in [(12, 10), (27, 8), (13, 7), (32, 64)]:
        layer = TLoRALinear(nn.Linear(d_in, d_out), 6, 2, 3, 1.0)
        assert count_trainable(layer.adapter_parameters()) == v.layer_params(d_in, d_out)
    official = {320: (4, 8, 10), 640: (8, 8, 10), 768: (8, 8, 12), 1280: (8, 10, 16)}
    monkeypatch.setattr(tlora, "tensor_shape", lambda d, order: (d, official[d]))
    total = sum(
        n * (6 * v.layer_params(h, h) + 2 * v.layer_params(768, h)) for h, n in [(320, 5), (640, 5), (1280, 6)]
    )
    assert total == 400_288  # 0.40M in the paper's controllable-generation table


def test_config_is_validated():
    with pytest.raises(ConfigError, match="variant.order must be >= 2"):
        build_variant({"name": "tlora", "order": 1})
    with pytest.raises(ConfigError, match="variant.transform_rank must be >= 1"):
        build_variant({"name": "tlora", "transform_rank": 0})
    with pytest.raises(ConfigError, match="variant.dropout must be 0"):
        build_variant({"name": "tlora", "dropout": 0.1})
