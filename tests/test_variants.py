"""The variant contract (DESIGN.md), checked for every registered variant on tiny BERT, Llama and ViT models."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODELS, batch_for, contract_config, targets_for, tiny
from omegaconf import OmegaConf

import lorafactory.variants.lora as lora_module
from lorafactory.errors import ConfigError
from lorafactory.models import unfreeze
from lorafactory.training.optim import build_optimizer, carry_over_state
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


def model_targets(variant: str, model: str) -> tuple[str, ...]:
    """The presets a variant is tested with on a model: a variant whose update is not a weight cannot adapt k×k
    convolutions (see `test_unmergeable_variants_refuse_kxk_convolutions`), so on conv nets it gets the 1×1 ones."""
    narrow, wide = targets_for(model)
    if wide == "all-conv" and not VARIANTS.get(variant).mergeable:
        return (narrow,)
    return (narrow, wide)


CASES = [(v, m, t) for v in VARIANTS.names() for m in TINY_MODELS for t in model_targets(v, m)]
IDS = [f"{v}-{m}-{t}" for v, m, t in CASES]
PAIRS = [(v, m) for v in VARIANTS.names() for m in TINY_MODELS]


def adapted(variant: str, model: str, targets: str | None = None, seed: int = 0, **cfg):
    targets = targets or model_targets(variant, model)[-1]
    extra = contract_config(variant, model, targets, 4)  # icm_lora's generator
    loaded = tiny(model)
    base = copy.deepcopy(loaded.module).eval()
    torch.manual_seed(seed)
    v = build_variant({"name": variant, "targets": targets, "r": 4, **extra, **cfg})
    v.adapt(loaded.module, head=loaded.head)
    return v, loaded, base


def perturb(model: torch.nn.Module, seed: int = 1, params=None) -> None:
    """Move every adapter parameter off its initial value, so ΔW ≠ 0 (the interesting case for merge and save)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model) if params is None else params:
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
    adapters = {id(p) for p in v.trained_parameters(loaded.module) if p.requires_grad}
    assert trainable == adapters
    if v.taxonomy == "baseline":
        return  # full fine-tuning and the linear probe adapt no layer (the head is unfrozen by the recipe)
    assert trainable and adapter_layers(loaded.module), "no layer was adapted"
    for layer in adapter_layers(loaded.module):
        assert not any(p.requires_grad for p in layer.base.parameters())


@pytest.mark.parametrize(("variant", "model", "targets"), CASES, ids=IDS)
def test_trainable_count_matches_formula(variant, model, targets):
    v, loaded, _ = adapted(variant, model, targets)
    assert count_trainable(v.trained_parameters(loaded.module)) == v.expected_params(loaded.module)


@pytest.mark.parametrize(("variant", "model"), PAIRS)
def test_zero_init_output_equals_base(variant, model):
    v, loaded, base = adapted(variant, model)
    if not v.zero_init:
        pytest.skip(f"{variant} does not start at the base model")
    batch = batch_for(loaded)
    torch.testing.assert_close(logits(loaded.module.eval(), batch), logits(base, batch), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("variant", "model"), PAIRS)
def test_optimizer_step_changes_only_adapter_parameters(variant, model):
    v, loaded, _ = adapted(variant, model)
    model_ = loaded.module.train()
    before = {n: p.detach().clone() for n, p in model_.named_parameters()}
    adapter_ids = {id(p) for p in v.trained_parameters(model_)}
    if not adapter_ids:  # the linear probe: only the head trains, and the recipe unfreezes it
        assert not any(p.requires_grad for p in model_.parameters())
        return
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


@pytest.mark.parametrize(("variant", "model"), PAIRS)
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


OPTIM = OmegaConf.create(
    {
        "lr": 1e-2,
        "weight_decay": 0.0,
        "optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True, "betas": [0.9, 0.999], "eps": 1e-8},
    }
)


