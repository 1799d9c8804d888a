"""MoRA: the compress/decompress operators against hand-built matrices, r̂, and the rank the update reaches."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lorafactory.variants import build_variant


def mora_layer(d_in: int, d_out: int, r: int, kind: str = "auto", seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d_in, d_out)).double()
    build_variant({"name": "mora", "targets": ["0"], "r": r, "kind": kind}).adapt(model, head=())
    layer = model[0]
    with torch.no_grad():
        layer.mora_M.normal_()
    return layer


@pytest.mark.parametrize(
    ("d_in", "d_out", "r", "kind", "r_hat"),
    [(32, 32, 4, "rope", 16), (10, 10, 6, "sharing", 11), (10, 10, 6, "rope", 10), (27, 8, 4, "rope", 12)],
)
def test_mora_r_hat_is_the_square_root_of_lora_parameters(d_in, d_out, r, kind, r_hat):
    layer = mora_layer(d_in, d_out, r, kind)
    assert layer.r_hat == r_hat and layer.mora_M.shape == (r_hat, r_hat)
    variant = build_variant({"name": "mora", "r": r, "kind": kind})
    assert variant.layer_params(d_in, d_out) == r_hat**2


def test_mora_auto_picks_rope_for_small_ranks_and_sharing_for_large_ones():
    assert mora_layer(64, 64, 8).operator == "rope"
    assert mora_layer(64, 64, 128).operator == "sharing"


def test_mora_sharing_operator_is_wrap_padded_chunk_sum_then_tiling():
    """d_in = 10, r̂ = 4: x is padded to [x_0..x_9, x_0, x_1], its three chunks summed, M applied, the result tiled
    to d_out = 7; so ΔW[i, j] = Σ over the padded positions p of j of M[i mod 4, p mod 4]."""
    layer = mora_layer(10, 7, 1, "sharing")
    assert layer.r_hat == 4
    M = layer.mora_M.detach()
    x = torch.randn(5, 10, dtype=torch.float64)
    padded = torch.cat([x, x[:, :2]], 1)
    h = padded.view(5, 3, 4).sum(1) @ M.t()
    torch.testing.assert_close(layer.update(x), torch.cat([h, h], 1)[:, :7])
    expected = torch.zeros(7, 10, dtype=torch.float64)
    for i in range(7):
        for p in range(12):
            expected[i, p % 10] += M[i % 4, p % 4]
    torch.testing.assert_close(layer.delta_weight(), expected)


def rope_rotation(r_hat: int, position: int) -> torch.Tensor:
    """RoPE's rotation at `position` (pairs (j, j + r̂/2) turned by position · 10000^(−2j/r̂)), as a matrix."""
    R = torch.zeros(r_hat, r_hat, dtype=torch.float64)
    half = r_hat // 2
    for j in range(half):
        angle = position * 10000 ** (-2 * j / r_hat)
        c, s = math.cos(angle), math.sin(angle)
        R[j, j], R[j, j + half], R[j + half, j], R[j + half, j + half] = c, -s, s, c
    return R


def test_mora_rope_update_is_block_diagonal_m_times_rotations():
    """d_in = 8, r̂ = 4, two chunks: ΔW = blockdiag(M R_0, M R_1) (8 × 8), repeated down to d_out = 12."""
    layer = mora_layer(8, 12, 1, "rope")
    assert layer.r_hat == 4
    M = layer.mora_M.detach()
    block = torch.block_diag(M @ rope_rotation(4, 0), M @ rope_rotation(4, 1))
    expected = torch.cat([block, block])[:12]
    torch.testing.assert_close(layer.delta_weight(), expected)
    x = torch.randn(3, 8, dtype=torch.float64)
    torch.testing.assert_close(layer(x), layer.base(x) + x @ expected.t())


@pytest.mark.parametrize("kind", ["rope", "sharing"])
def test_mora_wraps_around_when_the_input_is_shorter_than_the_padding(kind):
    """d_in = 3 < r̂ = 10: the padding repeats x several times (the official slice would come up short); the forward
    and the merged ΔW still agree."""
    layer = mora_layer(3, 20, 4, kind)
    assert layer.r_hat == 10 and layer.chunks == 1
    x = torch.randn(4, 3, dtype=torch.float64)
    torch.testing.assert_close(layer(x), layer.base(x) + x @ layer.delta_weight().t())


@pytest.mark.parametrize(("kind", "rank"), [("rope", 32), ("sharing", 16)])
def test_mora_update_reaches_a_rank_far_above_r(kind, rank):
    """At r = 4 on a 32 × 32 weight (a rank-4 LoRA's 256 parameters): RoPE reaches full rank, sharing rank r̂ = 16."""
    layer = mora_layer(32, 32, 4, kind)
    assert layer.mora_M.numel() == 256
    assert torch.linalg.matrix_rank(layer.delta_weight()) == rank


def test_mora_gradient_of_m_matches_the_dense_update():
    """M's gradient through the operators equals the one through the dense ΔW = f(I)ᵀ."""
    layer = mora_layer(10, 6, 2, "rope")
    x = torch.randn(7, 10, dtype=torch.float64)
    g = torch.randn(7, 6, dtype=torch.float64)
    (layer.update(x) * g).sum().backward()
    direct = layer.mora_M.grad.clone()
    layer.mora_M.grad = None
    (x @ layer.delta_weight().t() * g).sum().backward()
    torch.testing.assert_close(direct, layer.mora_M.grad)
