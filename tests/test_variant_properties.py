"""Each variant's own mathematical properties (VARIANTS.md, "Tests"), on single layers with known weights."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lorafactory.errors import ConfigError
from lorafactory.variants import build_variant


def layer(d_in: int = 48, d_out: int = 40, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, d_out))


def adapt(variant: str, model: nn.Module | None = None, **cfg) -> nn.Module:
    model = model if model is not None else layer()
    build_variant({"name": variant, "targets": ["0"], **cfg}).adapt(model)
    return model[0]


def test_lora_init_is_kaiming_a_and_zero_b():
    adapted = adapt("lora", r=8, alpha=16)
    assert torch.count_nonzero(adapted.lora_B) == 0
    bound = 1 / math.sqrt(adapted.in_features)  # kaiming_uniform(a=√5) = nn.Linear's default
    assert adapted.lora_A.abs().max() <= bound and adapted.lora_A.abs().max() > 0.9 * bound
    assert adapted.scaling == 2.0


def one_adam_step_update(variant: str, r: int) -> float:
    """‖ΔW‖ after one Adam step from init on a fixed regression problem (Adam's first step is lr·sign(grad))."""
    torch.manual_seed(0)
    model = layer(256, 256)
    adapted = adapt(variant, model, r=r, alpha=8)
    x, y = torch.randn(512, 256), torch.randn(512, 256)
    optimizer = torch.optim.Adam([adapted.lora_A, adapted.lora_B], lr=1e-3)
    nn.functional.mse_loss(model(x), y).backward()
    optimizer.step()
    return adapted.delta_weight().norm().item()


def test_rslora_update_size_does_not_collapse_with_rank_as_lora_does():
    lora = one_adam_step_update("lora", 4) / one_adam_step_update("lora", 64)
    rs = one_adam_step_update("rslora", 4) / one_adam_step_update("rslora", 64)
    assert lora == pytest.approx(4, rel=0.3)  # LoRA: ‖ΔW‖ ∝ s·√r = α/√r, 4× smaller at 16× the rank
    assert rs == pytest.approx(1, rel=0.3)  # rsLoRA: s = α/√r keeps it constant
    assert adapt("rslora", r=16, alpha=8).scaling == pytest.approx(8 / 4)


def test_dora_merged_rows_have_the_magnitude_as_norm():
    adapted = adapt("dora", r=4)
    torch.testing.assert_close(adapted.magnitude, adapted.base.weight.norm(dim=1))  # m = ‖W0‖_row at init
    with torch.no_grad():
        adapted.lora_B.normal_()
        adapted.magnitude.mul_(torch.linspace(0.5, 2.0, adapted.out_features))
    merged = adapted.base.weight + adapted.delta_weight()
    torch.testing.assert_close(merged.norm(dim=1), adapted.magnitude, rtol=1e-5, atol=1e-6)


def test_dora_norm_is_a_constant_for_backward():
    """With ‖·‖ detached, ∂L/∂B only sees the direction's numerator: the gradient equals that of
    y = (m / n₀) ⊙ (W0 + sBA) x with n₀ a fixed vector."""
    adapted = adapt("dora", r=4)
    with torch.no_grad():
        adapted.lora_B.normal_(std=0.1)
    x = torch.randn(5, adapted.in_features)
    adapted(x).pow(2).sum().backward()
    A, B = adapted.lora_A.detach(), adapted.lora_B.detach().clone().requires_grad_(True)
    W0, s, m = adapted.base.weight, adapted.scaling, adapted.magnitude.detach()
    n0 = (W0 + s * B @ A).norm(dim=1).detach()
    y = (m / n0) * (x @ (W0 + s * B @ A).t()) + adapted.base.bias
    y.pow(2).sum().backward()
    torch.testing.assert_close(adapted.lora_B.grad, B.grad, rtol=1e-4, atol=1e-6)


def test_dora_norm_from_rank_r_products_equals_the_dense_norm():
    adapted = adapt("dora", r=4)
    with torch.no_grad():
        adapted.lora_B.normal_()
    dense = (adapted.base.weight + adapted.scaling * adapted.lora_B @ adapted.lora_A).norm(dim=1)
    torch.testing.assert_close(adapted.weight_norm(), dense, rtol=1e-5, atol=1e-6)


def test_pissa_keeps_the_principal_part_in_the_adapter_and_the_tail_in_the_base():
    model = layer(48, 40)
    W0 = model[0].weight.detach().clone()
    adapted = adapt("pissa", model, r=6, alpha=3)
    U, S, Vh = torch.linalg.svd(W0, full_matrices=False)
    low_rank = adapted.scaling * adapted.lora_B @ adapted.lora_A
    torch.testing.assert_close(adapted.base.weight + low_rank, W0, atol=1e-5, rtol=1e-5)  # output unchanged
    torch.testing.assert_close(low_rank, U[:, :6] @ torch.diag(S[:6]) @ Vh[:6], atol=1e-5, rtol=1e-4)
    residual = torch.linalg.svdvals(adapted.base.weight)
    assert residual[0].item() == pytest.approx(S[6].item(), rel=1e-4)  # its top singular value is σ_{r+1}


def test_pissa_randomized_svd_is_close_to_the_exact_one():
    """On a weight whose spectrum decays, as pretrained weights' do, a few subspace iterations find the same
    principal part."""
    torch.manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(40, 40))
    V, _ = torch.linalg.qr(torch.randn(48, 40))
    decaying = U @ torch.diag(0.7 ** torch.arange(40.0)) @ V.t()
    exact, fast = layer(), layer()
    with torch.no_grad():
        exact[0].weight.copy_(decaying)
        fast[0].weight.copy_(decaying)
    exact, fast = adapt("pissa", exact, r=4), adapt("pissa", fast, r=4, niter=4)
    low = lambda a: a.scaling * a.lora_B @ a.lora_A  # noqa: E731
    assert (low(fast) - low(exact)).norm() / low(exact).norm() < 1e-3


