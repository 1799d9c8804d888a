"""OFT's own properties (exact Cayley blocks, the side the rotation acts on, PEFT's block-size rule on odd widths) and
parity with PEFT's OFT in its exact-Cayley setting."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import batch_for, tiny
from peft_twin import with_peft_twin
from torch import nn

from lorafactory.errors import ConfigError
from lorafactory.variants import adapter_layers, build_variant
from lorafactory.variants.oft import OFTLinear, RotatedLayer, cayley, fit_block_size

peft = pytest.importorskip("peft")


def skew_symmetric(q: torch.Tensor, b: int) -> torch.Tensor:
    rows, cols = torch.triu_indices(b, b, 1)
    upper = torch.zeros(*q.shape[:-1], b, b, dtype=q.dtype)
    upper[..., rows, cols] = q
    return upper - upper.transpose(-1, -2)


def test_cayley_blocks_are_the_orthogonal_cayley_transform():
    """R = (I + S)(I − S)⁻¹ from an explicit inverse, RᵀR = I to round-off, and det R = +1 (a rotation)."""
    torch.manual_seed(0)
    q = torch.randn(3, 10, dtype=torch.float64)
    R = cayley(q, 5)
    S, eye = skew_symmetric(q, 5), torch.eye(5, dtype=torch.float64)
    torch.testing.assert_close(R, (eye + S) @ torch.linalg.inv(eye - S), atol=1e-12, rtol=0)
    torch.testing.assert_close(R.transpose(-1, -2) @ R, eye.expand(3, 5, 5), atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(3, dtype=torch.float64))


def perturbed_layer(d_in: int = 12, d_out: int = 7, block_size: int = 4) -> tuple[nn.Linear, OFTLinear]:
    torch.manual_seed(0)
    linear = nn.Linear(d_in, d_out).double()
    layer = OFTLinear(copy.deepcopy(linear), block_size)
    with torch.no_grad():
        layer.skew.normal_(0, 0.5)
    return linear, layer


def test_adapted_weight_is_w0_times_the_block_diagonal_rotation():
    """W' = W0 R (not R on the output side, not Rᵀ), and the layer computes W' x + b."""
    linear, layer = perturbed_layer()
    R = torch.block_diag(*layer.rotation_blocks())
    W = linear.weight.detach()
    torch.testing.assert_close(layer.weight + layer.delta_weight(), W @ R, atol=1e-12, rtol=0)
    x = torch.randn(4, 12, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ (W @ R).t() + linear.bias, atol=1e-12, rtol=0)


def test_rotation_keeps_the_singular_values_and_merge_is_multiplicative():
    linear, layer = perturbed_layer()
    W0 = linear.weight.detach().clone()
    adapted = layer.weight + layer.delta_weight()
    torch.testing.assert_close(torch.linalg.svdvals(adapted), torch.linalg.svdvals(W0), atol=1e-12, rtol=0)
    layer.merge()
    torch.testing.assert_close(layer.base.weight, adapted.detach(), atol=1e-12, rtol=0)
    torch.testing.assert_close(layer.original_weight(), W0, atol=1e-12, rtol=0)
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, W0, atol=1e-12, rtol=0)


@pytest.mark.parametrize(("d", "block"), [(27, 32), (100, 32), (30, 4), (64, 32), (8, 32), (36, 5), (7, 3)])
def test_block_size_follows_peft_rule_on_widths_it_does_not_divide(d, block):
    from peft.tuners.oft.layer import OFTLayer

    expected = block if d % block == 0 else OFTLayer.adjust_oft_parameters(None, d, block)
    assert fit_block_size(d, block) == expected
    assert d % fit_block_size(d, block) == 0


def test_the_tiny_cnn_stem_gets_one_27_wide_block():
    loaded = tiny("tiny-cnn")
    with pytest.warns(UserWarning, match="block_size=32 does not divide d_in=27"):
        build_variant({"name": "oft", "targets": "all-conv"}).adapt(loaded.module, head=loaded.head)
    stem = loaded.module.stem
    assert (stem.in_features, stem.block_size, tuple(stem.skew.shape)) == (27, 27, (1, 27 * 26 // 2))


def test_config_rejects_dropout_and_tiny_blocks():
    with pytest.raises(ConfigError, match="variant.dropout must be 0"):
        build_variant({"name": "oft", "dropout": 0.1})
    with pytest.raises(ConfigError, match="variant.block_size must be >= 2"):
        build_variant({"name": "oft", "block_size": 1})


def no_dropout(*models: nn.Module) -> None:
    for model in models:
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0


def force_path(monkeypatch, path: str) -> None:
    """Make every rotated layer multiply by the merged weight (`merged`) or rotate its input (`rotated`)."""
    monkeypatch.setattr(RotatedLayer, "merge_pays", lambda self, x: path == "merged")


def test_merged_weight_and_rotated_input_paths_agree(monkeypatch):
    results = []
    for path in ("merged", "rotated"):
        force_path(monkeypatch, path)
        linear, layer = perturbed_layer()
        x = torch.randn(6, 12, dtype=torch.float64, requires_grad=True)
        out = layer(x)
        out.square().sum().backward()
        results.append((out.detach(), x.grad, layer.skew.grad))
    for merged, rotated in zip(*results, strict=True):
        torch.testing.assert_close(merged, rotated, atol=1e-12, rtol=1e-10)


def test_small_layers_with_many_tokens_merge_and_wide_ones_rotate():
    small, wide = OFTLinear(nn.Linear(32, 32), 32), OFTLinear(nn.Linear(384, 384), 32)
    assert small.merge_pays(torch.zeros(2048, 32)) and not small.merge_pays(torch.zeros(8, 32))
    assert not wide.merge_pays(torch.zeros(2048, 384))


@pytest.mark.parametrize("path", ["merged", "rotated"])
@pytest.mark.parametrize("model", ["tiny-bert", "tiny-llama"])
def test_oft_matches_peft_exact_cayley(model, path, monkeypatch):
    """Same generators in both (blocks of 16: two per 32-wide input, four per 64-wide): same logits and the same
    gradient for every generator, on both of our paths. PEFT's default Neumann series is approximate, so its exact
    Cayley is the twin."""
    force_path(monkeypatch, path)
    loaded, variant, theirs, names = with_peft_twin(model, {"name": "oft", "block_size": 16, "targets": "all-linear"})
    ours = loaded.module
    g = torch.Generator().manual_seed(0)
    pairs = [(ours.get_submodule(n), theirs.base_model.model.get_submodule(n)) for n in names]
    with torch.no_grad():
        for mine, twin in pairs:
            mine.skew.copy_(0.2 * torch.randn(mine.skew.shape, generator=g))
            twin.oft_R["default"].weight.copy_(mine.skew)
    assert len(pairs) == len(adapter_layers(ours))
    no_dropout(ours, theirs)
    batch = batch_for(loaded, batch_size=4, seq=12)
    out, ref = ours.train()(**batch), theirs.train()(**batch)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    ref.loss.backward()
    for mine, twin in pairs:
        torch.testing.assert_close(mine.skew.grad, twin.oft_R["default"].weight.grad, atol=1e-5, rtol=1e-4)
