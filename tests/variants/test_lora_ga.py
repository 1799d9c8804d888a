"""LoRA-GA: the gradient estimate (hooks, flags, memory), the init formula and its first-step property, resume, and
parity with PEFT's `preprocess_loraga` + `init_lora_weights="lora_ga"`."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import batch_for, tiny
from torch import nn

from lorafactory.models import unfreeze
from lorafactory.variants import adapter_layers, adapter_state_dict, build_variant, load_adapter_state_dict
from lorafactory.variants.base import find_targets
from lorafactory.variants.lora_ga import weight_gradients


def exact_svd_lowrank(A, q=6, niter=2, M=None):
    """torch.svd_lowrank's contract from an exact SVD (sign-normalised): the same decomposition for both sides."""
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    signs = torch.sign(U[U.abs().argmax(dim=0), torch.arange(U.shape[1])])
    U, Vh = U * signs, Vh * signs.unsqueeze(1)
    return U[:, :q], S[:q], Vh[:q].t()


def mlp(seed=0, d=(12, 10, 8), double=True):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d[0], d[1]), nn.Tanh(), nn.Linear(d[1], d[2]))
    return model.double() if double else model


def batches(n, seed=0, d_in=12):
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(7, d_in, generator=g, dtype=torch.float64)} for _ in range(n)]


def loss_fn(model, batch):
    return model(batch["x"]).square().mean()


def adapted(model, **cfg):
    variant = build_variant({"name": "lora_ga", "targets": ["0", "2"], "r": 2, "alpha": 4, **cfg})
    variant.adapt(model, head=())
    return variant


def test_weight_gradients_sum_the_dense_gradients_and_leave_the_model_as_it_was():
    reference = mlp()
    model = copy.deepcopy(reference)
    adapted(model)
    model.eval()
    data = batches(3)
    sums = weight_gradients(model, adapter_layers(model), iter(data), loss_fn, 3)

    for p in reference.parameters():
        p.requires_grad_(True)
    for batch in data:
        loss_fn(reference.train(), batch).backward()
    torch.testing.assert_close(sums[0], reference[0].weight.grad.float())
    torch.testing.assert_close(sums[1], reference[2].weight.grad.float())
    assert not model.training, "the train/eval mode is restored"
    for layer in adapter_layers(model):
        assert not layer.base.weight.requires_grad and layer.base.weight.grad is None
        assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
        assert layer.lora_A.grad is None and layer.lora_B.grad is None, "adapters stayed out of the estimation"


def test_at_most_one_layer_holds_a_dense_gradient_at_a_time():
    model = mlp(d=(12, 10, 8))
    adapted(model)
    layers = adapter_layers(model)
    seen = []
    for layer in layers:  # registered before weight_gradients' own hooks, so these run first
        layer.base.weight.requires_grad_(True)  # (hooks need it; weight_gradients sets it anyway)
        layer.base.weight.register_post_accumulate_grad_hook(
            lambda w: seen.append(sum(x.base.weight.grad is not None for x in layers))
        )
    weight_gradients(model, layers, iter(batches(2)), loss_fn, 2)
    assert seen == [1] * 4


def test_init_from_data_takes_exactly_init_batches_batches():
    model = mlp()
    variant = adapted(model, init_batches=3)
    stream = iter(batches(5))
    variant.init_from_data(model, stream, loss_fn)
    assert len(list(stream)) == 2


