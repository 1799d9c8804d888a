"""SLTrain's own properties: the fixed random support (size, reproducibility from the seed, saved with the adapter,
never moving), the update s·BA + S against a hand computation on both compute paths, the sparse products' gradients,
and the fine-tuning init."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lorafactory.variants.lora as lora_module
from lorafactory.errors import ConfigError
from lorafactory.variants import adapter_layers, build_variant
from lorafactory.variants.sltrain import SLTrainLinear, SparseProduct, Support, draw_support, support_size


def perturbed_layer(d_in: int = 12, d_out: int = 9, r: int = 2, density: float = 0.2, seed: int = 0) -> SLTrainLinear:
    torch.manual_seed(seed)
    layer = SLTrainLinear(nn.Linear(d_in, d_out).double(), r, 1.5, draw_support(d_out, d_in, density, seed))
    with torch.no_grad():
        for p in (layer.lora_A, layer.lora_B, layer.sparse_values):
            p.normal_()
    return layer


def dense_sparse(layer: SLTrainLinear) -> torch.Tensor:
    S = torch.zeros(layer.out_features * layer.in_features, dtype=torch.float64)
    S[layer.sparse_index] = layer.sparse_values.detach()
    return S.view(layer.out_features, layer.in_features)


def test_support_has_the_papers_size_and_distinct_sorted_entries():
    flat = draw_support(30, 40, 0.03, seed=5)
    assert flat.numel() == support_size(30, 40, 0.03) == 36
    assert torch.equal(flat, flat.unique()) and flat.min() >= 0 and flat.max() < 1200  # sorted, distinct, in range
    assert support_size(8, 27, 0.001) == 1  # tiny-cnn's stem still gets one entry
    assert torch.equal(draw_support(30, 40, 0.03, seed=5), flat)
    assert not torch.equal(draw_support(30, 40, 0.03, seed=6), flat)


def test_layers_draw_distinct_supports_reproducibly_from_the_seed():
    def supports(seed: int) -> list[torch.Tensor]:
        model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 10))
        build_variant({"name": "sltrain", "targets": ["0", "1"], "density": 0.1, "seed": seed}).adapt(model, head=())
        return [layer.sparse_index.clone() for layer in adapter_layers(model)]

    first, again, other = supports(0), supports(0), supports(1)
    assert not torch.equal(first[0], first[1])  # each layer its own support
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_support_is_saved_so_a_model_with_another_seed_loads_it():
    def adapted(seed: int) -> nn.Module:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 12))
        build_variant({"name": "sltrain", "targets": ["0"], "density": 0.1, "seed": seed}).adapt(model, head=())
        return model

    model, other = adapted(0), adapted(7)
    with torch.no_grad():
        model[0].lora_B.normal_()
        model[0].sparse_values.normal_()
    assert not torch.equal(model[0].sparse_index, other[0].sparse_index)
    other.load_state_dict(model.state_dict())
    x = torch.randn(5, 16)
    torch.testing.assert_close(other(x), model(x), atol=0, rtol=0)


@pytest.mark.parametrize("threshold", [0.0, math.inf], ids=["merged", "two-branch"])
def test_forward_and_gradients_match_the_dense_formula(threshold, monkeypatch):
    monkeypatch.setattr(lora_module, "MERGE_THRESHOLD", threshold)
    layer = perturbed_layer()
    x = torch.randn(2, 6, 12, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 6, 9, dtype=torch.float64)
    (layer(x) * weights).sum().backward()

    A = layer.lora_A.detach().clone().requires_grad_()
    B = layer.lora_B.detach().clone().requires_grad_()
    values = layer.sparse_values.detach().clone().requires_grad_()
    S = torch.zeros(9 * 12, dtype=torch.float64).index_put((layer.sparse_index,), values).view(9, 12)
    x_ref = x.detach().clone().requires_grad_()
    out = x_ref @ (layer.weight.detach() + 1.5 * B @ A + S).t() + layer.bias
    torch.testing.assert_close(layer(x), out, atol=1e-12, rtol=0)
    (out * weights).sum().backward()
    pairs = [(x.grad, x_ref.grad), (layer.lora_A.grad, A.grad), (layer.lora_B.grad, B.grad)]
    for got, want in [*pairs, (layer.sparse_values.grad, values.grad)]:
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


def test_update_is_zero_off_the_support_and_the_values_on_it():
    layer = perturbed_layer()
    low_rank = 1.5 * layer.lora_B.detach() @ layer.lora_A.detach()
    sparse = (layer.delta_weight().detach() - low_rank).reshape(-1)
    on = torch.zeros_like(sparse, dtype=torch.bool)
    on[layer.sparse_index] = True
    assert sparse[~on].abs().max() < 1e-12  # round-off of the low-rank term only
    torch.testing.assert_close(sparse[layer.sparse_index], layer.sparse_values.detach(), atol=1e-12, rtol=0)
    torch.testing.assert_close(dense_sparse(layer), sparse.view(9, 12), atol=1e-12, rtol=0)


def test_training_moves_the_values_but_never_the_support():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    build_variant({"name": "sltrain", "targets": ["0"], "density": 0.25}).adapt(model, head=())
    layer = model[0]
    support = layer.sparse_index.clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = torch.randn(16, 8), torch.randn(16, 3)
    for _ in range(3):
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.equal(layer.sparse_index, support)
    assert layer.sparse_values.abs().min() > 0  # every value on the support trained
    sparse = layer.delta_weight().detach() - layer.scaling * layer.lora_B.detach() @ layer.lora_A.detach()
    assert torch.count_nonzero(sparse.abs() > 1e-7) == support.numel()


def test_init_is_kaiming_a_zero_b_and_zero_sparse_values():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 20))
    build_variant({"name": "sltrain", "targets": ["0"]}).adapt(model, head=())
    layer = model[0]
    assert not layer.lora_B.any() and not layer.sparse_values.any() and not layer.delta_weight().any()
    assert layer.sparse_values.numel() == 24 and layer.sparse_values.requires_grad  # ⌊0.03 · 800⌋
    assert layer.lora_A.abs().max() <= 1 / 40**0.5


def test_sparse_product_in_half_precision_runs_in_float32_on_cpu():
    torch.manual_seed(0)
    flat = draw_support(6, 10, 0.3, seed=0)
    values = torch.randn(flat.numel(), dtype=torch.bfloat16, requires_grad=True)
    x = torch.randn(4, 10, dtype=torch.bfloat16, requires_grad=True)
    out = SparseProduct.apply(x, values, Support(flat, 6, 10))
    assert out.dtype == torch.bfloat16
    S = torch.zeros(60).index_put((flat,), values.detach().float()).view(6, 10)
    torch.testing.assert_close(out.float(), x.detach().float() @ S.t(), atol=3e-2, rtol=2e-2)
    out.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and values.grad.dtype == torch.bfloat16
    expected = (torch.ones(4, 6).t() @ x.detach().float()).view(-1)[flat]
    torch.testing.assert_close(values.grad.float(), expected, atol=3e-2, rtol=2e-2)


def test_merged_path_keeps_no_dense_tensor_but_the_base_weight(monkeypatch):
    monkeypatch.setattr(lora_module, "MERGE_THRESHOLD", 0.0)
    layer = perturbed_layer()
    out = layer(torch.randn(3, 12, dtype=torch.float64))
    dense = [t for t in out.grad_fn.saved_tensors if t.shape == (9, 12)]
    assert len(dense) == 1 and dense[0].data_ptr() == layer.base.weight.data_ptr()


def test_density_must_be_a_fraction():
    with pytest.raises(ConfigError, match=r"variant.density must be in \(0, 1\)"):
        build_variant({"name": "sltrain", "density": 1.0})
