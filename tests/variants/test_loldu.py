"""LoLDU: the factors are the LDU decomposition of W0 with partial pivoting (a full-rank LoLDU rebuilds W0 from them
alone); only the r pivots train; zero pivots stay finite."""

from __future__ import annotations

import torch
from torch import nn

from lorafactory.variants import build_variant
from lorafactory.variants.base import count_trainable


def adapted(d_in=7, d_out=10, r=3, alpha=1.0, weight=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d_in, d_out)).double()
    if weight is not None:
        with torch.no_grad():
            model[0].weight.copy_(weight)
    W0 = model[0].weight.detach().clone()
    build_variant({"name": "loldu", "targets": ["0"], "r": r, "alpha": alpha}).adapt(model, head=())
    return model[0], W0


def test_full_rank_factors_rebuild_w0_and_have_the_ldu_shapes():
    layer, W0 = adapted(r=7, alpha=7.0)  # k = min(7, 10) = 7 and s = 1: ΔW at init is the whole P L D U
    torch.testing.assert_close(layer.delta_weight(), W0)
    assert layer.weight.abs().max() < 1e-12  # nothing left in the residual
    U = layer.basis_in
    torch.testing.assert_close(U.diagonal(), torch.ones(7, dtype=U.dtype))
    assert torch.all(U.tril(-1) == 0)
    P, L, _ = torch.linalg.lu(W0)
    torch.testing.assert_close(layer.basis_out, P @ L)  # the permutation folded into L's rows
    assert torch.all(L.diagonal() == 1) and torch.all(L.triu(1) == 0)
    assert (layer.basis_out.abs() <= 1 + 1e-12).all()  # partial pivoting bounds L


def test_truncated_factors_keep_the_model_and_train_r_numbers():
    layer, W0 = adapted(r=3, alpha=1.0)  # the official default scale s = 1/r
    _, _, Ufull = torch.linalg.lu(W0)
    torch.testing.assert_close(layer.core.detach(), Ufull.diagonal()[:3])
    torch.testing.assert_close(layer.weight + layer.delta_weight(), W0)
    torch.testing.assert_close(layer.delta_weight(), (layer.basis_out * layer.core) @ layer.basis_in / 3)
    assert torch.linalg.matrix_rank(layer.delta_weight()) == 3
    assert count_trainable(layer.adapter_parameters()) == 3


def test_a_zero_pivot_stays_finite():
    W = torch.randn(6, 5, dtype=torch.float64)
    W[:, 1] = 2 * W[:, 0]  # second column dependent: its pivot is 0 after elimination
    layer, W0 = adapted(d_in=5, d_out=6, r=3, weight=W)
    assert torch.isfinite(layer.basis_in).all() and torch.isfinite(layer.weight).all()
    torch.testing.assert_close(layer.weight + layer.delta_weight(), W0)