def gradient_layer(d_in=16, d_out=12, r=3, **cfg):
    """One adapted linear (min(d) ≤ 4r, so the randomized SVD sees the whole spectrum) and a loss whose gradient
    with respect to the weight is a fixed random matrix G."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(d_in, d_out)).double()
    variant = build_variant({"name": "lora_ga", "targets": ["0"], "r": r, "alpha": 2.0 * r, **cfg})
    variant.adapt(model, head=())
    G = torch.randn(d_out, d_in, dtype=torch.float64)
    return variant, model, G


def init_layer(variant, model, G):
    """Initialise through init_from_data with a loss that is linear in the weight: ∂L/∂W = G, whatever the input."""
    layer = model[0]
    variant.init_from_data(model, iter([{}] * 10), lambda m, b: (G * (m[0].weight + m[0].delta_weight())).sum())
    return layer


def test_official_init_takes_scaled_orthonormal_singular_vectors_and_keeps_the_model():
    variant, model, G = gradient_layer()
    W0 = model[0].weight.detach().clone()
    layer = init_layer(variant, model, G)
    U, _, Vh = torch.linalg.svd(G)
    r, zeta = 3, 12**0.25 / 4  # stable: d_out^{1/4} / √16
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    # sign-free checks: A spans G's top-r right singular vectors, B the next r left ones, both scaled by ζ
    close = {"atol": 1e-6, "rtol": 1e-5}  # the gradient is summed and decomposed in fp32
    torch.testing.assert_close(A.t() @ A, zeta**2 * Vh[:r].t() @ Vh[:r], **close)
    torch.testing.assert_close(B @ B.t(), zeta**2 * U[:, r : 2 * r] @ U[:, r : 2 * r].t(), **close)
    torch.testing.assert_close(A @ A.t(), zeta**2 * torch.eye(r, dtype=A.dtype), **close)
    torch.testing.assert_close(layer.weight + layer.delta_weight(), W0)


@pytest.mark.parametrize(
    ("direction", "a_part", "b_part"), [("A2rBr", (3, 6), (0, 3)), ("ArBr", (1, 6, 2), (0, 6, 2))]
)
def test_other_directions_take_their_components(direction, a_part, b_part):
    variant, model, G = gradient_layer(direction=direction, scale="unit")
    layer = init_layer(variant, model, G)
    U, _, Vh = torch.linalg.svd(G)
    V_a, U_b = Vh[slice(*a_part)], U[:, slice(*b_part)]
    torch.testing.assert_close(layer.lora_A.t() @ layer.lora_A, V_a.t() @ V_a, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(layer.lora_B @ layer.lora_B.t(), U_b @ U_b.t(), atol=2e-5, rtol=1e-4)


def test_gd_scale_makes_the_first_sgd_step_the_best_rank_2r_gradient_step():
    """LoRA-GA's defining property: with ζ = 1/s, LoRA's first SGD step changes s·BA by −η·G₂ᵣ to first order, where
    G₂ᵣ is the best rank-2r approximation of the full gradient."""
    variant, model, G = gradient_layer(scale="gd")
    layer = init_layer(variant, model, G)
    (G * layer.delta_weight()).sum().backward()  # the same loss: ∂L/∂W = G
    A, B, s = layer.lora_A.detach(), layer.lora_B.detach(), layer.scaling
    first_order = -s * (layer.lora_B.grad @ A + B @ layer.lora_A.grad)  # d(sBA) per unit of learning rate
    U, S, Vh = torch.linalg.svd(G)
    G2r = U[:, :6] @ torch.diag(S[:6]) @ Vh[:6]
    torch.testing.assert_close(first_order, -G2r, atol=1e-5, rtol=1e-4)  # fp32 decomposition
    assert (first_order + G).norm() > 0.1 * G.norm()  # (G itself has full rank: the test tells the two apart)


def test_fewer_than_2r_triplets_leave_missing_components_zero():
    variant, model, G = gradient_layer(d_in=9, d_out=5, r=3)
    W0 = model[0].weight.detach().clone()
    layer = init_layer(variant, model, G)
    B = layer.lora_B.detach()
    assert torch.all(B[:, 2] == 0) and torch.all(B[:, :2].norm(dim=0) > 0)  # components 3, 4 exist; 5 does not
    torch.testing.assert_close(layer.weight + layer.delta_weight(), W0)


def test_r_above_the_weight_rank_is_refused():
    from lorafactory.errors import ConfigError

    with pytest.raises(ConfigError, match="variant.r=6 exceeds"):
        build_variant({"name": "lora_ga", "targets": ["0"], "r": 6}).adapt(nn.Sequential(nn.Linear(9, 5)), head=())


def test_initialised_state_loads_into_a_fresh_model_without_data():
    """What a resumed run does: init_from_data is skipped, everything (factors and residual) comes from the state."""
    model = mlp()
    variant = adapted(model)
    variant.init_from_data(model, iter(batches(4)), loss_fn)
    x = batches(1, seed=5)[0]["x"]
    expected = model(x)
    fresh = mlp()
    adapted(fresh)
    load_adapter_state_dict(fresh, adapter_state_dict(model))
    torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)


def no_dropout(*models):
    for model in models:
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0


@pytest.mark.parametrize("scale", ["stable", "gd", "unit"])
def test_lora_ga_matches_peft_given_the_same_gradients(scale, monkeypatch):
    """`convention="peft"`: the same batches through PEFT's preprocess_loraga and get_peft_model give the same factors
    and residual weights (the randomized SVD replaced by the same exact one in both), then the same outputs and
    gradients."""
    peft = pytest.importorskip("peft")
    monkeypatch.setattr(torch, "svd_lowrank", exact_svd_lowrank)
    loaded = tiny("tiny-bert")
    no_dropout(loaded.module)
    theirs = copy.deepcopy(loaded.module)
    data = [batch_for(loaded, batch_size=4, seed=s) for s in range(2)]
    names = find_targets(loaded.module, "all-linear", loaded.head)

    variant = build_variant(
        {
            "name": "lora_ga",
            "targets": "all-linear",
            "r": 4,
            "alpha": 8,
            "convention": "peft",
            "init_batches": 2,
            "scale": scale,
        }
    )
    variant.adapt(loaded.module, head=loaded.head)
    unfreeze(loaded.module, loaded.head)
    variant.init_from_data(loaded.module, iter(data), lambda m, b: m(**b).loss)

    config = variant.peft_config(names, list(loaded.head))

    def train_step():
        for batch in data:
            theirs(**batch).loss.backward()

    peft.preprocess_loraga(theirs, config, train_step)
    theirs = peft.get_peft_model(theirs, config)
    inner = theirs.base_model.model
    pairs = [(layer, inner.get_submodule(name)) for name, layer in loaded.module.named_modules() if name in names]
    assert len(pairs) == len(names)
    for mine, twin in pairs:
        torch.testing.assert_close(mine.lora_A, twin.lora_A["default"].weight, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(mine.lora_B, twin.lora_B["default"].weight, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(mine.base.weight, twin.base_layer.weight, atol=1e-5, rtol=1e-4)

    batch = batch_for(loaded, batch_size=4, seq=12, seed=9)
    loaded.module.train(), theirs.train()
    out, ref = loaded.module(**batch), theirs(**batch)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    ref.loss.backward()
    for mine, twin in pairs:
        torch.testing.assert_close(mine.lora_A.grad, twin.lora_A["default"].weight.grad, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(mine.lora_B.grad, twin.lora_B["default"].weight.grad, atol=1e-5, rtol=1e-4)
