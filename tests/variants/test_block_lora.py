"""Block-LoRA: n input blocks sharing one down-projection, computed as B A_s (Σ_j x_j); the block-matrix form it
stands for, its parameter count, odd widths, and a gradient that reaches the head through every block."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lorafactory.errors import ConfigError
from lorafactory.variants import build_variant
from lorafactory.variants.base import count_trainable


def adapted(d_in: int, d_out: int, seed: int = 0, **cfg) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d_in, d_out)).double()
    cfg = {"min_block": 1, **cfg}  # the block structure itself, on small widths
    build_variant({"name": "block_lora", "targets": ["0"], **cfg}).adapt(model, head=())
    return model


def trained_layer(d_in: int = 12, d_out: int = 7, r: int = 3, n: int = 4, alpha: float = 4.0):
    layer = adapted(d_in, d_out, r=r, n=n, alpha=alpha)[0]
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


def test_the_block_products_with_a_shared_head_equal_one_product_of_the_summed_blocks():
    """Σ_j A_s x_j over the n input blocks (n separate products) equals A_s Σ_j x_j, and the layer's ΔW is the LoRA
    product with A = [A_s … A_s]; s = alpha / r."""
    layer, s = trained_layer(), 4.0 / 3
    A_s, B = layer.lora_A.detach(), layer.lora_B.detach()
    assert A_s.shape == (3, 3) and B.shape == (7, 3)  # m = 12 / 4
    x = torch.randn(5, 2, 12, dtype=torch.float64)
    products = sum(x[..., 3 * j : 3 * (j + 1)] @ A_s.T for j in range(4)) @ B.T
    torch.testing.assert_close(layer(x), layer.base(x) + s * products, atol=1e-12, rtol=0)
    torch.testing.assert_close(layer.delta_weight(), s * B @ torch.cat([A_s] * 4, dim=1), atol=1e-12, rtol=0)
    assert torch.linalg.matrix_rank(layer.delta_weight()) == 3  # the rank stays r, unlike a rank-split reading


@pytest.mark.parametrize(("d_in", "n"), [(27, 8), (10, 3), (5, 8)])
def test_odd_widths_pad_the_last_block_with_zeros(d_in, n):
    layer = trained_layer(d_in=d_in, n=n)
    m = layer.block
    assert m == -(-d_in // min(n, d_in))
    x = torch.randn(4, d_in, dtype=torch.float64)
    padded = torch.nn.functional.pad(x, (0, layer.n * m - d_in))
    folded = sum(padded[:, j * m : (j + 1) * m] for j in range(layer.n))
    expected = layer.base(x) + layer.scaling * folded @ layer.lora_A.T @ layer.lora_B.T
    torch.testing.assert_close(layer(x), expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(layer(x), layer.base(x) + x @ layer.delta_weight().T, atol=1e-12, rtol=0)


@pytest.mark.parametrize(("d_in", "d_out", "r", "n"), [(12, 7, 3, 4), (27, 8, 4, 8), (32, 32, 8, 8), (4, 6, 2, 8)])
def test_parameter_count_shares_the_head_once(d_in, d_out, r, n):
    layer = adapted(d_in, d_out, r=r, n=n)[0]
    count = count_trainable(layer.adapter_parameters())
    m = -(-d_in // min(n, d_in))
    variant = build_variant({"name": "block_lora", "r": r, "n": n, "min_block": 1})
    assert count == r * (d_out + m) == variant.layer_params(d_in, d_out)
    if min(n, d_in) > 1:
        assert count < r * (d_in + d_out)  # fewer than the rank-r LoRA it partitions


def test_init_is_lora_init_of_the_equivalent_lora_and_the_base_output():
    layer = adapted(64, 16, r=8, n=8)[0]
    assert not layer.lora_B.any() and layer.lora_A.shape == (8, 8)
    bound = 1 / math.sqrt(64)  # LoRA's A init over the fan-in of [A_s … A_s], d_in
    assert 0.8 * bound < layer.lora_A.abs().max() <= bound
    x = torch.randn(3, 64, dtype=torch.float64)
    torch.testing.assert_close(layer(x), layer.base(x), atol=0, rtol=0)


@pytest.mark.parametrize("merged", [False, True])
def test_the_head_gradient_sums_over_the_blocks_on_both_paths(merged, monkeypatch):
    """∂L/∂A_s = Σ_j ∂L/∂A_j of the equivalent LoRA (A = [A_s … A_s]), on the two-product path and on the merged-GEMM
    path (forced), and ∂L/∂B matches too."""
    import lorafactory.variants.lora as lora_module

    monkeypatch.setattr(lora_module, "MERGE_THRESHOLD", 0.0 if merged else math.inf)
    layer = trained_layer()
    x = torch.randn(6, 12, dtype=torch.float64)
    layer(x).sin().sum().backward()
    A = torch.cat([layer.lora_A.detach()] * 4, dim=1).requires_grad_(True)
    B = layer.lora_B.detach().clone().requires_grad_(True)
    (layer.base(x) + layer.scaling * x @ A.T @ B.T).sin().sum().backward()
    torch.testing.assert_close(layer.lora_A.grad, A.grad.unflatten(1, (4, 3)).sum(dim=1), atol=1e-10, rtol=0)
    torch.testing.assert_close(layer.lora_B.grad, B.grad, atol=1e-10, rtol=0)


def test_n_must_be_positive():
    with pytest.raises(ConfigError, match="variant.n must be >= 1"):
        build_variant({"name": "block_lora", "n": 0})


@pytest.mark.parametrize(("d_in", "expected"), [(768, 8), (384, 8), (64, 4), (32, 2), (27, 1), (8, 1)])
def test_narrow_layers_get_fewer_blocks_than_eight(d_in, expected):
    """The default 8 blocks, fewer where a block would be narrower than 16 inputs; one block is LoRA itself."""
    layer = build_variant({"name": "block_lora", "targets": ["0"], "r": 2}).adapt(nn.Sequential(nn.Linear(d_in, 4)))[0]
    assert layer.n == expected and layer.block == -(-d_in // expected)


def test_one_block_is_lora():
    torch.manual_seed(0)
    base = nn.Linear(10, 6).double()
    block = build_variant({"name": "block_lora", "targets": ["0"], "n": 1, "r": 3}).adapt(nn.Sequential(base))[0]
    with torch.no_grad():
        block.lora_B.normal_()
    x = torch.randn(4, 10, dtype=torch.float64)
    torch.testing.assert_close(block(x), base(x) + block.scaling * x @ block.lora_A.T @ block.lora_B.T)
