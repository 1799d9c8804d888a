"""Comp-LoRA: the update lives in the complement of W0's top-k singular directions on both sides, before and after
training, so W0's top-k singular triplets survive; k = 0 is LoRA."""

from __future__ import annotations

import torch
from torch import nn

from lorafactory.variants import build_variant


def adapted(name="comp_lora", d_in=14, d_out=11, r=3, **cfg):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d_in, d_out)).double()
    W0 = model[0].weight.detach().clone()
    torch.manual_seed(1)
    build_variant({"name": name, "targets": ["0"], "r": r, **cfg}).adapt(model, head=())
    return model, W0


def train(model, steps=3):
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for step in range(steps):
        x = torch.randn(16, model[0].in_features, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
        model(x).sin().sum().backward()
        optimizer.step()
        optimizer.zero_grad()


def test_update_stays_off_the_top_singular_directions_and_keeps_their_triplets():
    model, W0 = adapted(k=4)
    layer = model[0]
    U, S, Vh = torch.linalg.svd(W0, full_matrices=False)
    Uk, Vk = U[:, :4], Vh[:4].t()
    train(model)  # Adam's elementwise steps move A, B off the complement; the projection must still hold
    dW = layer.delta_weight()
    assert dW.norm() > 1e-2
    assert (Uk.t() @ dW).abs().max() < 1e-12 and (dW @ Vk).abs().max() < 1e-12
    torch.testing.assert_close((layer.weight + dW) @ Vk, Uk * S[:4])  # W0 + ΔW maps v_i to σ_i u_i
    assert (layer.lora_A.detach() @ Vk).abs().max() > 1e-4  # (the raw factor did leave the complement)


def test_gradients_never_point_into_the_protected_directions():
    model, W0 = adapted(k=4)
    with torch.no_grad():
        model[0].lora_B.normal_()
    model(torch.randn(9, 14, dtype=torch.float64)).square().sum().backward()
    _, _, Vh = torch.linalg.svd(W0, full_matrices=False)
    grad = model[0].lora_A.grad
    assert (grad @ Vh[:4].t()).abs().max() < 1e-12 * grad.abs().max()


def test_k_is_cut_so_the_complement_holds_a_rank_r_update():
    model, _ = adapted(d_in=6, d_out=5, r=3, k=8)
    assert model[0].k == 2 and model[0].protect_out.shape == (5, 2) and model[0].protect_in.shape == (6, 2)


def test_k_zero_is_plain_lora():
    ours, _ = adapted(k=0)
    lora, _ = adapted("lora")
    with torch.no_grad():
        ours[0].lora_B.normal_(generator=torch.Generator().manual_seed(3))
        lora[0].lora_B.copy_(ours[0].lora_B)
    x = torch.randn(5, 14, dtype=torch.float64)
    torch.testing.assert_close(ours(x), lora(x))
