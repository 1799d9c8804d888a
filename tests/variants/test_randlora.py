"""RandLoRA's own properties (full rank, the update formula, shared seeded bases) and parity with PEFT's RandLoRA."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import batch_for
from peft_twin import with_peft_twin
from torch import nn

import lorafactory.variants.lora as lora_module
from lorafactory.variants import adapter_layers, adapter_state_dict, build_variant


def adapted(d_in: int, d_out: int, **cfg) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d_in, d_out), nn.Linear(d_out, d_in))
    build_variant({"name": "randlora", "targets": ["0", "1"], **cfg}).adapt(model, head=())
    return model


def randomize(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model):
            layer.randlora_lambda.copy_(torch.randn(layer.randlora_lambda.shape, generator=g))
            layer.randlora_gamma.copy_(torch.randn(layer.randlora_gamma.shape, generator=g))


def test_randlora_update_is_full_rank_from_rank_r_terms():
    model = adapted(48, 40, r=4)
    randomize(model)
    for layer in adapter_layers(model):
        assert layer.randlora_lambda.shape == (10, 4)  # N = ⌈40 / 4⌉ terms
        delta = layer.delta_weight().double()
        assert torch.linalg.matrix_rank(delta) == 40  # full rank, from rank-4 terms


@pytest.mark.parametrize(("d_in", "d_out"), [(12, 27), (27, 12)])
def test_randlora_delta_weight_is_the_sum_of_scaled_shared_bases(d_in, d_out):
    """ΔW = s·Σ_i B_i diag(λ_i) A diag(γ_i) on the min/max sides, transposed when d_out is the smaller side; with
    m = 12 and r = 5 the last of the N = 3 terms overhangs m."""
    model = adapted(d_in, d_out, r=5, alpha=10.0)
    randomize(model)
    layer = model[0]
    m, big = min(d_in, d_out), max(d_in, d_out)
    A, B = model.lf_shared.randlora_A[:, :m], model.lf_shared.randlora_B[:big, :3]
    lam, gamma = layer.randlora_lambda, layer.randlora_gamma
    assert lam.shape == (3, 5) and gamma.shape == (3, m)
    expected = sum(B[:, i] @ torch.diag(lam[i]) @ A @ torch.diag(gamma[i]) for i in range(3)) * 2.0
    expected = expected if d_in == m else expected.t()
    torch.testing.assert_close(layer.delta_weight(), expected, atol=1e-5, rtol=1e-5)
    x = torch.randn(4, d_in)
    torch.testing.assert_close(layer(x), layer.base(x) + x @ expected.t(), atol=1e-4, rtol=1e-4)


def test_randlora_starts_at_zero_with_unit_variance_bases_shared_and_seeded():
    model = adapted(48, 40, r=4)
    shared = model.lf_shared
    assert shared.randlora_A.shape == (4, 40) and shared.randlora_B.shape == (48, 10, 4)
    for layer in adapter_layers(model):
        assert torch.count_nonzero(layer.randlora_lambda) == 0
        assert torch.all(layer.randlora_gamma == 1 / 40)
        assert torch.count_nonzero(layer.delta_weight()) == 0
        assert not [n for n, _ in layer.named_buffers() if not n.startswith("base.")]
    assert shared.randlora_B.std().item() == pytest.approx(1.0, abs=0.05)
    assert shared.randlora_B.abs().max() <= math.sqrt(3)
    state = adapter_state_dict(model)
    assert [k for k in state if "randlora_A" in k or "randlora_B" in k] == [
        "lf_shared.randlora_A",
        "lf_shared.randlora_B",
    ]
    assert torch.equal(adapted(48, 40, r=4).lf_shared.randlora_B, shared.randlora_B)
    assert not torch.equal(adapted(48, 40, r=4, basis_seed=1).lf_shared.randlora_B, shared.randlora_B)


def test_randlora_scale_is_20_at_any_rank_unless_alpha_is_given():
    assert build_variant({"name": "randlora", "r": 4}).cfg.scaling == 20.0
    assert build_variant({"name": "randlora", "r": 32}).cfg.scaling == 20.0
    assert build_variant({"name": "randlora", "r": 4, "alpha": 8.0}).cfg.scaling == 2.0


@pytest.mark.parametrize("threshold", [0.0, math.inf])
def test_randlora_keeps_no_copy_of_the_bases_for_backward(threshold, monkeypatch):
    monkeypatch.setattr(lora_module, "MERGE_THRESHOLD", threshold)
    model = adapted(48, 40, r=4)
    randomize(model)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = model(torch.randn(6, 48)).square().sum()
    # inputs, weights, outputs, λ (10 × 4) and γ (10 × 40): no scaled basis (40 × 40) nor slice of B (48 × 10 × 4)
    kept = {tuple(t.shape) for t in saved}
    assert kept <= {(6, 48), (6, 40), (40, 48), (48, 40), (10, 4), (10, 40)}, kept
    loss.backward()
    assert all(layer.randlora_gamma.grad.abs().sum() > 0 for layer in adapter_layers(model))


@pytest.mark.parametrize("path", ["merged", "two-branch"])
def test_randlora_matches_peft(path, monkeypatch):
    """PEFT's bases copied into ours (PEFT flattens B's (basis, rank) columns and the scaled A's (rank, basis) rows
    in different orders, a fixed pairing of random columns: the copy reorders B to the same pairing), same λ and γ:
    same outputs and gradients. In float64: at s = 20 the first attention layer's gradients are tiny differences of
    large terms, which float32 rounds to ~1e-4 of the largest gradient in either implementation."""
    monkeypatch.setattr(lora_module, "MERGE_THRESHOLD", 0.0 if path == "merged" else math.inf)
    loaded, variant, theirs, names = with_peft_twin("tiny-bert", {"name": "randlora", "r": 4, "targets": "all-linear"})
    ours = loaded.module
    n, r, m = 8, 4, 32  # every tiny-bert layer has min(d_in, d_out) = 32
    with torch.no_grad():
        their_A = theirs.base_model.randlora_A["default"].float()  # (r, 1, m_max)
        their_B = theirs.base_model.randlora_B["default"].float()  # (M_max, N_max, r)
        ours.lf_shared.randlora_A.copy_(their_A[:, 0, :m])
        flat = their_B[:, :n].reshape(their_B.shape[0], n * r)  # column b·r + k pairs with scaled row k·n + b
        ours.lf_shared.randlora_B.copy_(flat.view(-1, r, n).transpose(1, 2))
    g = torch.Generator().manual_seed(0)
    pairs = [(ours.get_submodule(name), theirs.base_model.model.get_submodule(name)) for name in names]
    with torch.no_grad():
        for mine, twin in pairs:
            mine.randlora_lambda.copy_(torch.randn(mine.randlora_lambda.shape, generator=g))
            mine.randlora_gamma.copy_(torch.randn(mine.randlora_gamma.shape, generator=g) / m)
            twin.randlora_lambda["default"].copy_(mine.randlora_lambda.t())
            twin.randlora_gamma["default"].copy_(mine.randlora_gamma)
    for model in (ours.double(), theirs.double()):
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
    batch = batch_for(loaded, batch_size=4, seq=12)
    out, ref = ours.train()(**batch), theirs.train()(**batch)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-12, rtol=1e-10)
    out.loss.backward()
    ref.loss.backward()
    for mine, twin in pairs:
        their_lambda = twin.randlora_lambda["default"].grad.t()
        torch.testing.assert_close(mine.randlora_lambda.grad, their_lambda, atol=1e-12, rtol=1e-9)
        torch.testing.assert_close(
            mine.randlora_gamma.grad, twin.randlora_gamma["default"].grad, atol=1e-12, rtol=1e-9
        )
