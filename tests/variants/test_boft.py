"""BOFT's own properties (PEFT's butterfly permutations, a dense orthogonal R from enough factors, the output scale,
the fallback on widths the butterfly does not tile) and parity with PEFT's butterfly path."""

from __future__ import annotations

import pytest
import torch
from conftest import batch_for, tiny
from peft_twin import with_peft_twin
from torch import nn

from lorafactory.errors import ConfigError
from lorafactory.variants import build_variant
from lorafactory.variants.boft import BOFTLinear, fit_butterfly
from lorafactory.variants.oft import RotatedLayer

peft = pytest.importorskip("peft")


@pytest.mark.parametrize(("d", "b", "m"), [(16, 4, 3), (32, 8, 2), (48, 6, 3), (64, 2, 5), (24, 4, 2)])
def test_rotation_is_pefts_butterfly_product(d, b, m):
    """R = (M_{m−1} ⋯ M_0)ᵀ with M_i = P_i blockdiag(R_iᵀ) P_iᵀ, each P_i built by PEFT's own permutation code: the
    strided views that replace the permutations pair the same half-blocks."""
    from peft.tuners.boft.layer import BOFTLayer

    torch.manual_seed(0)
    layer = BOFTLinear(nn.Linear(d, 3).double(), b, m)
    assert (layer.block_size, layer.factors) == (b, m)
    with torch.no_grad():
        layer.skew.normal_()
    blocks = layer.rotation_blocks()
    product = torch.eye(d, dtype=torch.float64)
    for i in range(m):
        perm = BOFTLayer.block_butterfly_perm(None, d, d // b // 2**i, b // 2, m - 1)
        P = BOFTLayer.perm2mat(None, perm).double()
        product = P @ torch.block_diag(*blocks[i].transpose(-1, -2)) @ P.t() @ product
    torch.testing.assert_close(layer.rotation(), product.t(), atol=1e-12, rtol=0)


def perturbed_layer(d_in: int = 16, d_out: int = 6, block_size: int = 4, factors: int = 3) -> BOFTLinear:
    torch.manual_seed(0)
    layer = BOFTLinear(nn.Linear(d_in, d_out).double(), block_size, factors)
    with torch.no_grad():
        layer.skew.normal_(0, 0.5)
        layer.scale.uniform_(0.5, 1.5)
    return layer


def test_enough_factors_give_a_dense_orthogonal_rotation():
    """log2(d/b) + 1 factors connect every input to every other (R dense); one factor is block-diagonal. Both are
    orthogonal to round-off. A wrong permutation leaves R block-structured or breaks orthogonality."""
    eye = torch.eye(16, dtype=torch.float64)
    dense = perturbed_layer(factors=3).rotation()
    torch.testing.assert_close(dense.t() @ dense, eye, atol=1e-12, rtol=0)
    assert (dense.abs() > 1e-8).all()
    single = perturbed_layer(factors=1).rotation()
    torch.testing.assert_close(single.t() @ single, eye, atol=1e-12, rtol=0)
    outside_blocks = torch.block_diag(*[torch.ones(4, 4)] * 4) == 0
    assert (single[outside_blocks] == 0).all()
    two = perturbed_layer(factors=2).rotation()
    assert (two.abs() > 1e-8).sum() == 16 * 8  # each input reaches one group of 2 blocks


def test_adapted_weight_is_scaled_w0_times_r_and_merge_round_trips():
    layer = perturbed_layer()
    W0 = layer.base.weight.detach().clone()
    adapted = layer.scale.detach().unsqueeze(1) * (W0 @ layer.rotation())
    torch.testing.assert_close(layer.weight + layer.delta_weight(), adapted, atol=1e-12, rtol=0)
    x = torch.randn(5, 16, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ adapted.t() + layer.bias, atol=1e-12, rtol=0)
    layer.merge()
    torch.testing.assert_close(layer.base.weight, adapted, atol=1e-12, rtol=0)
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, W0, atol=1e-12, rtol=0)


def test_with_unit_scale_the_singular_values_are_kept():
    layer = perturbed_layer()
    with torch.no_grad():
        layer.scale.fill_(1.0)
    adapted = layer.weight + layer.delta_weight()
    torch.testing.assert_close(torch.linalg.svdvals(adapted), torch.linalg.svdvals(layer.weight), atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    ("d", "block", "factors", "expected"),
    [
        (32, 8, 2, (8, 2)),
        (27, 8, 2, (9, 1)),
        (16, 8, 3, (8, 2)),
        (24, 8, 2, (8, 1)),
        (48, 6, 3, (6, 3)),
        (8, 8, 2, (8, 1)),
    ],
)
def test_widths_the_butterfly_does_not_tile_fall_back(d, block, factors, expected):
    assert fit_butterfly(d, block, factors) == expected


