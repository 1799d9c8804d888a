"""QWHA: the Hadamard matrices and transform, ΔW against a hand computation, the spectrum budget, and the data-aware
init (which reduces the calibration outputs' error, and with every position kept reproduces E exactly)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import batch_for, tiny
from scipy.linalg import hadamard as sylvester

from lorafactory import quantize
from lorafactory.variants import adapter_layers, build_variant, merge_adapters
from lorafactory.variants.qwha import (
    FACTORS,
    allocate,
    hadamard_matrix,
    hadamard_transform,
    paley,
    split_size,
    transform_size,
)


@pytest.mark.parametrize("K", sorted(FACTORS))
def test_every_paley_factor_is_a_hadamard_matrix(K):
    H = paley(K)
    assert set(H.unique().tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(H @ H.t(), K * torch.eye(K))


@pytest.mark.parametrize("n", [8, 12, 40, 48, 384])
def test_the_transform_is_sylvester_kron_paley_and_inverts_with_its_transpose(n):
    m, K = split_size(n)
    H = torch.kron(torch.tensor(sylvester(m), dtype=torch.float32), paley(K))
    torch.testing.assert_close(hadamard_matrix(n), H)
    x = torch.randn(3, 5, n, dtype=torch.float64)
    torch.testing.assert_close(hadamard_transform(x, n), x @ H.double().t())
    # IWHT(WHT(X)) = X: Hᵀ H = N I
    torch.testing.assert_close(hadamard_transform(hadamard_transform(x, n), n, transpose=True) / n, x)


def test_sizes_pad_to_the_smallest_buildable_transform():
    assert transform_size(384) == 384 and split_size(384) == (32, 12)  # MiniLM: 2^5 · 12, as QuaRot's table
    assert transform_size(1536) == 1536
    assert transform_size(27) == 28  # tiny-cnn's 3×3 stem, 3 channels
    assert transform_size(11008) == 11264  # Llama-2's 64 · 172 needs a Hadamard(172) we do not build: 256 · 44


def test_allocate_shares_the_budget_by_weight_under_the_cap():
    counts = allocate(torch.tensor([10.0, 1.0, 1.0, 0.0]), n=12, cap=5)
    assert counts.sum() == 12 and counts.max() <= 5
    assert counts[0] == 5 and counts[3] >= 1  # the heavy channel is capped, the rest spread over the others
    assert allocate(torch.tensor([3.0, 1.0]), n=8, cap=6).tolist() == [6, 2]


def qwha_layer(d_out=24, d_in=27, r=2, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(d_in, d_out))
    W0 = model[0].weight.detach().clone()
    build_variant({"name": "qwha", "r": r, "targets": ["0"]}).adapt(model, head=())
    return model, W0


def test_delta_weight_is_the_scaled_inverse_transform_of_the_sparse_spectrum():
    model, _ = qwha_layer()
    layer = model[0]
    with torch.no_grad():
        layer.spectrum.normal_()
    N = layer.n_transform
    S = torch.zeros(layer.out_features, N)
    S[layer.rows, layer.cols] = layer.spectrum.detach()
    expected = 150.0 / math.sqrt(layer.out_features) * (S @ hadamard_matrix(N) / N)[:, : layer.in_features]
    torch.testing.assert_close(layer.delta_weight(), expected, atol=1e-5, rtol=1e-5)
    assert layer.spectrum.numel() == layer.n == 2 * (27 + 24)
    x = torch.randn(4, 27)
    torch.testing.assert_close(model(x), x @ (layer.weight + expected).t() + layer.bias, atol=1e-5, rtol=1e-5)


def test_with_every_position_kept_the_init_reproduces_the_quantization_error_exactly():
    model, W0 = qwha_layer(d_out=6, d_in=12, r=100)  # r·(d_in + d_out) > d_in·d_out: n = 72, every position
    layer = model[0]
    E = W0 - layer.weight.detach()
    layer.fit(None)
    torch.testing.assert_close(layer.delta_weight(), E, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(layer.weight + layer.delta_weight(), W0, atol=1e-5, rtol=1e-4)


def test_the_init_reduces_the_error_on_the_calibration_outputs_and_merges_into_a_dequantized_base():
    loaded = tiny("tiny-llama")
    torch.manual_seed(0)
    v = build_variant({"name": "qwha", "r": 4, "targets": "all-linear", "calib_batches": 2})
    v.adapt(loaded.module, head=loaded.head)
    unweighted = copy.deepcopy(loaded.module)  # the same budget fitted without the calibration statistics (G = I)
    for layer in adapter_layers(unweighted):
        layer.fit(None)
    layers = adapter_layers(loaded.module)
    errors = {id(layer): layer.quant_error.clone() for layer in layers}
    inputs = {}

    def keep(layer, args):
        inputs[id(layer)] = args[0].detach().reshape(-1, layer.in_features)

    hooks = [layer.register_forward_pre_hook(keep) for layer in layers]
    batch = batch_for(loaded, batch_size=6)
    with torch.no_grad():
        loaded.module(**batch)
    for hook in hooks:
        hook.remove()
    v.init_from_data(loaded.module, iter([batch] * 10), lambda m, b: m(**b).loss)
    total, total_unweighted = 0.0, 0.0
    for layer, plain in zip(layers, adapter_layers(unweighted), strict=True):
        X, E = inputs[id(layer)], errors[id(layer)]
        residual = torch.linalg.norm((E - layer.delta_weight()) @ X.t())
        assert residual < 0.6 * torch.linalg.norm(E @ X.t())
        total += residual.item()
        total_unweighted += torch.linalg.norm((E - plain.delta_weight()) @ X.t()).item()
        assert layer.quant_error is None and quantize.is_quantized(layer.base)
        assert len(set(zip(layer.rows.tolist(), layer.cols.tolist(), strict=True))) == layer.n  # n distinct places
    assert total < total_unweighted  # the calibration statistics are what the fit is for
    model = loaded.module.eval()
    expected = model(**batch).logits.detach()
    merge_adapters(model)
    assert not any(quantize.is_quantized(layer.base) for layer in layers)
    torch.testing.assert_close(model(**batch).logits, expected, atol=1e-5, rtol=1e-4)


def test_calibration_leaves_no_trace_in_the_model():
    """The calibration pass runs in eval mode: BatchNorm statistics stay as they were, and so does the mode."""
    loaded = tiny("tiny-cnn")
    v = build_variant({"name": "qwha", "r": 2, "targets": "pointwise", "calib_batches": 2})
    v.adapt(loaded.module, head=loaded.head)
    model = loaded.module.train()
    stats = {n: b.clone() for n, b in model.named_buffers() if "running" in n}
    v.init_from_data(model, iter([batch_for(loaded)] * 10), lambda m, b: m(**b).loss)
    assert model.training
    assert all(torch.equal(b, stats[n]) for n, b in model.named_buffers() if "running" in n)
    assert all(layer.spectrum.abs().sum() > 0 for layer in adapter_layers(model))
