"""HiRA's own properties (the Hadamard update against a hand computation, its gradients, its rank above r, the exact
unmerge, nothing dense kept between the passes) and parity with PEFT's HiRA."""

from __future__ import annotations

import pytest
import torch
from conftest import batch_for
from peft_twin import with_peft_twin
from torch import nn

from lorafactory.variants.hira import HiRALinear


def perturbed_layer(d_in: int = 10, d_out: int = 7, r: int = 3, dropout: float = 0.0, seed: int = 0) -> HiRALinear:
    torch.manual_seed(seed)
    layer = HiRALinear(nn.Linear(d_in, d_out).double(), r, dropout)
    with torch.no_grad():
        layer.hira_A.normal_()
        layer.hira_B.normal_()
    return layer


def test_forward_is_the_hadamard_modulated_weight():
    layer = perturbed_layer()
    W0, A, B = layer.weight.detach(), layer.hira_A.detach(), layer.hira_B.detach()
    x = torch.randn(2, 4, 10, dtype=torch.float64)
    expected = x @ (W0 + W0 * (B @ A)).t() + layer.bias
    torch.testing.assert_close(layer(x), expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(layer.delta_weight(), W0 * (B @ A), atol=1e-12, rtol=0)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_custom_backward_matches_autograd_of_the_formula(dropout):
    """The one-GEMM function (no dropout) and the two-GEMM form (dropout, here in eval mode so it is the identity)
    both give autograd's gradients of x (W0 ⊙ (1 + BA))ᵀ + b."""
    layer = perturbed_layer(dropout=dropout).eval()
    x = torch.randn(5, 10, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(5, 7, dtype=torch.float64)
    (layer(x) * weights).sum().backward()
    ours = (x.grad, layer.hira_A.grad, layer.hira_B.grad)

    A = layer.hira_A.detach().clone().requires_grad_()
    B = layer.hira_B.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    W0 = layer.weight.detach()
    ((x_ref @ (W0 * (1 + B @ A)).t() + layer.bias) * weights).sum().backward()
    for got, want in zip(ours, (x_ref.grad, A.grad, B.grad), strict=True):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


def test_update_rank_exceeds_r_where_lora_cannot():
    layer = perturbed_layer(d_in=12, d_out=12, r=2)
    assert torch.linalg.matrix_rank(layer.delta_weight().detach()) > 2
    lora_rank = torch.linalg.matrix_rank(layer.hira_B.detach() @ layer.hira_A.detach())
    assert lora_rank == 2


def test_init_is_kaiming_a_and_zero_b():
    torch.manual_seed(0)
    layer = HiRALinear(nn.Linear(50, 7), r=4)
    assert torch.equal(layer.hira_B, torch.zeros(7, 4))
    bound = 1 / 50**0.5
    assert layer.hira_A.abs().max() <= bound and layer.hira_A.abs().max() > 0.8 * bound
    assert not layer.delta_weight().any()


def test_unmerge_restores_w0_exactly_even_where_one_plus_ba_is_zero():
    """Merging writes W0 ⊙ (1 + BA); with BA = −1 everywhere the merged weight is 0 and W0 cannot be recovered by
    division: unmerge must restore the kept W0, bit for bit."""
    torch.manual_seed(0)
    layer = HiRALinear(nn.Linear(6, 4), r=1)
    W0 = layer.weight.detach().clone()
    with torch.no_grad():
        layer.hira_A.fill_(1.0)
        layer.hira_B.fill_(-1.0)
    delta = layer.delta_weight().detach()
    layer.merge()
    assert not layer.base.weight.any()
    torch.testing.assert_close(layer.delta_weight(), delta, atol=0, rtol=0)  # still W0 ⊙ BA while merged
    layer.unmerge()
    assert torch.equal(layer.base.weight, W0) and layer.unmerged_weight is None


def test_no_dense_tensor_is_kept_between_forward_and_backward():
    """Only x, W0 (the base weight itself) and the factors are saved: the modulated d_out × d_in weight is recomputed
    in backward, not kept alive for it."""
    layer = perturbed_layer(d_in=10, d_out=7)
    out = layer(torch.randn(3, 10, dtype=torch.float64))
    saved = out.grad_fn.saved_tensors
    dense = [t for t in saved if t.shape == (7, 10)]
    assert len(dense) == 1 and dense[0].data_ptr() == layer.base.weight.data_ptr()


def test_hira_matches_peft():
    loaded, variant, theirs, names = with_peft_twin("tiny-llama", {"name": "hira", "r": 4, "targets": "all-linear"})
    ours = loaded.module
    g = torch.Generator().manual_seed(0)
    pairs = [(ours.get_submodule(n), theirs.base_model.model.get_submodule(n)) for n in names]
    with torch.no_grad():
        for mine, twin in pairs:
            assert not twin.hira_B["default"].any()  # PEFT starts at B = 0 too
            mine.hira_A.copy_(torch.randn(mine.hira_A.shape, generator=g))
            mine.hira_B.copy_(torch.randn(mine.hira_B.shape, generator=g))
            twin.hira_A["default"].copy_(mine.hira_A)
            twin.hira_B["default"].copy_(mine.hira_B)
    batch = batch_for(loaded, batch_size=4, seq=12)
    out, ref = ours.train()(**batch), theirs.train()(**batch)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    ref.loss.backward()
    for mine, twin in pairs:
        torch.testing.assert_close(mine.hira_A.grad, twin.hira_A["default"].grad, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(mine.hira_B.grad, twin.hira_B["default"].grad, atol=1e-5, rtol=1e-4)
