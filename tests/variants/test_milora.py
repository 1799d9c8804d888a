"""MiLoRA: the adapter holds exactly the minor (bottom-r) singular part of W0 and the residual keeps the principal
part; on odd-sized convolution views too."""

from __future__ import annotations

import torch
from torch import nn

from lorafactory.variants import build_variant


def adapted(module, r=3, alpha=6.0):
    torch.manual_seed(0)
    model = nn.Sequential(module).double()
    W0 = model[0].weight.detach().reshape(model[0].weight.shape[0], -1).clone()
    build_variant({"name": "milora", "targets": ["0"], "r": r, "alpha": alpha}).adapt(model, head=())
    return model[0], W0


def test_adapter_is_the_minor_svd_part_and_the_residual_the_principal_part():
    layer, W0 = adapted(nn.Linear(12, 9))  # s = 2
    U, S, Vh = torch.linalg.svd(W0, full_matrices=False)
    minor = U[:, -3:] @ torch.diag(S[-3:]) @ Vh[-3:]
    torch.testing.assert_close(layer.delta_weight(), minor)
    torch.testing.assert_close(layer.weight + layer.delta_weight(), W0)
    torch.testing.assert_close(torch.linalg.svdvals(layer.weight)[:6], S[:6])  # principal spectrum kept exactly
    assert torch.linalg.svdvals(layer.weight)[6:].max() < 1e-12
    # the factors split √(S/s) evenly, as PiSSA's do
    torch.testing.assert_close(layer.lora_A.norm(dim=1) ** 2, S[-3:] / 2)


def test_minor_components_of_an_odd_sized_convolution_view():
    """tiny-cnn's stem shape: a 3×3 convolution from 3 to 8 channels is an 8 × 27 matrix."""
    layer, W0 = adapted(nn.Conv2d(3, 8, 3), r=4, alpha=4.0)
    U, S, Vh = torch.linalg.svd(W0, full_matrices=False)
    torch.testing.assert_close(layer.delta_weight(), U[:, 4:] @ torch.diag(S[4:]) @ Vh[4:])
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(layer(x), nn.functional.conv2d(x, W0.view(8, 3, 3, 3), layer.bias))