def test_pissa_rank_beyond_the_weight_is_a_config_error():
    with pytest.raises(ConfigError, match="variant.r=64 exceeds the rank of a 40×48 weight"):
        adapt("pissa", r=64)


def test_loraplus_gives_b_the_ratio_times_the_learning_rate():
    model = layer()
    variant = build_variant({"name": "loraplus", "targets": ["0"], "lr_ratio": 8})
    variant.adapt(model)
    model[0].base.bias.requires_grad_(True)  # a trainable non-adapter parameter (like a head) keeps the base rate
    groups = variant.param_groups(model, 1e-3)
    lrs = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert lrs[id(model[0].lora_B)] == pytest.approx(8e-3)
    assert lrs[id(model[0].lora_A)] == lrs[id(model[0].base.bias)] == pytest.approx(1e-3)
    assert len(lrs) == 3


def test_pissa_state_taken_while_merged_loads_the_same():
    """The residual W_res is what a saved PiSSA state must hold; taken while merged, the base weight holds
    W_res + s·BA, and a fresh model would add s·BA twice."""
    from lorafactory.variants import adapter_state_dict, load_adapter_state_dict, merge_adapters

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 20))
    build_variant({"name": "pissa", "targets": ["0"], "r": 4}).adapt(model)
    with torch.no_grad():
        model[0].lora_B.add_(0.1)
    x = torch.randn(5, 24)
    expected = model(x)
    unmerged_state = adapter_state_dict(model)
    merge_adapters(model)
    merged_state = adapter_state_dict(model)
    for key in unmerged_state:
        torch.testing.assert_close(merged_state[key], unmerged_state[key], atol=1e-6, rtol=1e-6, msg=key)
    torch.manual_seed(1)
    fresh = nn.Sequential(nn.Linear(24, 20))
    fresh.load_state_dict({"0.weight": torch.zeros(20, 24), "0.bias": model[0].base.bias.detach()})
    build_variant({"name": "pissa", "targets": ["0"], "r": 4}).adapt(fresh)
    load_adapter_state_dict(fresh, merged_state)
    torch.testing.assert_close(fresh(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["lora", "dora", "pissa"])
def test_merge_round_trip_keeps_float64_precision(variant):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 24)).double()
    build_variant({"name": variant, "targets": ["0"], "r": 4}).adapt(model)
    layer = model[0]
    with torch.no_grad():
        layer.lora_B.normal_()
    before = layer.base.weight.detach().clone()
    layer.merge()
    layer.unmerge()
    assert (layer.base.weight - before).abs().max() < 1e-12  # float32 arithmetic would leave ~1e-7
