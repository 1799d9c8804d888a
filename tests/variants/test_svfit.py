"""SVFit: only the top-r singular values train; the update stays diagonal in the frozen singular bases; the residual
is the rest of the spectrum."""

from __future__ import annotations

import torch
from torch import nn

from lorafactory.variants import build_variant
from lorafactory.variants.base import count_trainable


def adapted(d_in=12, d_out=9, r=3):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d_in, d_out)).double()
    W0 = model[0].weight.detach().clone()
    build_variant({"name": "svfit", "targets": ["0"], "r": r}).adapt(model, head=())
    return model, W0


def test_init_splits_w0_into_its_top_r_part_and_the_rest():
    model, W0 = adapted()
    layer = model[0]
    U, S, Vh = torch.linalg.svd(W0, full_matrices=False)
    torch.testing.assert_close(layer.core.detach(), S[:3])
    torch.testing.assert_close(layer.delta_weight(), U[:, :3] @ torch.diag(S[:3]) @ Vh[:3])
    torch.testing.assert_close(torch.linalg.svdvals(layer.weight)[:6], S[3:])  # W_e holds the tail exactly
    torch.testing.assert_close(layer.weight + layer.delta_weight(), W0)
    assert count_trainable(layer.adapter_parameters()) == 3


def test_training_only_rescales_the_frozen_singular_directions():
    model, W0 = adapted()
    layer = model[0]
    U, S, Vh = torch.linalg.svd(W0, full_matrices=False)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for step in range(3):
        x = torch.randn(16, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
        model(x).sin().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    sigma = layer.core.detach()
    assert not torch.allclose(sigma, S[:3])
    inner = U[:, :3].t() @ layer.delta_weight() @ Vh[:3].t()  # ΔW in the singular bases: diag(σ), nothing else
    torch.testing.assert_close(inner, torch.diag(sigma))
    torch.testing.assert_close(layer.delta_weight(), U[:, :3] @ inner @ Vh[:3])
