"""LoRA-GGPO: noise in the training forward only, with the prescribed per-row scale; eval is LoRA; gradient norms from
r-sized products; the backward draws the same noise; resume from a checkpoint."""

from __future__ import annotations

import copy
import math

import torch
from conftest import batch_for, tiny
from torch import nn

from lorafactory.models import unfreeze
from lorafactory.variants import adapter_state_dict, build_variant, load_adapter_state_dict


def single(d_in=12, d_out=10, r=3, seed=0, **cfg):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d_in, d_out)).double()
    variant = build_variant({"name": "lora_ggpo", "targets": ["0"], "r": r, "alpha": 6, **cfg})
    variant.adapt(model, head=())
    with torch.no_grad():
        model[0].lora_B.normal_(std=0.3)
    return variant, model


def lora_output(layer, x):
    return nn.functional.linear(x, layer.weight + layer.delta_weight(), layer.bias)


def record_gradient_norms(variant, model, x):
    model(x).square().sum().backward()
    variant.on_before_optimizer_step(model, None)
    model.zero_grad()


def test_gradient_norm_is_the_row_norm_of_the_equivalent_gradient():
    variant, model = single()
    layer = model[0]
    model(torch.randn(7, 12, dtype=torch.float64)).square().sum().backward()
    variant.on_before_optimizer_step(model, None)
    A, B, s = layer.lora_A, layer.lora_B, layer.scaling
    dense = s * (B @ A.grad + B.grad @ A)
    torch.testing.assert_close(layer.grad_norm, dense.norm(dim=1).detach())


def test_training_perturbs_only_after_a_gradient_and_eval_is_lora():
    variant, model = single()
    layer, x = model[0], torch.randn(7, 12, dtype=torch.float64)
    expected = lora_output(layer, x)
    torch.testing.assert_close(model.train()(x), expected)  # no gradient norm yet: LoRA
    record_gradient_norms(variant, model, x)
    assert (model.train()(x) - expected).abs().max() > 1e-3
    torch.testing.assert_close(model.eval()(x), expected)
    torch.testing.assert_close(model.eval()(x), expected)  # deterministic

    quiet, quiet_model = single(sigma=0.0, beta=0.0)
    record_gradient_norms(quiet, quiet_model, x)
    torch.testing.assert_close(quiet_model.train()(x), lora_output(quiet_model[0], x))


def test_noise_has_the_prescribed_per_row_scale():
    """With x = I the training output minus LoRA's is Eᵀ: row i of E has std (σ‖W'_i‖ + β‖∇W'_i‖²)/√d_out."""
    d_in, d_out = 3000, 20
    variant, model = single(d_in=d_in, d_out=d_out, sigma=0.05, beta=0.5)
    layer = model[0]
    record_gradient_norms(variant, model, torch.randn(5, d_in, dtype=torch.float64))
    eye = torch.eye(d_in, dtype=torch.float64)
    E = (model.train()(eye) - lora_output(layer, eye)).t().detach()
    merged = (layer.weight + layer.delta_weight()).detach()
    scale = (0.05 * merged.norm(dim=1) + 0.5 * layer.grad_norm.square()) / math.sqrt(d_out)
    assert layer.grad_norm.min() > 0.1  # the β term matters in this check
    torch.testing.assert_close(E.std(dim=1), scale, rtol=0.06, atol=0)
    assert E.mean(dim=1).abs().max() < 4 * scale.max() / math.sqrt(d_in)


def test_backward_uses_the_noise_of_the_forward_and_leaves_lora_gradients_unbiased():
    """∂L/∂x goes through W' + E (the same E the forward drew); for a loss linear in y the gradients of A and B do not
    see the noise at all."""
    variant, model = single()
    layer = model[0]
    record_gradient_norms(variant, model, torch.randn(5, 12, dtype=torch.float64))
    x = torch.eye(12, dtype=torch.float64, requires_grad=True)
    R = torch.randn(12, 10, dtype=torch.float64)
    y = model.train()(x)
    (y * R).sum().backward()
    E = (y - lora_output(layer, x)).t().detach()
    torch.testing.assert_close(x.grad, R @ (layer.weight + layer.delta_weight() + E).detach())

    grads = (layer.lora_A.grad.clone(), layer.lora_B.grad.clone())
    model.zero_grad()
    (model.eval()(x) * R).sum().backward()
    torch.testing.assert_close(grads, (layer.lora_A.grad, layer.lora_B.grad))


def test_noise_is_reproducible_from_the_seed():
    variant, model = single()
    x = torch.randn(7, 12, dtype=torch.float64)
    record_gradient_norms(variant, model, x)
    outputs = []
    for _ in range(2):
        torch.manual_seed(3)
        outputs.append(model.train()(x))
    torch.testing.assert_close(outputs[0], outputs[1])


def test_convolutions_and_dropout_are_perturbed_in_training_too():
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1))
    variant = build_variant({"name": "lora_ggpo", "targets": ["0"], "r": 2})
    variant.adapt(conv, head=())
    x = torch.randn(2, 3, 6, 6)
    conv(x).square().sum().backward()
    variant.on_before_optimizer_step(conv, None)
    assert not torch.allclose(conv.train()(x), conv.eval()(x))

    variant, model = single(dropout=0.1)
    x = torch.randn(7, 12, dtype=torch.float64)
    record_gradient_norms(variant, model, x)
    model[0].dropout.p = 0.0  # the dropout branch, without its own randomness
    assert (model.train()(x) - lora_output(model[0], x)).abs().max() > 1e-3


def test_resuming_from_a_checkpoint_continues_the_uninterrupted_run():
    """The gradient norms travel with the adapter state, so a resumed run perturbs as the uninterrupted one."""

    def fresh(seed):
        loaded = tiny("tiny-bert")
        torch.manual_seed(seed)
        variant = build_variant({"name": "lora_ggpo", "targets": "all-linear", "r": 4})
        variant.adapt(loaded.module, head=loaded.head)
        unfreeze(loaded.module, loaded.head)
        params = [p for p in loaded.module.parameters() if p.requires_grad]
        return variant, loaded, torch.optim.AdamW(params, lr=1e-2)

    def steps(variant, loaded, optimizer, batches):
        for batch in batches:
            loaded.module.train()(**batch).loss.backward()
            variant.on_before_optimizer_step(loaded.module, optimizer)
            optimizer.step()
            optimizer.zero_grad()

    variant, loaded, optimizer = fresh(0)
    batches = [batch_for(loaded, batch_size=4, seed=i) for i in range(5)]
    steps(variant, loaded, optimizer, batches[:2])
    checkpoint = copy.deepcopy({"model": adapter_state_dict(loaded.module), "optim": optimizer.state_dict()})
    assert any(key.endswith("grad_norm") for key in checkpoint["model"])
    torch.manual_seed(1)  # the same noise (and attention dropout) after the checkpoint in both runs
    steps(variant, loaded, optimizer, batches[2:])

    variant2, loaded2, optimizer2 = fresh(123)
    load_adapter_state_dict(loaded2.module, checkpoint["model"])
    optimizer2.load_state_dict(checkpoint["optim"])
    torch.manual_seed(1)
    steps(variant2, loaded2, optimizer2, batches[2:])
    resumed = adapter_state_dict(loaded2.module)
    for key, value in adapter_state_dict(loaded.module).items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-6, atol=1e-6, msg=key)
