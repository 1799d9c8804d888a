"""AdaLoRA: the cubic budget schedule, parity with PEFT (outputs, gradients, and the allocator's budgets and masks on
a fixed gradient sequence), the orthogonality penalty, deleting masked triplets at the end, and resuming mid-schedule.

`train` (a toy run through every hook, optionally resumed from a saved state) is shared with the other rank-budgeting
variants' tests."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import batch_for, tiny
from torch import nn

from lorafactory.models import unfreeze
from lorafactory.training.optim import carry_over_state
from lorafactory.variants import adapter_parameters, adapter_state_dict, build_variant, load_adapter_state_dict
from lorafactory.variants.adalora import BudgetSchedule, orthogonality_penalty
from lorafactory.variants.base import count_trainable, find_targets, named_adapter_layers

peft = pytest.importorskip("peft")


def round_trip(obj):
    """Through torch.save and back, as a checkpoint would."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def toy(name: str, adapter_seed: int = 0, **cfg):
    """A two-layer regression net (the same base every time), its linears adapted with adapters from `adapter_seed`."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 8))
    torch.manual_seed(adapter_seed)
    variant = build_variant({"name": name, "targets": ["0", "2"], **cfg})
    variant.adapt(model, head=())
    return variant, model


def train(name: str, steps: int, resume_at: int | None = None, lr: float = 1e-2, each_step=None, **cfg):
    """Train `toy` as the loop does (every hook; a new optimizer carrying the old state when the parameters change).
    With `resume_at`, everything a checkpoint holds is saved after that step and training goes on in a freshly built
    model and variant loaded from it; `each_step(variant, model, optimizer)` runs after every step. Returns the
    variant, the model and the optimizer at the end."""

    def optimizer_for(variant, model):
        groups = variant.param_groups(model, lr) or [
            {"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}
        ]
        return torch.optim.AdamW(groups, lr=lr, weight_decay=0.01)

    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(32, 16, generator=g), torch.randn(32, 8, generator=g)) for _ in range(steps)]
    variant, model = toy(name, **cfg)
    optimizer = optimizer_for(variant, model)
    for step, (x, y) in enumerate(data, start=1):
        loss = F.mse_loss(model(x), y)
        aux = variant.aux_loss(model)
        (loss if aux is None else loss + aux).backward()
        variant.on_after_backward(model)
        variant.on_before_optimizer_step(model, optimizer)
        optimizer.step()
        if variant.on_train_batch_end(model, step):
            new = optimizer_for(variant, model)
            carry_over_state(optimizer, new)
            optimizer = new
        optimizer.zero_grad()
        if step == resume_at:
            saved = round_trip((adapter_state_dict(model), variant.state_dict(), optimizer.state_dict()))
            variant, model = toy(name, adapter_seed=1, **cfg)
            load_adapter_state_dict(model, saved[0])
            variant.load_state_dict(saved[1], model)
            optimizer = optimizer_for(variant, model)
            optimizer.load_state_dict(saved[2])
        if each_step is not None:
            each_step(variant, model, optimizer)
    variant.on_train_end(model)
    return variant, model, optimizer


def assert_same_run(a, b):
    (variant_a, model_a, _), (variant_b, model_b, _) = a, b
    state_a, state_b = adapter_state_dict(model_a), adapter_state_dict(model_b)
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    assert variant_a.summary(model_a) == variant_b.summary(model_b)


# --- the schedule ------------------------------------------------------------------------------------------------


def cubic(step, initial, target, total, tinit, tfinal):
    if step <= tinit:
        return initial
    if step > total - tfinal:
        return target
    return math.floor(target + (initial - target) * (1 - (step - tinit) / (total - tfinal - tinit)) ** 3)


def test_budget_schedule_is_the_cubic_formula_and_peft_s():
    schedule = BudgetSchedule(initial=72, target=48, total=200, tinit=20, tfinal=100, interval=10)
    config = peft.AdaLoraConfig(init_r=12, target_r=8, tinit=20, tfinal=100, deltaT=10, total_step=200)
    allocator = peft.tuners.adalora.RankAllocator(nn.Module(), config, "default")
    allocator.init_bgt, allocator.target_bgt = 72, 48  # 6 layers of 12 → 8, without building them
    for step in range(0, 230):
        budget, reallocate = schedule(step)
        assert budget == cubic(step, 72, 48, 200, 20, 100), step
        assert (budget, reallocate) == allocator.budget_schedule(step), step
    assert schedule(21)[0] < 72 and schedule(100)[0] == 48


def test_phases_are_fractions_of_the_run():
    variant = build_variant({"name": "adalora", "r": 4, "total_steps": 300, "tinit_fraction": 0.2})
    schedule = variant.schedule(n_layers=5)
    assert (schedule.initial, schedule.target, schedule.tinit, schedule.tfinal) == (30, 20, 60, 150)
    assert variant.cfg.init_r == 6  # ⌈1.5·r⌉
    assert variant.summary(nn.Module())["total_steps_given"]


def test_without_total_steps_the_schedule_assumes_a_length_and_says_so():
    variant = build_variant({"name": "adalora", "r": 4})
    with pytest.warns(UserWarning, match="the run's length is unknown"):
        assert variant.schedule(n_layers=2).total == 1000
    assert variant.summary(nn.Module())["total_steps_given"] is False


@pytest.mark.parametrize("name", ["adalora", "increlora", "codyra"])
def test_the_training_loop_gives_the_run_length_unless_the_config_does(name):
    variant = build_variant({"name": name, "r": 4})
    variant.on_train_start(nn.Module(), 240)
    assert variant.run.total == 240 and variant.summary(nn.Module())["total_steps_from"] == "run"
    pinned = build_variant({"name": name, "r": 4, "total_steps": 90})
    pinned.on_train_start(nn.Module(), 240)
    assert pinned.run.total == 90 and pinned.summary(nn.Module())["total_steps_from"] == "variant.total_steps"


# --- parity with PEFT --------------------------------------------------------------------------------------------


def both(model: str = "tiny-bert", **cfg):
    """Ours and PEFT's AdaLoRA on copies of a tiny model, with the same random (P, Λ, Q) in both."""
    loaded = tiny(model)
    theirs = copy.deepcopy(loaded.module)
    names = find_targets(loaded.module, "all-linear", loaded.head)
    settings = {"r": 4, "alpha": 8, "targets": "all-linear", "total_steps": 20, "tfinal_fraction": 0.3, **cfg}
    variant = build_variant({"name": "adalora", **settings})
    variant.adapt(loaded.module, head=loaded.head)
    unfreeze(loaded.module, loaded.head)
    theirs = peft.get_peft_model(theirs, variant.peft_config(names, list(loaded.head)))
    g = torch.Generator().manual_seed(0)
    pairs = []
    with torch.no_grad():
        for name, mine in named_adapter_layers(loaded.module):
            twin = theirs.base_model.model.get_submodule(name)
            for p in (mine.lora_A, mine.lora_B, mine.gate):
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 if p is mine.gate else 0.1))
            twin.lora_A["default"].copy_(mine.lora_A)
            twin.lora_B["default"].copy_(mine.lora_B)
            twin.lora_E["default"].copy_(mine.gate.unsqueeze(1))
            pairs.append((name, mine, twin))
    for m in (loaded.module, theirs):
        for module in m.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
    return variant, loaded, theirs, pairs