def test_parameter_count_and_stem_fallback_on_tiny_cnn():
    loaded = tiny("tiny-cnn")
    with pytest.warns(UserWarning, match="d_in=27"):
        variant = build_variant({"name": "boft", "targets": "all-conv"})
        variant.adapt(loaded.module, head=loaded.head)
    stem = loaded.module.stem
    assert (stem.block_size, stem.factors, tuple(stem.skew.shape)) == (9, 1, (1, 3, 36))
    assert variant.layer_params(27, 8) == 3 * 36 + 8


def test_config_rejects_dropout():
    with pytest.raises(ConfigError, match="variant.dropout must be 0"):
        build_variant({"name": "boft", "dropout": 0.1})


class TorchBlockDiagKernel:
    """Stands in for PEFT's CUDA block-diagonal extension, which PEFT needs for more than one butterfly factor (on a
    CPU it silently drops to one): (N, D, b, b) blocks -> (N, D·b, D·b) and back."""

    @staticmethod
    def forward(blocks):
        return [torch.stack([torch.block_diag(*factor) for factor in blocks])]

    @staticmethod
    def backward(grad, blocks):
        n, d, b, _ = blocks.shape
        idx = torch.arange(d)
        return [grad.view(n, d, b, d, b)[:, idx, :, idx, :].transpose(0, 1).contiguous()]


def test_merged_weight_and_rotated_input_paths_agree(monkeypatch):
    results = []
    for path in ("merged", "rotated"):
        monkeypatch.setattr(RotatedLayer, "merge_pays", lambda self, x, path=path: path == "merged")
        layer = perturbed_layer()
        x = torch.randn(6, 16, dtype=torch.float64, requires_grad=True)
        out = layer(x)
        out.square().sum().backward()
        results.append((out.detach(), x.grad, layer.skew.grad, layer.scale.grad))
    for merged, rotated in zip(*results, strict=True):
        torch.testing.assert_close(merged, rotated, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("path", ["merged", "rotated"])
@pytest.mark.parametrize("factors", [1, 2])
def test_boft_matches_peft(factors, path, monkeypatch):
    """Same generators and scales: same logits, and gradients that map onto each other. PEFT stores a full matrix D
    per block with S = (D − Dᵀ)/2; ours is the upper triangle q of S, so D = 2·triu(q) and ∂q = 2·∂D_upper."""
    import peft.tuners.boft.layer as boft_layer

    monkeypatch.setattr(boft_layer, "_FBD_CUDA", TorchBlockDiagKernel)
    monkeypatch.setattr(RotatedLayer, "merge_pays", lambda self, x: path == "merged")
    loaded, variant, theirs, names = with_peft_twin(
        "tiny-bert", {"name": "boft", "block_size": 8, "butterfly_factors": factors, "targets": "all-linear"}
    )
    ours = loaded.module
    g = torch.Generator().manual_seed(0)
    rows, cols = torch.triu_indices(8, 8, 1)
    pairs = [(ours.get_submodule(n), theirs.base_model.model.get_submodule(n)) for n in names]
    with torch.no_grad():
        for mine, twin in pairs:
            assert mine.factors == factors and twin.boft_R["default"].shape[0] == factors
            mine.skew.copy_(0.2 * torch.randn(mine.skew.shape, generator=g))
            mine.scale.copy_(1 + 0.1 * torch.randn(mine.scale.shape, generator=g))
            full = torch.zeros_like(twin.boft_R["default"])
            full[..., rows, cols] = 2 * mine.skew
            twin.boft_R["default"].copy_(full)
            twin.boft_s["default"].copy_(mine.scale.unsqueeze(1))
    for model in (ours, theirs):
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
    batch = batch_for(loaded, batch_size=4, seq=12)
    out, ref = ours.train()(**batch), theirs.train()(**batch)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    ref.loss.backward()
    for mine, twin in pairs:
        their_skew_grad = 2 * twin.boft_R["default"].grad[..., rows, cols]
        torch.testing.assert_close(mine.skew.grad, their_skew_grad, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(mine.scale.grad, twin.boft_s["default"].grad.squeeze(1), atol=1e-5, rtol=1e-4)
