"""Bayesian-LoRA's own properties: the nested Bayesian Bits quantizer, the hard-concrete gates and their threshold,
the prior, the deployed rank and bit-widths, and the exact merge of the deployed update."""

from __future__ import annotations

import math

import pytest
import torch

from lorafactory.variants import adapter_state_dict, build_variant, load_adapter_state_dict
from lorafactory.variants.bayesian_lora import (
    BITS,
    HC_BETA,
    HC_GAMMA,
    HC_ZETA,
    deployed_gates,
    open_probability,
    quantize,
    residuals,
    sample_gates,
)

OPEN, SHUT = 50.0, -50.0  # logits whose gates are 1 (0) in every sample and after thresholding


def adapted(r=4, d_in=6, d_out=5, seed=0, **cfg):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(d_in, d_out))
    variant = build_variant({"name": "bayesian_lora", "targets": ["0"], "r": r, **cfg})
    variant.adapt(model, head=())
    return variant, model, model[0]


def set_logits(layer, rank=None, bits=None):
    with torch.no_grad():
        if rank is not None:
            layer.rank_logits.copy_(torch.tensor(rank))
        if bits is not None:
            layer.bit_logits.copy_(torch.tensor(bits))


def grid(x, bits):
    """x on the symmetric b-bit grid of range ±max|x| (clipped just inside, as the quantizer does)."""
    beta = x.abs().max()
    step = 2 * beta / (2**bits - 1)
    return step * torch.round(x.clamp(-beta * (1 - 2**-20), beta * (1 - 2**-20)) / step), step


def test_all_gates_open_and_full_precision_is_the_ungated_svd_adapter():
    _, model, layer = adapted()
    set_logits(layer, rank=[OPEN] * 3, bits=[[OPEN] * 4] * 3)
    x = torch.randn(7, 6)
    expected = (
        x @ layer.weight.t() + layer.bias + layer.scaling * ((x @ layer.lora_A.t()) * layer.lora_E) @ layer.lora_B.t()
    )
    for mode in (True, False):  # training samples every gate as 1 at these logits; evaluation thresholds them
        model.train(mode)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.delta_weight(), layer.scaling * (layer.lora_B * layer.lora_E) @ layer.lora_A)


@pytest.mark.parametrize("bits", BITS[:-1])
def test_nested_residuals_give_the_b_bit_grid_with_2b_minus_1_levels(bits):
    # A dense ramp over ±1.7 that hits every 16-bit level; a sine, not an even ramp, so that no value sits exactly on
    # a half step, where rounding the residual and rounding x may break the tie to different neighbours.
    x = 1.7 * torch.sin(torch.linspace(-math.pi / 2, math.pi / 2, 400_001, dtype=torch.float64))
    parts = residuals(x)
    nested = sum(parts[: BITS.index(bits) + 1])
    direct, step = grid(x, bits)
    torch.testing.assert_close(nested, direct, rtol=0, atol=1e-9 * step)
    # A zero-centred grid that nests in the next one has an odd number of levels: 2^b − 1, ±(2^(b−1) − 1)·s_b.
    levels = torch.unique(torch.round(nested / step))
    assert levels.numel() == 2**bits - 1
    assert levels.abs().max() == 2 ** (bits - 1) - 1
    assert nested.abs().max() <= 1.7
    gates = torch.tensor([1.0 if b <= bits else 0.0 for b in BITS[1:]], dtype=torch.float64)
    torch.testing.assert_close(quantize(x, gates), nested, rtol=0, atol=1e-12)
    assert sum(parts).equal(x)  # every gate open: the full-precision remainder restores x


def test_the_step_halves_its_exponent_as_bayesian_bits_nests_it():
    x = torch.randn(500, dtype=torch.float64)
    beta = x.abs().max()
    steps = [2 * beta / 3]
    for bits in BITS[:-2]:
        steps.append(steps[-1] / (2**bits + 1))  # s_2b = s_b / (2^b + 1) = 2β / (2^2b − 1)
    for bits, step in zip(BITS[:-1], steps, strict=True):
        torch.testing.assert_close(step, 2 * beta / (2**bits - 1))
    parts = residuals(x)
    for k, (part, step) in enumerate(zip(parts[1:-1], steps[1:], strict=True)):
        codes = part / step
        torch.testing.assert_close(codes, torch.round(codes))  # each residual is on its own finer grid
        assert codes.abs().max() <= (2 ** BITS[k] + 1) // 2  # and within half a coarser step