def twin_parts(mine, twin):
    """(ours, theirs) for P, Λ, Q."""
    return [
        (mine.lora_A, twin.lora_A["default"]),
        (mine.lora_B, twin.lora_B["default"]),
        (mine.gate, twin.lora_E["default"]),
    ]


@pytest.mark.parametrize("model", ["tiny-bert", "tiny-llama"])
def test_adalora_matches_peft_outputs_and_gradients(model):
    """Task loss + our orthogonality penalty = PEFT's loss (AdaLoraModel adds its penalty in forward)."""
    variant, loaded, theirs, pairs = both(model)
    batch = batch_for(loaded, batch_size=4, seq=12)
    loaded.module.train(), theirs.train()
    out, ref = loaded.module(**batch), theirs.base_model(**batch)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    loss = out.loss + variant.aux_loss(loaded.module)
    torch.testing.assert_close(loss, ref.loss, atol=1e-5, rtol=1e-5)
    loss.backward()
    ref.loss.backward()
    for _, mine, twin in pairs:
        for ours, peft_param in twin_parts(mine, twin):
            torch.testing.assert_close(ours.grad, peft_param.grad.view_as(ours), atol=1e-5, rtol=1e-4)


def test_adalora_allocator_matches_peft_on_a_fixed_gradient_sequence():
    """The same gradients and updates in both: after every step the same budget, the same Λ zeroed, the same Λ
    values; after a reallocation the model keeps exactly the scheduled number of triplets."""
    variant, loaded, theirs, pairs = both(total_steps=24, tinit_fraction=0.125, tfinal_fraction=0.25, mask_interval=2)
    g = torch.Generator().manual_seed(3)
    reallocations = 0
    for step in range(1, 29):
        with torch.no_grad():
            for _, mine, twin in pairs:
                for ours, peft_param in twin_parts(mine, twin):
                    grad = torch.randn(ours.shape, generator=g)
                    ours.grad, peft_param.grad = grad.clone(), grad.view_as(peft_param).clone()
        variant.on_before_optimizer_step(loaded.module, None)
        with torch.no_grad():  # the "optimizer step", the same in both
            for _, mine, twin in pairs:
                for ours, peft_param in twin_parts(mine, twin):
                    ours.sub_(0.05 * ours.grad)
                    peft_param.sub_(0.05 * peft_param.grad)
        variant.on_train_batch_end(loaded.module, step)
        theirs.base_model.update_and_allocate(step)
        budget, reallocate = variant.schedule(len(pairs))(step)
        assert budget == theirs.base_model.rankallocator.budget_schedule(step)[0]
        for name, mine, twin in pairs:
            assert torch.equal(mine.gate, twin.lora_E["default"].view(-1)), (step, name)
        if reallocate:
            reallocations += 1
            assert sum(int(torch.count_nonzero(mine.gate)) for _, mine, _ in pairs) == budget
    assert reallocations > 5 and variant.fixed


