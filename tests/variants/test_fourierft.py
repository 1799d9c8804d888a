"""FourierFT's own properties (ΔW against the cosine sum by hand, seeded locations shared by every layer of a shape,
the whole spectrum on small layers, the two inits, the head's learning rate) and parity with PEFT's FourierFT."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import batch_for, tiny
from peft_twin import with_peft_twin
from torch import nn

from lorafactory.errors import ConfigError
from lorafactory.models import unfreeze
from lorafactory.variants import adapter_layers, build_variant
from lorafactory.variants.fourierft import FourierFTLinear, spectral_locations


def test_delta_weight_is_the_scaled_cosine_sum():
    """ΔW_jk = c/(m·n) Σ_l a_l cos(2π(j u_l/m + k v_l/n)), written out term by term."""
    torch.manual_seed(0)
    layer = FourierFTLinear(nn.Linear(5, 6).double(), n_frequency=7, scaling=3.0, seed=1)
    with torch.no_grad():
        layer.spectrum.normal_()
    (u, v), a = layer.indices.tolist(), layer.spectrum.detach().tolist()
    expected = torch.zeros(6, 5, dtype=torch.float64)
    for j in range(6):
        for k in range(5):
            expected[j, k] = (
                sum(a[f] * math.cos(2 * math.pi * (j * u[f] / 6 + k * v[f] / 5)) for f in range(7)) * 3.0 / 30
            )
    torch.testing.assert_close(layer.delta_weight(), expected, atol=1e-12, rtol=0)
    x = torch.randn(4, 5, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ (layer.base.weight + expected).t() + layer.bias, atol=1e-12, rtol=0)


def test_locations_are_seeded_distinct_and_shared_by_every_layer_of_a_shape():
    loaded = tiny("tiny-bert")
    build_variant({"name": "fourierft", "targets": "all-linear", "n_frequency": 100}).adapt(
        loaded.module, head=loaded.head
    )
    by_shape = {}
    for layer in adapter_layers(loaded.module):
        by_shape.setdefault((layer.out_features, layer.in_features), []).append(layer.indices)
    assert set(by_shape) == {(32, 32), (64, 32), (32, 64)}
    for (d_out, d_in), indices in by_shape.items():
        assert len({t.data_ptr() for t in indices}) == 1  # one tensor per shape, not a copy per layer
        flat = indices[0][0] * d_in + indices[0][1]
        assert flat.unique().numel() == 100 and flat.max() < d_out * d_in
    spectral_locations.cache_clear()  # regenerated from the seed alone: the same locations
    assert torch.equal(spectral_locations(32, 32, 100, 777), by_shape[(32, 32)][0])
    assert not torch.equal(spectral_locations(32, 32, 100, 778), by_shape[(32, 32)][0])


def test_a_layer_smaller_than_n_trains_every_frequency():
    loaded = tiny("tiny-cnn")
    variant = build_variant({"name": "fourierft", "targets": "all-conv"})
    variant.adapt(loaded.module, head=loaded.head)
    stem = loaded.module.stem
    assert stem.spectrum.numel() == variant.layer_params(27, 8) == 216
    assert sorted((stem.indices[0] * 27 + stem.indices[1]).tolist()) == list(range(216))


def test_gaussian_init_starts_away_from_the_base_model():
    zeros, gaussian = build_variant("fourierft"), build_variant({"name": "fourierft", "init": "gaussian"})
    assert zeros.zero_init and not gaussian.zero_init
    torch.manual_seed(0)
    layer = gaussian.make_layer(nn.Linear(8, 8))
    assert layer.spectrum.std() > 0.5 and layer.delta_weight().abs().max() > 0
    assert not zeros.make_layer(nn.Linear(8, 8)).spectrum.any()
    with pytest.raises(ConfigError, match="variant.init must be zeros or gaussian"):
        build_variant({"name": "fourierft", "init": "uniform"})


def test_the_head_keeps_the_task_rate_and_the_spectra_take_the_run_rate():
    loaded = tiny("tiny-bert")
    variant = build_variant({"name": "fourierft", "targets": "attn", "lr_mult": 5.0})
    variant.adapt(loaded.module, head=loaded.head)
    unfreeze(loaded.module, loaded.head)
    groups = {g["name"]: g for g in variant.param_groups(loaded.module, 5e-3)}
    assert groups["spectrum"]["lr"] == 5e-3 and groups["head"]["lr"] == pytest.approx(1e-3)
    assert {id(p) for p in groups["spectrum"]["params"]} == {id(x.spectrum) for x in adapter_layers(loaded.module)}
    head = {id(p) for n, p in loaded.module.named_parameters() if p.requires_grad and "classifier" in n}
    assert {id(p) for p in groups["head"]["params"]} == head


def test_fourierft_matches_peft():
    """PEFT's gaussian init (ours copied into theirs), 100 frequencies: the same locations, logits and gradients."""
    loaded, variant, theirs, names = with_peft_twin(
        "tiny-bert", {"name": "fourierft", "n_frequency": 100, "scaling": 20.0, "targets": "all-linear"}
    )
    ours = loaded.module
    g = torch.Generator().manual_seed(0)
    pairs = [(ours.get_submodule(n), theirs.base_model.model.get_submodule(n)) for n in names]
    with torch.no_grad():
        for mine, twin in pairs:
            assert torch.equal(mine.indices, twin.indices["default"])
            mine.spectrum.copy_(torch.randn(mine.spectrum.shape, generator=g))
            twin.fourierft_spectrum["default"].copy_(mine.spectrum)
    for model in (ours, theirs):
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
    batch = batch_for(loaded, batch_size=4, seq=12)
    out, ref = ours.train()(**batch), theirs.train()(**batch)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    ref.loss.backward()
    for mine, twin in pairs:
        grad = twin.fourierft_spectrum["default"].grad
        torch.testing.assert_close(mine.spectrum.grad, grad, atol=1e-5, rtol=1e-4)