def make_optimizer(v, model_: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """The training recipe's optimizer: the variant's groups and the head's, under its own optimizer or AdamW."""
    cfg = OPTIM.copy()
    cfg.lr = lr
    return build_optimizer(cfg, v, model_)


def train_steps(variant: str, model: str, lr: float, steps: int = 25) -> list[float]:
    """Memorise one fixed batch for a few steps, calling every hook as the training loop does; the losses."""
    v, loaded, _ = adapted(variant, model, seed=0)
    unfreeze(loaded.module, loaded.head)
    model_ = loaded.module.train()
    batch = batch_for(loaded, batch_size=8, seed=3)
    lr = lr * v.cfg.lr_mult
    v.init_from_data(model_, iter([batch] * 1000), lambda m, b: m(**b).loss)
    optimizer = make_optimizer(v, model_, lr)
    losses = []
    for step in range(steps):
        loss = model_(**batch).loss
        aux = v.aux_loss(model_)
        (loss if aux is None else loss + aux).backward()
        v.on_after_backward(model_)
        v.on_before_optimizer_step(model_, optimizer)
        optimizer.step()
        optimizer.zero_grad()
        if v.on_train_batch_end(model_, step + 1):
            new = make_optimizer(v, model_, lr)
            carry_over_state(optimizer, new)
            optimizer = new
        losses.append(loss.item())
    v.on_train_end(model_)
    return losses


@pytest.mark.parametrize(("variant", "model"), PAIRS)
def test_a_few_steps_lower_the_loss(variant, model):
    """Some learning rate of a small grid (around the variant's own default) halves the loss on a fixed batch:
    variants differ in their best learning rate, which is the point of sweeping it."""
    # A linear probe on a tiny random model's features cannot memorise arbitrary labels (tiny-vit's eight images stop
    # near 0.6 nats whatever the rate): the head alone must cut the loss by a quarter, at a linear probe's rates.
    probe = VARIANTS.get(variant).taxonomy == "baseline" and VARIANTS.get(variant).params_formula == "0"
    grid, target = ((1e-2, 3e-2, 1e-1), 0.75) if probe else ((3e-3, 1e-2, 3e-2, 1e-1), 0.5)
    tried = {}
    for lr in grid:
        losses = train_steps(variant, model, lr)
        tried[lr] = (round(losses[0], 3), round(losses[-1], 3))
        if losses[-1] < target * losses[0]:
            return
    pytest.fail(f"loss did not fall to {target}× at any learning rate: {tried}")


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
    if VARIANTS.get(variant).noisy_training:  # the training forward perturbs by design: evaluation must be stable
        torch.testing.assert_close(logits(model_.eval(), batch), logits(model_.eval(), batch))
        return
    torch.testing.assert_close(logits(model_.train(), batch), logits(model_.eval(), batch))


ADAPTERS = [n for n in VARIANTS.names() if VARIANTS.get(n).taxonomy != "baseline"]


@pytest.mark.parametrize("variant", ADAPTERS)
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


@pytest.mark.parametrize(("variant", "model"), PAIRS)
def test_every_trainable_parameter_gets_a_gradient(variant, model):
    """Every trainable parameter gets a non-zero gradient once the adapter is off its initial point (at LoRA's init,
    B = 0 makes A's gradient exactly 0): a parameter that never gets one is dead weight in the count, or a bug."""
    v, loaded, _ = adapted(variant, model)
    unfreeze(loaded.module, loaded.head)
    model_ = loaded.module.train()
    batch = batch_for(loaded, batch_size=4)
    v.init_from_data(model_, iter([batch] * 1000), lambda m, b: m(**b).loss)
    perturb(model_)
    loss = model_(**batch).loss
    aux = v.aux_loss(model_)
    (loss if aux is None else loss + aux).backward()
    v.on_after_backward(model_)
    dead = [n for n, p in model_.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not dead, f"no gradient reached {dead[:5]}"


@pytest.mark.parametrize(("variant", "model"), PAIRS)
def test_bf16_autocast_training_gives_the_fp32_gradients_to_bf16_precision(variant, model, monkeypatch):
    """`trainer.precision=bf16-mixed` (the GPU default) runs the forward under autocast and the backward outside it:
    custom autograd functions must compute their backward in the forward's precision, and every gradient must be
    that of fp32 training up to bf16 round-off (direction kept), of the parameter's own dtype."""
    monkeypatch.setattr(lora_module, "MERGE_THRESHOLD", 0.0)  # the merged-weight paths, where there are any
    v, loaded, _ = adapted(variant, model)
    unfreeze(loaded.module, loaded.head)
    model_ = loaded.module.train()
    for m in model_.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    batch = batch_for(loaded, batch_size=4)
    v.init_from_data(model_, iter([batch] * 1000), lambda m, b: m(**b).loss)
    perturb(model_)
    grads = []
    for bf16 in (False, True):
        model_.zero_grad()
        torch.manual_seed(0)  # variants that draw in their forward draw alike
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model_(**batch).loss
        loss.backward()
        params = [p for p in model_.parameters() if p.requires_grad and p.grad is not None]
        assert all(p.grad.dtype == p.dtype for p in params)
        grads.append(torch.cat([p.grad.flatten() for p in params]))
    fp32, bf16 = grads
    assert torch.isfinite(bf16).all()
    assert torch.nn.functional.cosine_similarity(fp32, bf16, dim=0) > 0.95


@pytest.mark.parametrize("variant", [v for v in VARIANTS.names() if not VARIANTS.get(v).mergeable])
def test_unmergeable_variants_refuse_kxk_convolutions(variant):
    with pytest.raises(ConfigError, match=f"variant={variant} cannot adapt the k×k convolution 'stem'"):
        adapted(variant, "tiny-cnn", targets="all-conv")


@pytest.mark.parametrize("variant", [v for v in VARIANTS.names() if VARIANTS.get(v).taxonomy != "baseline"])
def test_a_pointwise_convolution_is_adapted_as_its_equivalent_linear(variant):
    """The weight view: a 1×1 convolution adapted by a variant computes what the same variant computes on the linear
    layer with the same weights, on every pixel, with the same gradients."""
    torch.manual_seed(0)
    conv = torch.nn.Sequential(torch.nn.Conv2d(12, 10, 1))
    linear = torch.nn.Sequential(torch.nn.Linear(12, 10))
    with torch.no_grad():
        linear[0].weight.copy_(conv[0].weight.view(10, 12))
        linear[0].bias.copy_(conv[0].bias)
    for model_ in (conv, linear):
        torch.manual_seed(1)
        build_variant({"name": variant, "targets": ["0"], "r": 4}).adapt(model_, head=())
        perturb(model_)
    x = torch.randn(2, 12, 5, 3)
    out_conv = conv(x)
    out_linear = linear(x.movedim(1, -1)).movedim(-1, 1)
    torch.testing.assert_close(out_conv, out_linear, atol=1e-6, rtol=1e-5)
    out_conv.square().sum().backward()
    out_linear.square().sum().backward()
    for (name, p), q in zip(conv.named_parameters(), linear.parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_depthwise_convolutions_are_opt_in_by_name():
    _, loaded, _ = adapted("lora", "tiny-cnn", targets="all-conv")
    assert "depthwise" not in {n for n, m in loaded.module.named_modules() if isinstance(m, AdapterLayer)}
    _, loaded, _ = adapted("lora", "tiny-cnn", targets=["depthwise"])
    layer = loaded.module.depthwise
    assert isinstance(layer, AdapterLayer) and layer.weight.shape == (16, 9)  # (channels, 1·3·3)
    perturb(loaded.module)
    batch = batch_for(loaded)
    expected = logits(loaded.module.eval(), batch)
    merge_adapters(loaded.module)
    torch.testing.assert_close(logits(loaded.module, batch), expected, atol=1e-5, rtol=1e-4)


# --- save in one process, load in another --------------------------------------------------------------------------

FRESH_LOAD = Path(__file__).with_name("fresh_load.py")


@pytest.fixture(scope="module")
def loaded_in_a_fresh_process(tmp_path_factory):
    """Save every (variant, model)'s adapter state here, load them all in one new Python process (nothing cached, no
    random state shared), and return what that process computed: {case: logits}."""
    folder = tmp_path_factory.mktemp("fresh")
    cases = {}
    for variant, model in PAIRS:
        v, loaded, _ = adapted(variant, model, seed=0)
        unfreeze(loaded.module, loaded.head)
        perturb(loaded.module, params=v.trained_parameters(loaded.module))
        key = f"{variant}--{model}"
        torch.save(adapter_state_dict(loaded.module), folder / f"{key}.pt")
        cases[key] = {"variant": variant, "model": model, "targets": model_targets(variant, model)[-1]}
        torch.save(logits(loaded.module.eval(), batch_for(loaded)), folder / f"{key}.expected.pt")
    (folder / "cases.json").write_text(json.dumps(cases))
    done = subprocess.run([sys.executable, str(FRESH_LOAD), str(folder)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder


@pytest.mark.parametrize(("variant", "model"), PAIRS)
def test_saved_adapter_loads_in_a_fresh_process_with_the_same_outputs(variant, model, loaded_in_a_fresh_process):
    key = f"{variant}--{model}"
    result = loaded_in_a_fresh_process / f"{key}.got.pt"
    assert result.exists(), (loaded_in_a_fresh_process / f"{key}.error.txt").read_text()
    expected = torch.load(loaded_in_a_fresh_process / f"{key}.expected.pt")
    torch.testing.assert_close(torch.load(result), expected, atol=1e-6, rtol=1e-6)
