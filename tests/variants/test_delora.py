"""DeLoRA's own properties (the update against a hand computation, the bound ‖ΔW‖_F ≤ λ·max_j ‖W0[:, j]‖ and when it
is reached, the decoupling of direction and strength, the frozen column norms) and parity with PEFT's DeLoRA."""

from __future__ import annotations

import pytest
import torch
from conftest import batch_for
from peft_twin import with_peft_twin
from torch import nn

from lorafactory.errors import ConfigError
from lorafactory.variants import build_variant
from lorafactory.variants.delora import DeLoRALinear


def perturbed_layer(d_in: int = 9, d_out: int = 6, r: int = 3, lam: float = 2.5, seed: int = 0) -> DeLoRALinear:
    torch.manual_seed(seed)
    layer = DeLoRALinear(nn.Linear(d_in, d_out).double(), r, lam)
    with torch.no_grad():
        layer.delora_A.normal_()
        layer.delora_B.normal_()
    return layer


def test_update_is_the_normalised_product_scaled_by_lambda_and_column_norms():
    layer = perturbed_layer()
    A, B, W0 = layer.delora_A.detach(), layer.delora_B.detach(), layer.weight.detach()
    expected = torch.zeros(6, 9, dtype=torch.float64)
    for k in range(3):  # one unit-norm rank-one term per rank
        expected += torch.outer(B[:, k] / B[:, k].norm(), A[k] / A[k].norm())
    expected = 2.5 / 3 * expected * W0.norm(dim=0)
    torch.testing.assert_close(layer.delta_weight(), expected, atol=1e-12, rtol=0)
    x = torch.randn(4, 9, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ (W0 + expected).t() + layer.bias, atol=1e-12, rtol=0)


def test_update_norm_is_bounded_by_lambda_times_the_largest_column_norm():
    for seed in range(5):
        layer = perturbed_layer(r=4, lam=3.0, seed=seed)
        with torch.no_grad():
            layer.delora_B.mul_(100.0)  # factor sizes do not matter, only λ does
        bound = 3.0 * layer.weight.norm(dim=0).max()
        assert torch.linalg.matrix_norm(layer.delta_weight()) <= bound
        assert torch.linalg.matrix_norm(layer.delta_weight()) > 0.1 * bound  # not a vacuous bound


def test_bound_is_reached_by_a_rank_one_update_on_the_largest_column():
    torch.manual_seed(0)
    layer = DeLoRALinear(nn.Linear(7, 5).double(), r=1, delora_lambda=2.0)
    j = int(layer.weight.norm(dim=0).argmax())
    with torch.no_grad():
        layer.delora_A.zero_()
        layer.delora_A[0, j] = 0.3
        layer.delora_B.normal_()
    norm = torch.linalg.matrix_norm(layer.delta_weight())
    torch.testing.assert_close(norm, 2.0 * layer.weight.norm(dim=0).max(), atol=1e-12, rtol=0)


def test_direction_is_decoupled_from_strength():
    """Rescaling a row of A or a column of B leaves ΔW unchanged; λ scales it linearly."""
    layer = perturbed_layer()
    before = layer.delta_weight().detach().clone()
    with torch.no_grad():
        layer.delora_A[1].mul_(7.0)
        layer.delora_B[:, 2].mul_(0.01)
    torch.testing.assert_close(layer.delta_weight(), before, atol=1e-12, rtol=1e-10)
    with torch.no_grad():
        layer.delora_lambda.mul_(3.0)
    torch.testing.assert_close(layer.delta_weight(), 3.0 * before, atol=1e-12, rtol=1e-10)


def test_init_is_zero_b_with_the_column_norms_of_w0_frozen():
    torch.manual_seed(0)
    base = nn.Linear(8, 5)
    layer = DeLoRALinear(base, r=2, delora_lambda=15.0)
    assert not layer.delta_weight().any() and not layer.delora_B.any()
    assert layer.delora_lambda.item() == 15.0 and layer.delora_lambda.requires_grad
    torch.testing.assert_close(layer.w_norm, base.weight.detach().norm(dim=0))
    assert not layer.w_norm.requires_grad and "w_norm" in layer.state_dict()
    with torch.no_grad():
        layer.delora_B.normal_()
    delta = layer.delta_weight().detach().clone()
    layer.merge()  # the base weight changes; the norms that define ΔW must not
    torch.testing.assert_close(layer.delta_weight(), delta, atol=0, rtol=0)


def test_lambda_must_be_positive():
    with pytest.raises(ConfigError, match="variant.delora_lambda must be > 0"):
        build_variant({"name": "delora", "delora_lambda": 0})


def test_delora_matches_peft():
    loaded, variant, theirs, names = with_peft_twin(
        "tiny-llama", {"name": "delora", "r": 4, "delora_lambda": 5.0, "targets": "all-linear"}
    )
    ours = loaded.module
    g = torch.Generator().manual_seed(0)
    pairs = [(ours.get_submodule(n), theirs.base_model.model.get_submodule(n)) for n in names]
    with torch.no_grad():
        for mine, twin in pairs:
            torch.testing.assert_close(mine.w_norm, twin.delora_w_norm["default"])
            assert not twin.delora_B["default"].any()  # PEFT's init: B = 0, as ours
            mine.delora_A.copy_(torch.randn(mine.delora_A.shape, generator=g))
            mine.delora_B.copy_(torch.randn(mine.delora_B.shape, generator=g))
            mine.delora_lambda.fill_(1.0 + torch.rand(1, generator=g).item())
            for name in ("delora_A", "delora_B", "delora_lambda"):
                getattr(twin, name)["default"].copy_(getattr(mine, name))
    batch = batch_for(loaded, batch_size=4, seq=12)
    out, ref = ours.train()(**batch), theirs.train()(**batch)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    ref.loss.backward()
    for mine, twin in pairs:
        for name in ("delora_A", "delora_B", "delora_lambda"):
            torch.testing.assert_close(
                getattr(mine, name).grad, getattr(twin, name)["default"].grad, atol=1e-5, rtol=1e-4, msg=name
            )
