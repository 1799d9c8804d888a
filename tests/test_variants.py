"""The variant contract (DESIGN.md), checked for every registered variant on tiny BERT, Llama and ViT models."""

from __future__ import annotations

import copy
import math
import sys

import pytest
import torch
from conftest import TINY_MODELS, batch_for, tiny

import lorafactory.variants.lora as lora_module
from lorafactory.models import unfreeze
from lorafactory.variants import (
    VARIANTS,
    AdapterLayer,
    adapter_layers,
    adapter_parameters,
    adapter_state_dict,
    build_variant,
    load_adapter_state_dict,
    merge_adapters,
    merge_and_unload,
    unmerge_adapters,
)
from lorafactory.variants.base import TAXONOMY, count_trainable

CASES = [(v, m, t) for v in VARIANTS.names() for m in TINY_MODELS for t in ("attn", "all-linear")]
IDS = [f"{v}-{m}-{t}" for v, m, t in CASES]


def adapted(variant: str, model: str, targets: str = "all-linear", seed: int = 0, **cfg):
    loaded = tiny(model)
    base = copy.deepcopy(loaded.module).eval()
    torch.manual_seed(seed)
    v = build_variant({"name": variant, "targets": targets, "r": 4, **cfg})
    v.adapt(loaded.module, head=loaded.head)
    return v, loaded, base


