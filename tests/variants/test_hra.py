"""HRA's own properties (the compact WY form against the explicit chain of reflections, orthogonality, rank ≤ r,
the paired identity init, the regulariser) and parity with PEFT's HRA."""

from __future__ import annotations

import pytest
import torch
from conftest import batch_for
from peft_twin import with_peft_twin
from torch import nn

from lorafactory.errors import ConfigError
from lorafactory.variants import adapter_layers, build_variant
from lorafactory.variants.hra import HRALinear
from lorafactory.variants.oft import RotatedLayer


def perturbed_layer(d_in: int = 10, d_out: int = 7, r: int = 4) -> HRALinear:
    torch.manual_seed(0)
    layer = HRALinear(nn.Linear(d_in, d_out).double(), r)
    with torch.no_grad():
        layer.hra_u.normal_()
    return layer


def reflections(U: torch.Tensor) -> torch.Tensor:
    """H_1 H_2 ⋯ H_r multiplied out one reflection at a time."""
    H = torch.eye(U.shape[0], dtype=U.dtype)
    for u in U.t():
        u = u / u.norm()
        H = H @ (torch.eye(U.shape[0], dtype=U.dtype) - 2 * torch.outer(u, u))
    return H


def test_wy_form_is_the_ordered_product_of_reflections():
    layer = perturbed_layer()
    U = layer.hra_u.detach()
    torch.testing.assert_close(layer.householder(), reflections(U), atol=1e-12, rtol=0)
    assert not torch.allclose(reflections(U), reflections(U.flip(1)))  # the order matters, and is H_1 first
    x = torch.randn(3, 10, dtype=torch.float64)
    W = layer.weight.detach() @ reflections(U)
    torch.testing.assert_close(layer(x), x @ W.t() + layer.bias, atol=1e-12, rtol=0)


def test_householder_is_orthogonal_and_the_update_has_rank_at_most_r():
    layer = perturbed_layer(d_in=12, d_out=12, r=4)
    H = layer.householder()
    torch.testing.assert_close(H.t() @ H, torch.eye(12, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.linalg.matrix_rank(layer.delta_weight().detach()) == 4
    adapted = layer.weight + layer.delta_weight()
    torch.testing.assert_close(torch.linalg.svdvals(adapted), torch.linalg.svdvals(layer.weight), atol=1e-12, rtol=0)


def test_merge_multiplies_by_h_and_unmerge_by_its_transpose():
    layer = perturbed_layer()
    W0 = layer.base.weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(layer.base.weight, W0 @ reflections(layer.hra_u.detach()), atol=1e-12, rtol=0)
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, W0, atol=1e-12, rtol=0)


def test_init_repeats_each_vector_so_the_chain_is_the_identity():
    torch.manual_seed(0)
    layer = HRALinear(nn.Linear(9, 5), 6)
    U = layer.hra_u.detach()
    assert torch.equal(U[:, 0::2], U[:, 1::2]) and not torch.equal(U[:, 0], U[:, 2])
    torch.testing.assert_close(layer.householder(), torch.eye(9), atol=1e-6, rtol=0)


def test_odd_r_is_refused():
    with pytest.raises(ConfigError, match="variant.r must be even"):
        build_variant({"name": "hra", "r": 3})


def test_orthogonality_regulariser_is_the_papers_and_off_by_default():
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 4))
    assert build_variant({"name": "hra", "r": 4, "targets": ["0", "1"]}).aux_loss(model) is None
    variant = build_variant({"name": "hra", "r": 4, "orth_reg": 1e-2, "targets": ["0", "1"]})
    variant.adapt(model, head=())
    # At init each vector appears twice, so I − ÛᵀÛ holds −1 beside each diagonal pair: ‖·‖_F >= 2 per layer.
    expected = 0.0
    for layer in adapter_layers(model):
        U = layer.hra_u.detach() / layer.hra_u.detach().norm(dim=0)
        expected += torch.linalg.matrix_norm(torch.eye(4) - U.t() @ U).item()
    loss = variant.aux_loss(model)
    assert loss.item() == pytest.approx(1e-2 * expected, rel=1e-5) and expected >= 2 * 2  # ≥ ‖the paired 1s‖ per layer
    loss.backward()
    assert all(layer.hra_u.grad.abs().sum() > 0 for layer in adapter_layers(model))


def test_merged_weight_and_rotated_input_paths_agree(monkeypatch):
    results = []
    for path in ("merged", "rotated"):
        monkeypatch.setattr(RotatedLayer, "merge_pays", lambda self, x, path=path: path == "merged")
        layer = perturbed_layer()
        x = torch.randn(6, 10, dtype=torch.float64, requires_grad=True)
        out = layer(x)
        out.square().sum().backward()
        results.append((out.detach(), x.grad, layer.hra_u.grad))
    for merged, rotated in zip(*results, strict=True):
        torch.testing.assert_close(merged, rotated, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("path", ["merged", "rotated"])
def test_hra_matches_peft(path, monkeypatch):
    monkeypatch.setattr(RotatedLayer, "merge_pays", lambda self, x: path == "merged")
    loaded, variant, theirs, names = with_peft_twin("tiny-llama", {"name": "hra", "r": 4, "targets": "all-linear"})
    ours = loaded.module
    g = torch.Generator().manual_seed(0)
    pairs = [(ours.get_submodule(n), theirs.base_model.model.get_submodule(n)) for n in names]
    with torch.no_grad():
        for mine, twin in pairs:
            torch.testing.assert_close(
                twin.get_delta_weight("default"), torch.eye(mine.in_features), atol=1e-5, rtol=0
            )
            mine.hra_u.add_(0.2 * torch.randn(mine.hra_u.shape, generator=g))
            twin.hra_u["default"].copy_(mine.hra_u)
    batch = batch_for(loaded, batch_size=4, seq=12)
    out, ref = ours.train()(**batch), theirs.train()(**batch)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    ref.loss.backward()
    for mine, twin in pairs:
        torch.testing.assert_close(mine.hra_u.grad, twin.hra_u["default"].grad, atol=1e-5, rtol=1e-4)
