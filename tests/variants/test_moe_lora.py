"""MoE-LoRA (HydraLoRA / MoLoRA / MixLoRA): routing, expert masking, the balance loss, and the reductions to LoRA."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorafactory.errors import ConfigError
from lorafactory.variants import build_variant
from lorafactory.variants.base import count_trainable
from lorafactory.variants.moe_lora import balance_loss

D_IN, D_OUT, R = 12, 10, 3


def moe(form: str = "hydralora", experts: int = 4, seed: int = 0, **cfg):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(D_IN, D_OUT))
    variant = build_variant({"name": "moe_lora", "targets": ["0"], "r": R, "form": form, "experts": experts, **cfg})
    variant.adapt(model, head=())
    with torch.no_grad():  # experts off their zero init, so each one's contribution is visible
        model[0].lora_B.normal_()
    return variant, model, model[0]


def by_hand(layer, x: torch.Tensor) -> torch.Tensor:
    """W0 x + b + s Σ_i g_i(x) B_i A_i x, one expert at a time, with the routing written out."""
    n, r = layer.experts, layer.r
    probs = torch.softmax(x @ layer.router.t(), dim=-1)
    if layer.top_k:
        top, chosen = probs.topk(layer.top_k, dim=-1)
        probs = torch.zeros_like(probs).scatter(1, chosen, top / top.sum(-1, keepdim=True))
    out = x @ layer.base.weight.t() + layer.base.bias
    for i in range(n):
        A = layer.lora_A if layer.form == "hydralora" else layer.lora_A[i * r : (i + 1) * r]
        B = layer.lora_B[:, i * r : (i + 1) * r]
        out = out + layer.scaling * probs[:, i : i + 1] * (x @ A.t() @ B.t())
    return out


@pytest.mark.parametrize("form", ["hydralora", "molora", "mixlora"])
def test_layer_computes_the_routed_mixture_of_experts(form):
    _, _, layer = moe(form)
    x = torch.randn(7, D_IN)
    torch.testing.assert_close(layer(x), by_hand(layer, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("form", ["hydralora", "molora", "mixlora"])
def test_router_weights_sum_to_one_per_token(form):
    _, _, layer = moe(form, experts=5)
    gates = layer.gates(torch.randn(2, 9, D_IN))
    assert gates.shape == (18, 5)
    torch.testing.assert_close(gates.sum(dim=-1), torch.ones(18))
    nonzero = (gates != 0).sum(dim=-1)
    assert (nonzero == (2 if form == "mixlora" else 5)).all()


@pytest.mark.parametrize("form", ["hydralora", "molora", "mixlora"])
def test_all_b_zero_gives_the_base_output(form):
    _, _, layer = moe(form)
    with torch.no_grad():
        layer.lora_B.zero_()
    x = torch.randn(6, D_IN)
    torch.testing.assert_close(layer(x), layer.base(x), atol=0, rtol=0)


def test_top_k_masks_unselected_experts_exactly():
    """Changing an expert no token chose changes nothing, and it gets exactly zero gradient."""
    _, _, layer = moe("mixlora", experts=4, top_k=2)
    x = torch.randn(1, D_IN)
    chosen = set(layer.gates(x)[0].nonzero().flatten().tolist())
    unused = sorted(set(range(4)) - chosen)
    assert len(chosen) == 2
    before = layer(x).detach()
    with torch.no_grad():
        for i in unused:
            layer.lora_B[:, i * R : (i + 1) * R].normal_(std=100.0)
            layer.lora_A[i * R : (i + 1) * R].normal_(std=100.0)
    after = layer(x)
    torch.testing.assert_close(after, before, atol=0, rtol=0)
    after.sum().backward()
    for i in unused:
        assert torch.count_nonzero(layer.lora_B.grad[:, i * R : (i + 1) * R]) == 0
        assert torch.count_nonzero(layer.lora_A.grad[i * R : (i + 1) * R]) == 0
    for i in chosen:
        assert torch.count_nonzero(layer.lora_B.grad[:, i * R : (i + 1) * R]) > 0


def test_balance_loss_is_one_under_uniform_routing_and_n_when_collapsed():
    uniform = torch.full((6, 4), 0.25)
    assert balance_loss(uniform, torch.tensor([[0, 1], [2, 3], [0, 2], [1, 3], [0, 3], [1, 2]])).item() == 1.0
    # balanced assignments with non-uniform but symmetric probabilities: still 1
    probs = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.2, 0.2, 0.3, 0.3]])
    assert balance_loss(probs, torch.tensor([[0, 1], [2, 3]])).item() == pytest.approx(1.0)
    collapsed = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 5)
    assert balance_loss(collapsed, torch.zeros(5, 1, dtype=torch.long)).item() == pytest.approx(4.0)


def test_mixlora_aux_loss_is_the_mean_layer_balance_and_trains_the_routers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, D_IN), nn.Linear(D_IN, D_OUT))
    variant = build_variant(
        {"name": "moe_lora", "targets": ["0", "1"], "r": R, "form": "mixlora", "balance_coef": 0.01}
    )
    variant.adapt(model, head=())
    model.train()
    model(torch.randn(5, 4, D_IN))
    balances = [model[0].balance.detach(), model[1].balance.detach()]
    aux = variant.aux_loss(model)
    torch.testing.assert_close(aux.detach(), 0.01 * (balances[0] + balances[1]) / 2)
    aux.backward()
    assert model[0].router.grad.abs().sum() > 0 and model[1].router.grad.abs().sum() > 0
    assert variant.aux_loss(model) is None  # counted once per forward
    model.eval()
    model(torch.randn(2, D_IN))
    assert variant.aux_loss(model) is None  # evaluation adds no loss


def test_soft_routing_forms_have_no_aux_loss():
    variant, model, _ = moe("hydralora")
    model.train()(torch.randn(3, D_IN))
    assert variant.aux_loss(model) is None


def test_one_expert_is_exactly_lora():
    _, model, layer = moe("molora", experts=1)
    torch.manual_seed(1)
    lora_model = nn.Sequential(nn.Linear(D_IN, D_OUT))
    lora_model.load_state_dict({"0.weight": layer.base.weight, "0.bias": layer.base.bias})
    build_variant({"name": "lora", "targets": ["0"], "r": R}).adapt(lora_model, head=())
    lora = lora_model[0]
    with torch.no_grad():
        lora.lora_A.copy_(layer.lora_A)
        lora.lora_B.copy_(layer.lora_B)
    assert layer.router is None and count_trainable(layer.adapter_parameters()) == R * (D_IN + D_OUT)
    x = torch.randn(2, 5, D_IN)
    out, ref = layer(x), lora(x)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    out.square().sum().backward()
    ref.square().sum().backward()
    torch.testing.assert_close(layer.lora_A.grad, lora.lora_A.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.lora_B.grad, lora.lora_B.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("form", "a_rows"),
    [("hydralora", R), ("molora", 4 * R), ("mixlora", 4 * R)],
)
def test_hydralora_shares_one_a_and_counts_match_the_formula(form, a_rows):
    variant, model, layer = moe(form)
    assert layer.lora_A.shape == (a_rows, D_IN) and layer.lora_B.shape == (D_OUT, 4 * R)
    assert layer.router.shape == (4, D_IN)
    assert count_trainable(layer.adapter_parameters()) == variant.layer_params(D_IN, D_OUT)
    assert variant.layer_params(D_IN, D_OUT) == a_rows * D_IN + 4 * R * D_OUT + 4 * D_IN


def test_official_inits():
    """HydraLoRA: kaiming A and router; MoLoRA: N(0, 0.02²) A and router; MixLoRA: kaiming A, N(0, 0.02²) router."""
    torch.manual_seed(0)
    bound = 1 / D_IN**0.5
    for form, a_small, router_small in [("hydralora", False, False), ("molora", True, True), ("mixlora", False, True)]:
        model = nn.Sequential(nn.Linear(D_IN, D_OUT))
        build_variant({"name": "moe_lora", "targets": ["0"], "r": R, "form": form, "experts": 4}).adapt(model)
        layer = model[0]
        assert torch.count_nonzero(layer.lora_B) == 0
        for tensor, small in ((layer.lora_A, a_small), (layer.router, router_small)):
            if small:
                assert tensor.abs().max() < 0.1 and 0.005 < tensor.std() < 0.04
            else:
                assert tensor.abs().max() <= bound and tensor.abs().max() > 0.8 * bound


def test_cannot_merge():
    _, model, layer = moe()
    with pytest.raises(RuntimeError, match="no single ΔW"):
        layer.merge()


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"form": "switch"}, "variant.form must be one of hydralora, molora, mixlora"),
        ({"experts": 0}, "variant.experts must be >= 1"),
        ({"form": "mixlora", "experts": 2, "top_k": 3}, r"variant.top_k must be in \[1, variant.experts=2\]"),
        ({"form": "mixlora", "balance_coef": -1.0}, "variant.balance_coef must be >= 0"),
    ],
)
def test_config_errors_name_the_override(cfg, message):
    with pytest.raises(ConfigError, match=message):
        build_variant({"name": "moe_lora", **cfg})