def perturb(model: torch.nn.Module, seed: int = 1) -> None:
    """Move every adapter parameter off its initial value, so ΔW ≠ 0 (the interesting case for merge and save)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model):
            p.add_(0.1 * torch.randn(p.shape, generator=g) * (p.abs().mean() + 0.1))


def logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("name", VARIANTS.names())
def test_declares_metadata(name):
    cls = VARIANTS.get(name)
    assert cls.name == name
    assert cls.taxonomy in TAXONOMY
    assert "arXiv" in cls.paper
    assert cls.params_formula
    module_doc = sys.modules[cls.__module__].__doc__ or ""
    assert "arXiv" in module_doc, "the variant's docstring names its paper"
    assert "update rule" in module_doc.lower(), "the variant's docstring gives its update rule"


@pytest.mark.parametrize(("variant", "model", "targets"), CASES, ids=IDS)
def test_only_adapter_parameters_train(variant, model, targets):
    v, loaded, _ = adapted(variant, model, targets)
    trainable = {id(p) for p in loaded.module.parameters() if p.requires_grad}
    adapters = {id(p) for p in adapter_parameters(loaded.module) if p.requires_grad}
    assert trainable and trainable == adapters
    assert adapter_layers(loaded.module), "no layer was adapted"
    for layer in adapter_layers(loaded.module):
        assert not any(p.requires_grad for p in layer.base.parameters())


@pytest.mark.parametrize(("variant", "model", "targets"), CASES, ids=IDS)
def test_trainable_count_matches_formula(variant, model, targets):
    v, loaded, _ = adapted(variant, model, targets)
    assert count_trainable(adapter_parameters(loaded.module)) == v.expected_params(loaded.module)


@pytest.mark.parametrize(("variant", "model"), [(v, m) for v in VARIANTS.names() for m in TINY_MODELS])
def test_zero_init_output_equals_base(variant, model):
    v, loaded, base = adapted(variant, model)
    if not v.zero_init:
        pytest.skip(f"{variant} does not start at the base model")
    batch = batch_for(loaded)
    torch.testing.assert_close(logits(loaded.module.eval(), batch), logits(base, batch), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("variant", "model"), [(v, m) for v in VARIANTS.names() for m in TINY_MODELS])
def test_optimizer_step_changes_only_adapter_parameters(variant, model):
    v, loaded, _ = adapted(variant, model)
    model_ = loaded.module.train()
    before = {n: p.detach().clone() for n, p in model_.named_parameters()}
    adapter_ids = {id(p) for p in adapter_parameters(model_)}
    optimizer = torch.optim.AdamW([p for p in model_.parameters() if p.requires_grad], lr=1e-2)
    model_(**batch_for(loaded)).loss.backward()
    optimizer.step()
    changed = {n for n, p in model_.named_parameters() if not torch.equal(p, before[n])}
    names = {id(p): n for n, p in model_.named_parameters()}
    assert changed, "nothing moved"
    assert changed <= {names[i] for i in adapter_ids}


@pytest.mark.parametrize(("variant", "model", "targets"), CASES, ids=IDS)
def test_merge_matches_unmerged_and_unmerge_restores(variant, model, targets):
    v, loaded, _ = adapted(variant, model, targets)
    if not v.mergeable:
        pytest.skip("not mergeable")
    model_ = loaded.module.eval()
    perturb(model_)
    batch = batch_for(loaded)
    base_weights = {id(layer): layer.base.weight.detach().clone() for layer in adapter_layers(model_)}
    expected = logits(model_, batch)
    merge_adapters(model_)
    assert all(layer.merged for layer in adapter_layers(model_))
    torch.testing.assert_close(logits(model_, batch), expected, atol=1e-5, rtol=1e-4)
    unmerge_adapters(model_)
    for layer in adapter_layers(model_):
        torch.testing.assert_close(layer.base.weight, base_weights[id(layer)], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(logits(model_, batch), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS.names())
def test_merge_and_unload_leaves_plain_linears(variant):
    v, loaded, _ = adapted(variant, "tiny-bert")
    if not v.mergeable:
        pytest.skip("not mergeable")
    model_ = loaded.module.eval()
    perturb(model_)
    batch = batch_for(loaded)
    expected = logits(model_, batch)
    merge_and_unload(model_)
    assert not any(isinstance(m, AdapterLayer) for m in model_.modules())
    torch.testing.assert_close(logits(model_, batch), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("variant", "model"), [(v, m) for v in VARIANTS.names() for m in TINY_MODELS])
def test_adapter_state_round_trips_into_a_fresh_model(variant, model):
    v, loaded, _ = adapted(variant, model, seed=0)
    unfreeze(loaded.module, loaded.head)
    perturb(loaded.module)
    with torch.no_grad():  # the head is part of what a run trains, so part of what it saves
        for name in loaded.head:
            for p in loaded.module.get_submodule(name).parameters():
                p.add_(0.05)
    state = adapter_state_dict(loaded.module)
    batch = batch_for(loaded)
    expected = logits(loaded.module.eval(), batch)

    _, fresh, _ = adapted(variant, model, seed=123)  # different adapter init: everything must come from `state`
    load_adapter_state_dict(fresh.module, state)
    torch.testing.assert_close(logits(fresh.module.eval(), batch), expected, atol=1e-6, rtol=1e-6)


def train_steps(variant: str, model: str, lr: float, steps: int = 25) -> list[float]:
    """Memorise one fixed batch for a few steps, calling every hook as the training loop does; the losses."""
    v, loaded, _ = adapted(variant, model, seed=0)
    unfreeze(loaded.module, loaded.head)
    model_ = loaded.module.train()
    batch = batch_for(loaded, batch_size=8, seed=3)
    lr = lr * v.cfg.lr_mult
    groups = v.param_groups(model_, lr) or [{"params": [p for p in model_.parameters() if p.requires_grad]}]
    optimizer = v.build_optimizer(groups, None) or torch.optim.AdamW(groups, lr=lr)
    losses = []
    for step in range(steps):
        loss = model_(**batch).loss
        aux = v.aux_loss(model_)
        (loss if aux is None else loss + aux).backward()
        v.on_after_backward(model_)
        v.on_before_optimizer_step(model_, optimizer)
        optimizer.step()
        v.on_train_batch_end(model_, step + 1)
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize(("variant", "model"), [(v, m) for v in VARIANTS.names() for m in TINY_MODELS])
def test_a_few_steps_lower_the_loss(variant, model):
    """Some learning rate of a small grid (around the variant's own default) halves the loss on a fixed batch:
    variants differ in their best learning rate, which is the point of sweeping it."""
    tried = {}
    for lr in (3e-3, 1e-2, 3e-2):
        losses = train_steps(variant, model, lr)
        tried[lr] = (round(losses[0], 3), round(losses[-1], 3))
        if losses[-1] < 0.5 * losses[0]:
            return
    pytest.fail(f"loss did not halve at any learning rate: {tried}")


@pytest.mark.parametrize("variant", VARIANTS.names())
def test_train_and_eval_compute_the_same_function(variant):
    v, loaded, _ = adapted(variant, "tiny-bert")
    perturb(loaded.module)
    model_ = loaded.module
    # Dropout in the base model is the base model's business; switch it off to compare the adapters alone.
    for m in model_.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    batch = batch_for(loaded)
    torch.testing.assert_close(logits(model_.train(), batch), logits(model_.eval(), batch))


@pytest.mark.parametrize("variant", VARIANTS.names())
def test_merged_weight_and_two_branch_forms_agree(variant, monkeypatch):
    """Layers may compute with the merged weight (many tokens) or with two branches (few); outputs and gradients
    of every trainable parameter must agree between the two."""
    results = []
    for threshold in (0.0, math.inf):
        monkeypatch.setattr(lora_module, "MERGE_THRESHOLD", threshold)
        v, loaded, _ = adapted(variant, "tiny-llama")
        model_ = loaded.module.double().train()
        perturb(model_)
        out = model_(**batch_for(loaded))
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model_.named_parameters() if p.requires_grad}
        results.append((out.logits.detach(), grads))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l0, l1, atol=1e-10, rtol=1e-9)
    assert g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g0[name], g1[name], atol=1e-10, rtol=1e-8, msg=name)


def test_targets_presets_select_the_expected_modules():
    v, loaded, _ = adapted("lora", "tiny-bert", targets="attn")
    names = [n for n, m in loaded.module.named_modules() if isinstance(m, AdapterLayer)]
    assert names and all(n.endswith(("query", "value")) for n in names)
    v, loaded, _ = adapted("lora", "tiny-llama", targets="all-linear")
    leaves = {n.rsplit(".", 1)[-1] for n, m in loaded.module.named_modules() if isinstance(m, AdapterLayer)}
    assert leaves == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert "score" not in leaves  # the head is trained in full, never adapted
