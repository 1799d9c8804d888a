"""LoRA-Squeeze: the squeeze is the Eckart–Young truncation (and exact when it keeps the rank), the output error bound,
Post-Squeeze at the end, In-Squeeze phases mid-run (new parameters, a new optimizer), loading and resuming."""

from __future__ import annotations

import pytest
import torch
from test_adalora import assert_same_run, toy, train
from torch import nn

from lorafactory.variants import adapter_parameters, adapter_state_dict, build_variant, load_adapter_state_dict
from lorafactory.variants.base import count_trainable
from lorafactory.variants.lora_squeeze import truncated_svd


def squeezable(d_in: int = 20, d_out: int = 14, r: int = 8, alpha: float = 8.0) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d_in, d_out)).double()
    build_variant({"name": "lora_squeeze", "targets": ["0"], "r": 2, "source_r": r, "alpha": alpha}).adapt(model)
    with torch.no_grad():
        model[0].lora_B.normal_()
    return model[0]


def test_squeeze_is_the_eckart_young_truncation_of_the_update():
    layer = squeezable()
    delta = layer.delta_weight().detach()
    U, S, Vh = torch.linalg.svd(delta)
    layer.squeeze(3)
    assert layer.r == 3 and layer.lora_A.shape == (3, 20) and layer.scaling == 8.0 / 3
    best = U[:, :3] @ torch.diag(S[:3]) @ Vh[:3]
    torch.testing.assert_close(layer.delta_weight(), best, atol=1e-10, rtol=1e-10)
    error = torch.linalg.matrix_norm(layer.delta_weight() - delta)
    torch.testing.assert_close(error, S[3:].square().sum().sqrt())  # the smallest error any rank-3 matrix makes
    torch.testing.assert_close(layer.lora_A @ layer.lora_A.t(), layer.lora_B.t() @ layer.lora_B)  # Σ split evenly


def test_squeeze_is_exact_when_the_target_rank_covers_the_update():
    layer = squeezable(r=4)
    delta = layer.delta_weight().detach()
    layer.squeeze(6)  # rank(ΔW) = 4: all of it is kept
    assert layer.r == 4
    torch.testing.assert_close(layer.delta_weight(), delta, atol=1e-10, rtol=1e-10)


def test_qr_route_equals_the_dense_svd_for_a_wide_rank():
    """r_src above both dimensions: the QR factors are rectangular, the result still the top triplets of B A."""
    torch.manual_seed(1)
    A, B = torch.randn(12, 5, dtype=torch.float64), torch.randn(4, 12, dtype=torch.float64)
    U, S, V = truncated_svd(A, B, 3)
    torch.testing.assert_close(S, torch.linalg.svdvals(B @ A)[:3])
    torch.testing.assert_close(U @ torch.diag(S) @ V.t(), torch.linalg.svd(B @ A)[0][:, :3] @ torch.diag(S) @ (
        torch.linalg.svd(B @ A)[2][:3]
    ))  # fmt: skip
    assert truncated_svd(A, B, 9)[1].numel() == 4  # never more than the rank of a 4 × 5 update


def test_outputs_move_at_most_by_the_first_dropped_singular_value():
    layer = squeezable()
    sigma = torch.linalg.svdvals(layer.delta_weight().detach())
    x = torch.randn(50, 20, dtype=torch.float64)
    before = layer(x).detach()
    layer.squeeze(2)
    moved = (layer(x) - before).norm(dim=1)
    assert (moved <= sigma[2] * x.norm(dim=1) * (1 + 1e-9)).all()


def test_post_squeeze_leaves_the_deployment_rank_and_records_it():
    variant, model, _ = train("lora_squeeze", 3, r=2, source_r=8)
    assert [layer.r for layer in (model[0], model[2])] == [2, 2]
    assert count_trainable(adapter_parameters(model)) == 2 * (16 + 12) + 2 * (12 + 8)
    summary = variant.summary(model)
    assert summary["ranks"] == {"0": 2, "2": 2}
    assert summary["phases"] == [] and summary["post_squeeze"] == {"from": 8, "to": 2}


def test_in_squeeze_anneals_the_rank_with_new_parameters_and_records_every_phase():
    ranks, held = [], []

    def record(variant, model, optimizer):
        ranks.append(model[0].r)
        held.append({id(p) for g in optimizer.param_groups for p in g["params"]} >= {id(model[0].lora_A)})

    variant, model, _ = train("lora_squeeze", 8, each_step=record, r=2, source_r=8, squeeze_every=2)
    assert ranks == [8, 4, 4, 2, 2, 2, 2, 2] and all(held)
    summary = variant.summary(model)
    assert summary["phases"] == [{"step": 2, "rank": 4}, {"step": 4, "rank": 2}]
    assert summary["post_squeeze"] == {"from": 2, "to": 2}


def test_cont_squeeze_goes_straight_to_the_deployment_rank():
    variant, model, _ = train("lora_squeeze", 4, r=2, source_r=8, squeeze_every=3, squeeze_factor=0.0)
    assert variant.summary(model)["phases"] == [{"step": 3, "rank": 2}]


def test_a_squeezed_adapter_loads_into_a_freshly_adapted_model():
    _, model, _ = train("lora_squeeze", 3, r=2, source_r=8)
    _, fresh = toy("lora_squeeze", adapter_seed=5, r=2, source_r=8)
    load_adapter_state_dict(fresh, adapter_state_dict(model))
    assert (fresh[0].r, fresh[0].scaling) == (2, 16.0 / 2)
    x = torch.randn(4, 16)
    torch.testing.assert_close(fresh(x), model(x))


@pytest.mark.parametrize("resume_at", [3, 5])  # between two squeezes; after the last
def test_resuming_mid_annealing_continues_identically(resume_at):
    settings = {"r": 2, "source_r": 8, "squeeze_every": 2}
    assert_same_run(train("lora_squeeze", 8, **settings), train("lora_squeeze", 8, resume_at=resume_at, **settings))