# --- the penalty, the end of training, resuming ------------------------------------------------------------------


def test_orthogonality_penalty_vanishes_on_orthonormal_factors_and_is_the_frobenius_mean_otherwise():
    _, model = toy("adalora", r=2, init_r=3)
    layers = [model[0], model[2]]
    with torch.no_grad():
        for layer in layers:
            q, _ = torch.linalg.qr(torch.randn(layer.lora_A.shape[1], 3))
            p, _ = torch.linalg.qr(torch.randn(layer.lora_B.shape[0], 3))
            layer.lora_A.copy_(q.t())
            layer.lora_B.copy_(p)
    assert orthogonality_penalty(layers).item() < 1e-6
    with torch.no_grad():
        model[0].lora_A.mul_(2)  # QQᵀ = 4I: ‖3I‖_F = 3√3, averaged over 4 matrices
    torch.testing.assert_close(orthogonality_penalty(layers), torch.tensor(3 * math.sqrt(3) / 4), rtol=1e-5, atol=1e-5)


def test_training_ends_with_the_allocated_ranks_and_the_masked_function():
    variant, model, _ = train("adalora", steps=12, r=2, init_r=4, total_steps=12)
    ranks = variant.summary(model)["ranks"]
    assert sum(ranks.values()) == 2 * 2  # the target budget, spread by importance
    assert {name: layer.r for name, layer in named_adapter_layers(model)} == ranks
    assert count_trainable(adapter_parameters(model)) == ranks["0"] * (16 + 12 + 1) + ranks["2"] * (12 + 8 + 1)
    x = torch.randn(5, 16)
    _, fresh = toy("adalora", adapter_seed=2, r=2, init_r=4, total_steps=12)
    load_adapter_state_dict(fresh, adapter_state_dict(model))  # the deleted triplets are gone from the state too
    torch.testing.assert_close(fresh(x), model(x))


def test_end_of_training_deletes_masked_triplets_without_changing_the_output():
    variant, model = toy("adalora", r=2, init_r=4, total_steps=10)
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.gate.normal_()
    variant.masks = {"0": torch.tensor([True, False, True, False]), "2": torch.tensor([False, False, False, True])}
    variant.apply_masks(model)
    x = torch.randn(5, 16)
    expected = model(x)
    variant.on_train_end(model)
    assert (model[0].r, model[2].r) == (2, 1)
    torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("path", ["merged", "two-branch"])
def test_a_layer_left_with_no_triplets_computes_its_base_layer(path, monkeypatch):
    """The allocator may give a layer no rank at all: after deleting its triplets it must still run forward and
    backward, as its frozen base layer."""
    import lorafactory.variants.lora as lora_module

    monkeypatch.setattr(lora_module, "MERGE_THRESHOLD", 0.0 if path == "merged" else math.inf)
    variant, model = toy("adalora", r=2, init_r=4, total_steps=10)
    variant.masks = {"0": torch.tensor([True, True, False, False]), "2": torch.zeros(4, dtype=torch.bool)}
    variant.apply_masks(model)
    variant.on_train_end(model)
    assert model[2].r == 0
    x = torch.randn(3, 5, 16)
    out = model(x)
    torch.testing.assert_close(out, model[2].base_forward(model[1](model[0](x))))
    out.sum().backward()
    assert model[0].lora_A.grad is not None


@pytest.mark.parametrize("resume_at", [4, 9])  # while the budget falls; with the allocation fixed
def test_resuming_mid_schedule_continues_identically(resume_at):
    settings = {"r": 2, "init_r": 4, "total_steps": 12, "mask_interval": 1}
    assert_same_run(train("adalora", 12, **settings), train("adalora", 12, resume_at=resume_at, **settings))
