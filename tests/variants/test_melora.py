"""MELoRA: a block-diagonal update of rank n·r at a rank-r LoRA's parameter count, even and uneven blocks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lorafactory.errors import ConfigError
from lorafactory.variants import build_variant
from lorafactory.variants.base import count_trainable


def melora_layer(d_in: int, d_out: int, r: int, n: int, seed: int = 0, init: bool = False):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d_in, d_out)).double()
    build_variant({"name": "melora", "targets": ["0"], "r": r, "n": n, "alpha": 2 * r}).adapt(model, head=())
    layer = model[0]
    if not init:
        with torch.no_grad():
            layer.lora_B.normal_()
    return layer


def hand_delta(layer, in_sizes, out_sizes) -> torch.Tensor:
    """s · blockdiag(B_i A_i), the blocks cut from lora_A's columns and lora_B's rows by hand."""
    delta = torch.zeros(layer.out_features, layer.in_features, dtype=torch.float64)
    i0 = o0 = 0
    for di, do in zip(in_sizes, out_sizes, strict=True):
        block = layer.lora_B[o0 : o0 + do] @ layer.lora_A[:, i0 : i0 + di]
        delta[o0 : o0 + do, i0 : i0 + di] = layer.scaling * block
        i0, o0 = i0 + di, o0 + do
    return delta.detach()


def test_melora_reaches_rank_n_r_with_the_parameters_of_a_rank_r_lora():
    layer = melora_layer(16, 12, r=2, n=4)
    assert layer.even
    delta = layer.delta_weight()
    torch.testing.assert_close(delta, hand_delta(layer, [4] * 4, [3] * 4))
    assert torch.linalg.matrix_rank(delta) == 4 * 2
    assert count_trainable(layer.adapter_parameters()) == 2 * (16 + 12)  # a rank-2 LoRA's count
    off_diagonal = delta.clone()
    for i in range(4):
        off_diagonal[3 * i : 3 * i + 3, 4 * i : 4 * i + 4] = 0
    assert not off_diagonal.any()


@pytest.mark.parametrize(("d_in", "d_out", "n"), [(27, 8, 3), (10, 7, 3)])
def test_melora_uneven_blocks_put_the_remainder_first(d_in, d_out, n):
    """A 3×3 stem (8 × 27) and a 7 × 10 linear, which the official code cannot split: the first d mod n blocks are
    one wider; forward, ΔW and the hand-built block diagonal agree, rank n·r."""
    layer = melora_layer(d_in, d_out, r=2, n=n)
    assert not layer.even
    sizes = {10: [4, 3, 3], 27: [9, 9, 9], 7: [3, 2, 2], 8: [3, 3, 2]}
    expected = hand_delta(layer, sizes[d_in], sizes[d_out])
    torch.testing.assert_close(layer.delta_weight(), expected)
    x = torch.randn(5, d_in, dtype=torch.float64)
    torch.testing.assert_close(layer(x), layer.base(x) + x @ expected.t())
    assert torch.linalg.matrix_rank(expected) == n * 2
    assert count_trainable(layer.adapter_parameters()) == 2 * (d_in + d_out)


def test_melora_batched_and_per_block_paths_agree():
    """The batched GEMMs (n divides both sides) against the per-block products, outputs and gradients."""
    layer = melora_layer(12, 8, r=2, n=4)
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    results = []
    for even in (True, False):
        layer.even = even
        layer.zero_grad()
        out = layer(x)
        out.square().sum().backward()
        results.append((out.detach(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone()))
    for batched, per_block in zip(*results, strict=True):
        torch.testing.assert_close(batched, per_block)


def test_melora_init_is_kaiming_per_mini_lora_and_zero_b():
    """Each A_i is nn.Linear's default over its own fan-in d_in / n (bound 1/√(d_in/n)), not over d_in."""
    layer = melora_layer(64, 16, r=8, n=4, init=True)
    assert not layer.lora_B.any()
    bound = 1 / math.sqrt(64 / 4)
    for block in layer.lora_A.split(16, dim=1):
        assert 0.9 * bound < block.abs().max() <= bound


def test_melora_refuses_more_blocks_than_rows():
    with pytest.raises(ConfigError, match="variant.n=9"):
        melora_layer(27, 8, r=1, n=9)
