"""LQ-LoRA: the decomposition error never rises and ends below quantizing alone, Q lies on the NF4 grid, Fisher
weighting lowers the weighted error, and `init_from_data` computes the Fisher weights without touching `.grad`."""

from __future__ import annotations

import pytest
import torch
from conftest import batch_for, tiny
from test_qlora import NF4_CODE, dequantized_absmax

from lorafactory import quantize
from lorafactory.variants import adapter_layers, build_variant
from lorafactory.variants.lq_lora import lq_decompose


def low_rank_plus_noise(d_out=48, d_in=80, rank=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d_out, rank, generator=g) @ torch.randn(rank, d_in, generator=g) / 3 + 0.1 * torch.randn(
        d_out, d_in, generator=g
    )


def test_the_error_never_rises_and_ends_below_quantizing_alone():
    torch.manual_seed(0)
    W = low_rank_plus_noise()
    q, L, R, errors = lq_decompose(W, r=4, max_iters=50)
    assert all(later <= earlier for earlier, later in zip(errors, errors[1:], strict=False))
    assert len(errors) < 50  # it stopped by itself
    final = torch.linalg.norm(W - q.dequantize() - L @ R).item()
    assert final == pytest.approx(errors[-1], rel=1e-5)  # what is returned is the best step kept
    naive = torch.linalg.norm(W - quantize.quantize_matrix(W).dequantize()).item()
    assert final < 0.8 * naive


def test_the_base_lies_on_the_nf4_grid_and_the_model_starts_at_q_plus_l_r():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(80, 48))
    with torch.no_grad():
        model[0].weight.copy_(low_rank_plus_noise())
    W0 = model[0].weight.detach().clone()
    build_variant({"name": "lq_lora", "r": 4, "alpha": 16.0, "targets": ["0"]}).adapt(model, head=())
    layer = model[0]
    assert quantize.is_quantized(layer.base)
    Q = layer.weight.detach()
    ratios = Q.reshape(-1, 64) / dequantized_absmax(layer.base).unsqueeze(1)
    assert ((ratios.unsqueeze(-1) - NF4_CODE).abs().amin(dim=-1) < 1e-5).all()
    error = torch.linalg.norm(W0 - Q - layer.delta_weight()).item()
    assert error == pytest.approx(layer.init_errors[-1], rel=1e-4)  # s·B A = L R: the scale is folded in
    assert error < torch.linalg.norm(W0 - quantize.quantize_matrix(W0).dequantize()).item()


def test_fisher_weighting_lowers_the_weighted_error():
    torch.manual_seed(0)
    W = low_rank_plus_noise()
    g = torch.Generator().manual_seed(1)
    fisher = torch.rand(48, 1, generator=g).pow(4) * torch.rand(1, 80, generator=g).pow(4) * 100  # uneven rows, cols
    weighted = lq_decompose(W, r=4, max_iters=30, fisher=fisher)
    plain = lq_decompose(W, r=4, max_iters=30)

    def weighted_error(result):
        q, L, R, _ = result
        return torch.linalg.norm(fisher.sqrt() * (W - q.dequantize() - L @ R)).item()

    assert weighted_error(weighted) < weighted_error(plain)


def test_init_from_data_reweights_every_target_and_leaves_no_gradient_behind():
    loaded = tiny("tiny-bert")
    torch.manual_seed(0)
    v = build_variant({"name": "lq_lora", "r": 4, "targets": "attn", "fisher_batches": 2})
    v.adapt(loaded.module, head=loaded.head)
    layers = adapter_layers(loaded.module)
    before = {id(layer): layer.lora_A.detach().clone() for layer in layers}
    assert all(layer.full_weight is not None for layer in layers)
    batch = batch_for(loaded, batch_size=4)
    v.init_from_data(loaded.module, iter([batch] * 10), lambda m, b: m(**b).loss)
    for layer in layers:
        assert layer.full_weight is None  # the full-precision copy is released
        assert not torch.equal(layer.lora_A, before[id(layer)])
        assert quantize.is_quantized(layer.base)
    assert all(p.grad is None for p in loaded.module.parameters())
