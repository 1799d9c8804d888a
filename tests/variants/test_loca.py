"""LoCA's own properties: the DCT against scipy's, the iDCT of a spectrum, the custom gradients against autograd and
the paper's finite-difference formula, locations that move toward the right frequency, and the alternating
schedule."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft
import torch
from conftest import batch_for, tiny
from torch import nn

from lorafactory.errors import ConfigError
from lorafactory.models import unfreeze
from lorafactory.variants import adapter_layers, build_variant
from lorafactory.variants.loca import LoCALinear, LocatedIDCT, dct_matrix, idct2


@pytest.mark.parametrize("n", [1, 7, 32])
def test_dct_matrix_is_scipys_orthonormal_dct_ii_and_its_transpose_the_dct_iii(n):
    C = dct_matrix(n, torch.float64).numpy()
    x = np.random.default_rng(n).standard_normal((n, 3))
    np.testing.assert_allclose(C @ x, scipy.fft.dct(x, type=2, norm="ortho", axis=0), atol=1e-12)
    np.testing.assert_allclose(C.T @ x, scipy.fft.idct(x, type=2, norm="ortho", axis=0), atol=1e-12)
    np.testing.assert_allclose(C.T @ x, scipy.fft.dct(x, type=3, norm="ortho", axis=0), atol=1e-12)
    np.testing.assert_allclose(C.T @ C, np.eye(n), atol=1e-12)


def test_a_one_hot_spectrum_gives_the_outer_product_of_two_basis_vectors():
    C_out, C_in = dct_matrix(6, torch.float64), dct_matrix(9, torch.float64)
    one = torch.ones(1, dtype=torch.float64)
    dW = idct2(one, torch.tensor([4]), torch.tensor([2]), C_out, C_in)
    torch.testing.assert_close(dW, torch.outer(C_out[4], C_in[2]), atol=1e-12, rtol=0)


def random_spectrum(n: int, d_out: int = 6, d_in: int = 9, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, dtype=torch.float64, generator=g)
    locations = torch.stack([torch.randint(0, d_out, (n,), generator=g), torch.randint(0, d_in, (n,), generator=g)])
    locations[:, 0] = torch.tensor([0, d_in - 1])  # an entry on two edges: one-sided differences
    locations[:, 1] = locations[:, 2]  # two coefficients on one entry: they add
    return a, locations.double()


@pytest.mark.parametrize("n", [4, 40])  # below and above d_out + d_in: the gathered and the dense products
def test_idct_of_the_spectrum_is_scipys_idctn(n):
    a, locations = random_spectrum(n)
    rows, cols = locations.long()
    S = np.zeros((6, 9))
    np.add.at(S, (rows.numpy(), cols.numpy()), a.numpy())
    dW = LocatedIDCT.apply(a, locations, 6, 9)
    np.testing.assert_allclose(dW.numpy(), scipy.fft.idctn(S, type=2, norm="ortho"), atol=1e-12)


@pytest.mark.parametrize("n", [4, 40])  # both ways of reading the spectral gradient
def test_gradients_are_the_spectral_gradient_and_the_papers_finite_difference(n):
    """∂a = K[u, v] and ∂l = clip(a (K[next] − K[previous]) / 2, −1, 1) along each axis (neighbours clamped to the
    grid), with K = DCT-II(∂L/∂ΔW) from scipy; the large coefficients make the clip bite."""
    a, locations = random_spectrum(n)
    a = (3 * a).requires_grad_()
    locations.requires_grad_()
    G = torch.randn(6, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (LocatedIDCT.apply(a, locations, 6, 9) * G).sum().backward()
    K = scipy.fft.dctn(G.numpy(), type=2, norm="ortho")
    u, v = locations.detach().long().numpy()
    coef = a.detach().numpy()
    np.testing.assert_allclose(a.grad.numpy(), K[u, v], atol=1e-12)
    d_rows = K[np.minimum(u + 1, 5), v] - K[np.maximum(u - 1, 0), v]
    d_cols = K[u, np.minimum(v + 1, 8)] - K[u, np.maximum(v - 1, 0)]
    expected = np.clip(0.5 * coef * np.stack([d_rows, d_cols]), -1, 1)
    assert (np.abs(expected) == 1).any() and (np.abs(expected) < 1).any()
    np.testing.assert_allclose(locations.grad.numpy(), expected, atol=1e-12)


def test_coefficient_gradient_equals_autograd_through_an_explicit_dense_idct():
    torch.manual_seed(0)
    layer = LoCALinear(nn.Linear(9, 6).double(), n=20, scale=0.7)
    with torch.no_grad():
        layer.coefficients.normal_()
    x = torch.randn(5, 9, dtype=torch.float64)
    layer(x).square().sum().backward()

    a = layer.coefficients.detach().clone().requires_grad_()
    rows, cols = layer.grid_locations().round().long()
    S = torch.zeros(6, 9, dtype=torch.float64).index_put((rows, cols), a, accumulate=True)
    dW = 0.7 * dct_matrix(6, torch.float64).t() @ S @ dct_matrix(9, torch.float64)
    (x @ (layer.weight + dW).t() + layer.bias).square().sum().backward()
    torch.testing.assert_close(layer.coefficients.grad, a.grad, atol=1e-10, rtol=1e-10)


def test_location_gradient_chains_through_the_grid_scale_and_the_clip():
    torch.manual_seed(0)
    layer = LoCALinear(nn.Linear(9, 6).double(), n=3, scale=1.0)
    with torch.no_grad():
        layer.coefficients.fill_(0.1)
        layer.locations.copy_(torch.tensor([[0.5, 1.2, 0.3], [0.5, 0.4, -0.1]]))
    layer.locations.requires_grad_(True)
    grid = layer.grid_locations().detach().requires_grad_()
    G = torch.randn(6, 9, dtype=torch.float64)
    (LocatedIDCT.apply(layer.coefficients.detach(), grid, 6, 9) * G).sum().backward()
    (layer.delta_weight() * G).sum().backward()
    inside = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)  # clipped coordinates: no gradient
    scale = torch.tensor([[5.0], [8.0]], dtype=torch.float64)
    torch.testing.assert_close(layer.locations.grad, grid.grad * scale * inside, atol=1e-12, rtol=0)


def test_the_estimator_moves_a_location_to_the_target_frequency():
    """ΔW* is the basis at (6, 5); the coefficient sits at (5, 5). Descending the estimated location gradient alone
    (coefficients frozen) walks the row to 6 and keeps the column."""
    torch.manual_seed(0)
    base = nn.Linear(16, 16, bias=False).double()
    layer = LoCALinear(base, n=1, scale=1.0)
    with torch.no_grad():
        layer.coefficients.fill_(1.0)
        layer.locations.copy_(torch.tensor([[5 / 15], [5 / 15]], dtype=torch.float64))
    layer.coefficients.requires_grad_(False)
    layer.locations.requires_grad_(True)
    target = base.weight.detach() + torch.outer(dct_matrix(16, torch.float64)[6], dct_matrix(16, torch.float64)[5])
    optimizer = torch.optim.SGD([layer.locations], lr=0.001)  # ∂l_row = 15 · (−1): 0.225 rows per step
    eye = torch.eye(16, dtype=torch.float64)
    for _ in range(10):
        optimizer.zero_grad()
        (layer(eye) - eye @ target.t()).square().sum().backward()
        optimizer.step()
    assert layer.grid_locations().round().long().flatten().tolist() == [6, 5]


def test_schedule_alternates_then_freezes_the_locations():
    v = build_variant({"name": "loca", "location_steps": 50})  # B_s cuts the second location phase short
    phases = "".join("L" if v.trains_locations(s) else "c" for s in range(100))
    assert phases == "c" * 10 + "L" * 20 + "c" * 10 + "L" * 10 + "c" * 50
    assert not any(build_variant({"name": "loca", "location_steps": 0}).trains_locations(s) for s in range(40))


def test_training_follows_the_phases_and_locations_never_move_after_location_steps():
    """A real loop (the contract test's): the switch reports a changed trainable set, each phase moves only its own
    parameters, and past `location_steps` the locations stay put."""
    loaded = tiny("tiny-bert")
    cfg = {"location_steps": 9, "coefficient_phase": 2, "location_phase": 3, "location_lr": 0.05}
    v = build_variant({"name": "loca", "targets": "attn", **cfg})
    v.adapt(loaded.module, head=loaded.head)
    unfreeze(loaded.module, loaded.head)
    model = loaded.module.train()
    layers = adapter_layers(model)
    batch = batch_for(loaded, batch_size=2, seq=6)
    optimizer = torch.optim.AdamW(v.param_groups(model, 1e-2))
    switches, moved = [], {"c": set(), "L": set()}
    for step in range(12):
        phase = "L" if layers[0].locations.requires_grad else "c"
        before = [(x.coefficients.detach().clone(), x.locations.detach().clone()) for x in layers]
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        for layer, (c, loc) in zip(layers, before, strict=True):
            if not torch.equal(c, layer.coefficients):
                moved[phase].add("coefficients")
            if not torch.equal(loc, layer.locations):
                moved[phase].add("locations")
        if v.on_train_batch_end(model, step + 1):
            switches.append(step + 1)
            optimizer = torch.optim.AdamW(v.param_groups(model, 1e-2))
    assert switches == [2, 5, 7, 9]  # c c L L L c c L L | c ...: B_s cuts the second location phase short
    assert moved == {"c": {"coefficients"}, "L": {"locations"}}
    frozen = [x.locations.detach().clone() for x in layers]
    assert all(not x.locations.requires_grad for x in layers)
    for step in range(12, 15):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        assert not v.on_train_batch_end(model, step + 1)
    assert all(torch.equal(f, x.locations) for f, x in zip(frozen, layers, strict=True))


def test_progress_round_trips_and_restores_the_trainable_set():
    loaded, fresh = tiny("tiny-bert"), tiny("tiny-bert")
    v = build_variant({"name": "loca", "targets": "attn"})
    v.adapt(loaded.module, head=loaded.head)
    assert v.on_train_batch_end(loaded.module, 12)  # inside the first location phase
    resumed = build_variant({"name": "loca", "targets": "attn"})
    resumed.adapt(fresh.module, head=fresh.head)
    resumed.load_state_dict(v.state_dict(), fresh.module)
    assert resumed.state_dict() == {"step": 12}
    for layer in adapter_layers(fresh.module):
        assert layer.locations.requires_grad and not layer.coefficients.requires_grad
    assert not resumed.on_train_batch_end(fresh.module, 13)


def test_param_groups_give_locations_their_own_rate_and_the_head_the_task_rate():
    loaded = tiny("tiny-bert")
    v = build_variant({"name": "loca", "targets": "attn", "lr_mult": 4.0, "location_lr": 2e-4})
    v.adapt(loaded.module, head=loaded.head)
    unfreeze(loaded.module, loaded.head)
    groups = {g["name"]: g for g in v.param_groups(loaded.module, 8e-3)}
    layers = adapter_layers(loaded.module)
    assert groups["coefficients"]["lr"] == 8e-3 and groups["locations"]["lr"] == 2e-4
    assert groups["head"]["lr"] == pytest.approx(2e-3)
    assert [id(p) for p in groups["locations"]["params"]] == [id(x.locations) for x in layers]  # frozen, kept


def test_config_rejects_dropout_and_bad_phases():
    with pytest.raises(ConfigError, match="variant.dropout must be 0"):
        build_variant({"name": "loca", "dropout": 0.1})
    with pytest.raises(ConfigError, match="variant.location_phase must be >= 1"):
        build_variant({"name": "loca", "location_phase": 0})
