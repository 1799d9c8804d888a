"""`lorafactory.adapt`: a variant in a training loop of one's own behaves as under the framework's loop (its
optimizer groups, schedules, state), the README's example runs, and the console script is `python -m lorafactory`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import lorafactory
from lorafactory.errors import ConfigError, UnknownNameError

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "own_training_loop.py"


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))


@pytest.mark.parametrize("variant", ["dora", "adalora"])
def test_the_example_loop_lowers_the_loss(variant):
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), variant], capture_output=True, text=True, timeout=300, env=os.environ
    )
    assert result.returncode == 0, result.stderr[-2000:]
    first, final = (float(v) for v in result.stdout.split("training loss ")[1].split(" -> "))
    assert final < 0.25 * first


def test_adapt_freezes_the_base_and_trains_adapter_and_head():
    model = mlp()
    adapted = lorafactory.adapt(model, "lora", r=2, targets=["0"], head=["2"])
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"0.lora_A", "0.lora_B", "2.weight", "2.bias"}
    assert adapted.trainable_parameters == 2 * (8 + 16) + 16 * 2 + 2


def test_the_optimizer_has_the_variants_groups_and_the_head_at_loras_rate():
    model = mlp()
    adapted = lorafactory.adapt(model, "loraplus", r=2, targets=["0"], head=["2"])
    optimizer = adapted.optimizer(lr=1e-3)
    rates = sorted(g["lr"] for g in optimizer.param_groups)
    ratio = adapted.variant.cfg.lr_ratio
    head_rate = 1e-3 / adapted.variant.cfg.lr_mult
    assert rates == pytest.approx(sorted([1e-3, 1e-3 * ratio, head_rate]))
    assert isinstance(optimizer, torch.optim.AdamW)


def test_a_variant_that_changes_its_parameters_hands_back_a_new_optimizer():
    """IncreLoRA grows ranks on its schedule: `after_step` must hand over an optimizer over the new parameters, as the
    framework's loop rebuilds its own."""
    model = mlp()
    adapted = lorafactory.adapt(model, "increlora", r=2, targets=["0"], head=["2"])
    optimizer = adapted.optimizer(lr=1e-2)
    adapted.start(total_steps=60)
    before = adapted.trainable_parameters
    x, y = torch.randn(32, 8), torch.randint(0, 2, (32,))
    swaps = 0
    for step in range(1, 61):
        adapted.loss(nn.functional.cross_entropy(model(x), y)).backward()
        adapted.after_backward()
        adapted.before_step(optimizer)
        optimizer.step()
        optimizer.zero_grad()
        new = adapted.after_step(step, optimizer)
        swaps += new is not optimizer
        optimizer = new
    adapted.end()
    assert swaps >= 1 and adapted.trainable_parameters > before
    trained = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == trained


def test_state_round_trip_into_a_fresh_model():
    model = mlp()
    adapted = lorafactory.adapt(model, "dora", r=2, targets=["0", "2"])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    fresh = lorafactory.adapt(mlp(), "dora", r=2, targets=["0", "2"])
    fresh.load_state_dict(adapted.state_dict())
    x = torch.randn(5, 8)
    torch.testing.assert_close(fresh.model(x), model(x))


def test_unknown_variants_and_bad_values_say_what_to_fix():
    with pytest.raises(UnknownNameError, match="Did you mean .dora."):
        lorafactory.adapt(mlp(), "doraa", targets=["0"])
    with pytest.raises(ConfigError, match="variant.r"):
        lorafactory.adapt(mlp(), "lora", r=0, targets=["0"])


def test_the_console_script_is_the_cli():
    script = Path(sys.executable).with_name("lorafactory")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "python -m lorafactory variant=dora task=glue/sst2" in result.stdout