def test_quantizer_gradients_are_straight_through_and_the_gates_get_their_residuals():
    x = torch.randn(40, dtype=torch.float64, requires_grad=True)
    gates = torch.tensor([0.3, 0.6, 0.9, 0.2], dtype=torch.float64, requires_grad=True)
    weights = torch.randn(40, dtype=torch.float64)
    (quantize(x, gates) * weights).sum().backward()
    torch.testing.assert_close(x.grad, weights)
    x2, e4, e8, e16, e32 = residuals(x)
    z4, z8, z16, z32 = gates.detach()
    inner16 = e16 + z32 * e32
    inner8 = e8 + z16 * inner16
    inner4 = e4 + z8 * inner8
    expected = torch.stack(
        [(inner4 * weights).sum(), (z4 * inner8 * weights).sum(), (z4 * z8 * inner16 * weights).sum(),
         (z4 * z8 * z16 * e32 * weights).sum()]
    )  # fmt: skip
    torch.testing.assert_close(gates.grad, expected)
    value = quantize(x, gates.detach())
    torch.testing.assert_close(value, x2 + z4 * inner4)


def test_a_zero_tensor_quantizes_to_zero():
    x = torch.zeros(3, 4)
    assert quantize(x, torch.tensor([1.0, 0.0, 0.0, 0.0])).equal(x)


def test_hard_concrete_samples_match_their_closed_form_probabilities():
    logit = torch.tensor(0.7)
    u = torch.rand(400_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z = sample_gates(logit.double(), u)
    p_zero = torch.sigmoid(HC_BETA * math.log(-HC_GAMMA / HC_ZETA) - logit)
    p_one = torch.sigmoid(logit - HC_BETA * math.log((1 - HC_GAMMA) / (HC_ZETA - 1)))
    assert abs((z == 0).double().mean() - p_zero) < 3e-3
    assert abs((z == 1).double().mean() - p_one) < 3e-3
    torch.testing.assert_close(open_probability(logit), 1 - p_zero)
    # One hand-computed sample: u = 0.25, log α = 0.7.
    s = 1 / (1 + math.exp(-(math.log(0.25 / 0.75) + 0.7) / HC_BETA))
    torch.testing.assert_close(sample_gates(logit, torch.tensor(0.25)), torch.tensor(s * 1.2 - 0.1))


def test_gates_are_open_at_evaluation_when_their_probability_of_zero_is_below_034():
    boundary = HC_BETA * math.log(-HC_GAMMA / HC_ZETA) - math.log(0.34 / 0.66)  # P(z = 0) = 0.34 here
    logits = torch.tensor([boundary - 1e-3, boundary + 1e-3])
    assert deployed_gates(logits).tolist() == [0.0, 1.0]


def test_prior_matches_hand_computation_and_falls_as_gates_close():
    variant, model, layer = adapted(r=3)
    rank, bits = [1.5, -0.5], [[2.0, 1.0, 0.0, -1.0], [0.5, 0.5, 0.5, 0.5], [3.0, -2.0, 1.0, 2.0]]
    set_logits(layer, rank=rank, bits=bits)
    q = open_probability(torch.tensor(bits))
    chain = [1 + q[m, 0] + q[m, 0] * q[m, 1] + q[m, :3].prod() + q[m].prod() for m in range(3)]
    expected = chain[0] + chain[2] + open_probability(torch.tensor(rank)).mean() * chain[1]
    torch.testing.assert_close(layer.prior(), expected)
    torch.testing.assert_close(variant.aux_loss(model), variant.cfg.prior_weight * expected)
    previous = layer.prior().item()
    for closing in ("bit_logits", "rank_logits", "bit_logits"):
        with torch.no_grad():
            getattr(layer, closing).view(-1)[0] -= 3.0
        now = layer.prior().item()
        assert now < previous
        previous = now
    set_logits(layer, rank=[SHUT] * 2, bits=[[SHUT] * 4] * 3)
    torch.testing.assert_close(layer.prior(), torch.tensor(2.0))  # the 2-bit chains of A and B are always paid


def test_thresholded_gates_give_the_recorded_ranks_and_bits_and_the_deployed_update():
    variant, model, layer = adapted(r=5)
    # The rank gates nest: the gate of component 3 is shut, so 4 and 5 go too, whatever their own gates say.
    set_logits(layer, rank=[OPEN, SHUT, OPEN, OPEN], bits=[[OPEN, OPEN, SHUT, OPEN], [SHUT] * 4, [OPEN] * 4])
    summary = variant.summary(model.eval())
    assert summary["ranks"] == {"0": 2}
    assert summary["bits"] == {"0": {"A": 8, "E": 2, "B": 32}}
    A = sum(residuals(layer.lora_A)[:3])
    E = residuals(layer.lora_E)[0]
    B = layer.lora_B
    expected = layer.scaling * (B[:, :2] * E[:2]) @ A[:2]
    torch.testing.assert_close(layer.delta_weight(), expected, rtol=0, atol=1e-7)
    x = torch.randn(4, 6)
    unmerged = model(x)
    torch.testing.assert_close(unmerged, x @ (layer.weight + expected).t() + layer.bias, rtol=1e-6, atol=1e-6)
    base = layer.weight.clone()
    layer.merge()
    torch.testing.assert_close(model(x), unmerged, rtol=0, atol=1e-6)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, base, rtol=0, atol=1e-7)


