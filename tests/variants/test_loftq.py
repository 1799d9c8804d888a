"""LoftQ: the alternating quantize/SVD steps lower ‖W0 − Q − sBA‖ below QLoRA's ‖W0 − q(W0)‖, the model starts at
Q + s·B A whatever alpha is, the base is stored quantized, and the init is PEFT's `loftq_init` (run on CPU)."""

from __future__ import annotations

import pytest
import torch
from conftest import skip_where_bnb_misplaces_partial_rows

from lorafactory import quantize
from lorafactory.variants import build_variant
from lorafactory.variants.loftq import loftq_decompose


def low_rank_plus_noise(d_out=48, d_in=80, rank=6, seed=0):
    """A weight with a few strong directions, as pretrained weights have: what a rank-r correction can capture."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d_out, rank, generator=g) @ torch.randn(rank, d_in, generator=g) / 3 + 0.1 * torch.randn(
        d_out, d_in, generator=g
    )


def test_error_falls_with_the_iterations_and_beats_quantizing_alone():
    W = low_rank_plus_noise()
    _, _, _, errors = loftq_decompose(W, r=4, iters=5)
    naive = torch.linalg.norm(W - quantize.quantize_matrix(W, double_quant=False).dequantize()).item()
    assert errors[0] < naive  # one step already fits the rank-r part of QLoRA's error
    assert all(later <= earlier + 1e-6 for earlier, later in zip(errors, errors[1:], strict=False))
    assert errors[-1] < 0.9 * errors[0]  # the alternation itself helps, not only the first SVD


@pytest.mark.parametrize("alpha", [4.0, 32.0])
def test_the_layer_starts_at_q_plus_the_low_rank_fit_whatever_alpha_is(alpha):
    """PEFT's LoftQ assigns A = R, B = L and so is exact only at alpha = r; here s·B A = L R for any alpha."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(80, 48))
    with torch.no_grad():
        model[0].weight.copy_(low_rank_plus_noise())
    W0 = model[0].weight.detach().clone()
    build_variant({"name": "loftq", "r": 4, "alpha": alpha, "targets": ["0"], "iters": 3}).adapt(model, head=())
    layer = model[0]
    assert quantize.is_quantized(layer.base)
    assert quantize.storage_bytes(layer.base) < 0.2 * W0.numel() * 4
    effective = layer.weight + layer.delta_weight()
    error = torch.linalg.norm(W0 - effective).item()
    assert error == pytest.approx(layer.init_errors[-1], rel=1e-4)
    naive = torch.linalg.norm(W0 - quantize.quantize_matrix(W0, double_quant=False).dequantize()).item()
    assert error < naive
    x = torch.randn(5, 80)
    torch.testing.assert_close(model(x), x @ effective.t() + layer.bias, atol=1e-5, rtol=1e-5)


def test_loftq_init_matches_peft_loftq_init_run_on_cpu(monkeypatch):
    skip_where_bnb_misplaces_partial_rows()
    """PEFT's `loftq_init` moves the weight to "cuda" or "xpu"; pointing "xpu" at the CPU runs its own code here. Its
    LoftQ quantizes without double quantization and sets A = R, B = L, the base to Q: so do we (alpha = r)."""
    loftq_utils = pytest.importorskip("peft.utils.loftq_utils")
    original_to = torch.Tensor.to

    def on_cpu(device):
        return "cpu" if isinstance(device, str | torch.device) and str(device).startswith("xpu") else device

    def to(self, *args, **kwargs):
        return original_to(self, *(on_cpu(a) for a in args), **{k: on_cpu(v) for k, v in kwargs.items()})

    monkeypatch.setattr(loftq_utils, "is_xpu_available", lambda: True)
    monkeypatch.setattr(torch.Tensor, "to", to)
    W = low_rank_plus_noise()
    dequantized, lora_A, lora_B = loftq_utils.loftq_init(W.clone(), num_bits=4, reduced_rank=4, num_iter=3)
    monkeypatch.undo()

    model = torch.nn.Sequential(torch.nn.Linear(80, 48))
    with torch.no_grad():
        model[0].weight.copy_(W)
    build_variant({"name": "loftq", "r": 4, "alpha": 4.0, "targets": ["0"], "iters": 3}).adapt(model, head=())
    layer = model[0]
    torch.testing.assert_close(layer.weight, dequantized, atol=0, rtol=0)
    torch.testing.assert_close(layer.lora_B @ layer.lora_A, lora_B @ lora_A, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.lora_A, lora_A, atol=1e-5, rtol=1e-5)