def test_training_drops_components_after_a_shut_rank_gate_and_bits_after_a_dead_gate():
    _, model, layer = adapted(r=4)
    # Logit −2.5: P(z ≠ 0) ≈ 0.29 as a hard-concrete variable, but at or below −2 the gate is 0 in training.
    set_logits(layer, rank=[OPEN, SHUT, OPEN], bits=[[-2.5, OPEN, OPEN, OPEN], [OPEN] * 4, [OPEN] * 4])
    model.train()
    for _ in range(20):
        A, B = layer.factors()
        torch.testing.assert_close(A, residuals(layer.lora_A)[0], rtol=0, atol=0)
        assert not B[:, 2:].any() and B[:, :2].all()


def test_merge_in_training_mode_folds_the_deployed_update():
    _, model, layer = adapted()
    set_logits(layer, rank=[0.0, 0.0, -1.5], bits=[[0.0] * 4] * 3)  # gates that sample anywhere in [0, 1]
    base = layer.weight.clone()
    model.eval()
    deployed = layer.delta_weight()
    model.train()
    layer.merge()
    torch.testing.assert_close(layer.weight, base + deployed, rtol=0, atol=1e-7)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, base, rtol=0, atol=1e-7)
    assert layer.training


def test_training_samples_gates_and_evaluation_is_deterministic():
    _, model, layer = adapted()
    set_logits(layer, rank=[0.0] * 3, bits=[[0.0] * 4] * 3)
    x = torch.randn(3, 6)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def test_gate_noise_is_the_layer_own_stream_and_resumes_from_its_saved_state():
    _, model, layer = adapted(r=3, seed=5)
    _, twin, twin_layer = adapted(r=3, seed=5)
    for m in (model, twin):
        set_logits(m[0], rank=[0.0] * 2, bits=[[0.0] * 4] * 3)
    x = torch.randn(3, 6)
    model.train(), twin.train()
    torch.randn(100)  # other draws from the global stream do not change a layer's gates
    first = model(x)
    torch.testing.assert_close(twin(x), first, rtol=0, atol=0)
    state = adapter_state_dict(model)
    second = model(x)
    _, fresh, _ = adapted(r=3, seed=5)  # the same base layer; everything else must come from the state
    with torch.no_grad():
        fresh[0].gate_seed.fill_(123)
        fresh[0].lora_E.add_(1.0)
    load_adapter_state_dict(fresh, state)
    torch.testing.assert_close(fresh.train()(x), second, rtol=0, atol=0)
    _, two, _ = adapted(r=3, seed=5)
    assert two[0].gate_seed == layer.gate_seed
    other = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 5))
    build_variant({"name": "bayesian_lora", "targets": ["0", "1"], "r": 3}).adapt(other, head=())
    assert other[0].gate_seed != other[1].gate_seed


@pytest.mark.parametrize("r", [1, 4])
def test_parameter_count_and_rank_one(r):
    variant, model, layer = adapted(r=r)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == variant.layer_params(6, 5) == r * (6 + 5 + 1) + (r - 1) + 12
    model.train()
    out = model(torch.randn(2, 6))
    (out.sum() + variant.aux_loss(model)).backward()
    assert torch.isfinite(layer.prior()) and variant.summary(model)["ranks"] == {"0": 1 if r == 1 else r}


def test_the_prior_alone_closes_every_gate_down_to_rank_1_and_2_bits():
    variant, model, layer = adapted(r=4, prior_weight=1.0)
    optimizer = torch.optim.Adam(variant.param_groups(model, 0.2)[1]["params"], lr=0.2)
    for _ in range(60):
        optimizer.zero_grad()
        variant.aux_loss(model).backward()
        optimizer.step()
    summary = variant.summary(model)
    assert summary["ranks"] == {"0": 1}
    assert summary["bits"] == {"0": {"A": 2, "E": 2, "B": 2}}


def test_gate_logits_train_without_weight_decay():
    variant, model, layer = adapted()
    groups = variant.param_groups(model, 1e-3)
    gates = next(g for g in groups if g.get("name") == "gates")
    assert gates["weight_decay"] == 0.0
    assert {id(p) for p in gates["params"]} == {id(layer.rank_logits), id(layer.bit_logits)}


@pytest.mark.parametrize("per_element", [False, True])
def test_gate_gradients_of_the_quantizer_node_match_finite_differences(per_element):
    x = torch.randn(12, dtype=torch.float64)
    shape = (4, 12) if per_element else (4,)
    gates = torch.rand(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_()
    beta = torch.full((12,), 2.5, dtype=torch.float64) if per_element else None
    assert torch.autograd.gradcheck(lambda g: quantize(x, g, beta), (gates,))
