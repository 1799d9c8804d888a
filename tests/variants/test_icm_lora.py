"""ICM-LoRA: the generated adapter is the task's (it beats the base model and the other task's generated adapter),
the pieces it is made of (task vector, normalisation, CVAE fit, seeded generation, the file) do what the paper's
official code does, and the pipeline runs from a sweep's folders through `python -m lorafactory.icm fit` to a run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import batch_for, icm_generator, tiny

from lorafactory import icm
from lorafactory.errors import ConfigError
from lorafactory.models import unfreeze
from lorafactory.variants import adapter_state_dict, build_variant

LRS = (5e-3, 1e-2, 2e-2)


def toy_task(task: int, n: int = 16, seq: int = 10) -> dict[str, torch.Tensor]:
    """A fixed batch to memorise: each task draws its tokens from its own part of the vocabulary (so the two tasks'
    vectors differ) and has its own random labels (so their adapters differ)."""
    g = torch.Generator().manual_seed(100 + task)
    low, high = ((1000, 8000), (8000, 15000))[task]
    ids = torch.randint(low, high, (n, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (n,), generator=g)}


def task_loss(model: torch.nn.Module, batch: dict) -> float:
    with torch.no_grad():
        return model.eval()(**batch).loss.item()


def train_lora(task: int, lr: float, steps: int = 40) -> tuple[dict, float]:
    """A LoRA (attn, r=4) and head trained on a toy task from seed 0's init, as a sweep's run would be; its state and
    final loss."""
    loaded = tiny("tiny-bert", 2)
    torch.manual_seed(0)
    build_variant({"name": "lora", "targets": "attn", "r": 4}).adapt(loaded.module, head=loaded.head)
    unfreeze(loaded.module, loaded.head)
    model, batch = loaded.module.train(), toy_task(task)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return adapter_state_dict(model), task_loss(model, batch)


@pytest.fixture(scope="module")
def toy_sweep(tmp_path_factory):
    """Two toy tasks × three learning rates of trained LoRAs, and a generator fit on them, saved to a file."""
    states, tasks, trained = [], [], {0: [], 1: []}
    for task in (0, 1):
        for lr in LRS:
            state, loss = train_lora(task, lr)
            states.append(state)
            tasks.append(f"toy{task}")
            trained[task].append(loss)
    base = tiny("tiny-bert", 2).module
    vectors = {f"toy{t}": icm.task_vector(base, [toy_task(t)], 16) for t in (0, 1)}
    generator = icm.fit(states, tasks, vectors, model="tiny-bert", r=4, scaling=4.0, examples=16, epochs=300)
    path = generator.save(tmp_path_factory.mktemp("icm") / "generator.pt")
    return {"generator": generator, "path": str(path), "trained": trained, "states": states, "vectors": vectors}


def generated_model(path: str, task: int, **cfg) -> torch.nn.Module:
    """tiny-bert adapted by icm_lora and initialised from the generator with the toy task's batches, as a run's
    `init_from_data` would be."""
    loaded = tiny("tiny-bert", 2)
    variant = build_variant({"name": "icm_lora", "targets": "attn", "r": 4, "generator": path, **cfg})
    variant.adapt(loaded.module, head=loaded.head)
    unfreeze(loaded.module, loaded.head)
    variant.init_from_data(loaded.module, iter([toy_task(task)] * 10), lambda m, b: m(**b).loss)
    return loaded.module


def test_the_generated_adapter_is_the_tasks(toy_sweep):
    base = task_loss(tiny("tiny-bert", 2).module, toy_task(0))
    for task in (0, 1):
        trained = sum(toy_sweep["trained"][task]) / len(LRS)
        own = task_loss(generated_model(toy_sweep["path"], task), toy_task(task))
        other = task_loss(generated_model(toy_sweep["path"], 1 - task), toy_task(task))
        # Measured: own 0.25-0.30, trained mean 0.23-0.27, other 0.73-0.77, base 0.69.
        assert own < trained + 0.3 * (base - trained), (own, trained, base)
        assert own < other - 0.2, (own, other)


def test_the_generated_b_is_rescaled_to_the_variants_own_scale(toy_sweep):
    """The generator's adapters were trained at s = 16/4; at alpha = 8 (s = 2) B must double for the same model."""
    batch = {k: v for k, v in toy_task(0).items() if k != "labels"}
    with torch.no_grad():
        expected = generated_model(toy_sweep["path"], 0).eval()(**batch).logits
        got = generated_model(toy_sweep["path"], 0, alpha=8.0).eval()(**batch).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_the_cvae_loss_falls(toy_sweep):
    losses = toy_sweep["generator"].losses
    assert len(losses) == 300 and losses[-1] < 0.2 * losses[0]


def test_normalisation_round_trips_and_standardises_each_tensor():
    g = torch.Generator().manual_seed(0)
    state = {"b.lora_A": torch.randn(4, 6, generator=g) * 3 + 1, "a.lora_B": torch.randn(5, 4, generator=g) * 1e-3}
    state["head.bias"] = torch.full((3,), 0.5)  # constant: std 0, divided by 1
    keys = sorted(state)
    flat, stats = icm.normalise(state, keys)
    assert flat.shape == (20 + 24 + 3,)
    lora_B = flat[:20]  # keys in order: a.lora_B, b.lora_A, head.bias
    assert abs(lora_B.mean().item()) < 1e-6 and abs(lora_B.std().item() - 1) < 1e-5
    torch.testing.assert_close(stats[0], torch.stack([state["a.lora_B"].mean(), state["a.lora_B"].std()]))
    back = icm.denormalise(flat, stats, keys, [state[k].shape for k in keys])
    for key in keys:
        torch.testing.assert_close(back[key], state[key], atol=1e-7, rtol=1e-6)


def test_generation_is_deterministic_for_a_seed_and_varies_with_it(toy_sweep):
    generator, vector = toy_sweep["generator"], toy_sweep["vectors"]["toy0"]
    first, again, other = (generator.generate(vector, seed) for seed in (0, 0, 1))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)
    assert {k: tuple(v.shape) for k, v in first.items()} == {
        k: tuple(v.shape) for k, v in toy_sweep["states"][0].items()
    }


def test_the_file_round_trips(toy_sweep):
    loaded, generator = icm.Generator.load(toy_sweep["path"]), toy_sweep["generator"]
    assert (loaded.keys, loaded.tasks, loaded.model, loaded.r, loaded.examples) == (
        generator.keys,
        generator.tasks,
        "tiny-bert",
        4,
        16,
    )
    for vector in toy_sweep["vectors"].values():
        ours, theirs = generator.generate(vector, 3), loaded.generate(vector, 3)
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_the_task_vector_is_what_the_head_reads_at_the_last_real_token():
    """A decoder: the final hidden state at each example's last non-padding token (batch_for pads example 0), averaged;
    computed here one example at a time, without padding. An encoder: BERT's pooled [CLS], averaged."""
    loaded = tiny("tiny-llama", 2)
    batch = batch_for(loaded, batch_size=3)
    with torch.no_grad():
        expected = []
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
            hidden = loaded.module.model(input_ids=ids[mask.bool()][None]).last_hidden_state
            expected.append(hidden[0, -1])
    got = icm.task_vector(loaded.module.train(), iter([batch]), 3)
    torch.testing.assert_close(got, torch.stack(expected).mean(0), atol=1e-5, rtol=1e-5)
    assert loaded.module.training  # the mode it was in is restored

    bert = tiny("tiny-bert", 2)
    batches = [batch_for(bert, batch_size=4, seed=seed) for seed in (0, 1)]
    with torch.no_grad():
        pooled = [bert.module.eval().bert(b["input_ids"], b["attention_mask"]).pooler_output for b in batches]
    # Two batches of 4 and k = 6: the first 6 examples, not whole batches.
    got = icm.task_vector(bert.module, iter(batches), 6)
    torch.testing.assert_close(got, torch.cat(pooled)[:6].mean(0), atol=1e-5, rtol=1e-5)


def test_without_a_generator_init_refuses_in_one_line():
    loaded = tiny("tiny-bert")
    variant = build_variant({"name": "icm_lora", "targets": "attn", "r": 4})
    variant.adapt(loaded.module, head=loaded.head)
    with pytest.raises(ConfigError, match=r"variant\.generator is not set.*python -m lorafactory\.icm fit") as err:
        variant.init_from_data(loaded.module, iter([batch_for(loaded)]), None)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("change", "labels"), [({"r": 8}, 3), ({"targets": "all-linear"}, 3), ({}, 2)])
def test_a_generator_of_other_shapes_is_refused_in_one_line(change, labels):
    path = icm_generator("tiny-bert", "attn", 4)  # 3-label head, attn, r = 4
    loaded = tiny("tiny-bert", labels)
    variant = build_variant({"name": "icm_lora", "targets": "attn", "r": 4, "generator": path, **change})
    variant.adapt(loaded.module, head=loaded.head)
    with pytest.raises(ConfigError, match=r"variant\.generator=.* was fit on lora adapters of tiny-bert") as err:
        variant.init_from_data(loaded.module, iter([batch_for(loaded)]), None)
    assert "\n" not in str(err.value)


# --- the pipeline from a sweep's folders -----------------------------------------------------------------------------

TINY = ["model=tiny-bert", "task.max_train_samples=16", "task.max_eval_samples=8", "trainer.progress_bar=false"]


def lorafactory(*args: str, cwd: Path, module: str = "lorafactory") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=os.environ
    )


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, fake_mirror):
    """A tiny LoRA sweep (SST-2 at two learning rates, QNLI), run as a user runs it."""
    workdir = tmp_path_factory.mktemp("icm-sweep")
    env = {"LORAFACTORY_DATA_DIR": str(fake_mirror), "LORAFACTORY_CACHE": str(workdir / "cache")}
    os.environ.update(env)
    try:
        args = ("-m", *TINY, "variant=lora", "task=glue/sst2,glue/qnli", "optim.lr_scale=1,2", "name=icm")
        result = lorafactory(*args, cwd=workdir)
    finally:
        for key in env:
            os.environ.pop(key)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def test_fit_on_a_sweep_then_a_run_generates_its_adapter(sweep, workdir):
    out = workdir / "gen.pt"
    fitted = lorafactory(
        "fit", str(sweep / "runs" / "icm"), "--out", str(out), "--epochs", "30", cwd=workdir, module="lorafactory.icm"
    )
    assert fitted.returncode == 0, fitted.stderr
    assert "fit on 4 lora runs of tiny-bert, 2 tasks (glue/qnli, glue/sst2)" in fitted.stdout
    # QNLI trains BERT's pooler with its head, SST-2 does not: the heads differ, so the adapter alone is generated.
    assert "adapter only" in fitted.stdout and "heads differ" in fitted.stderr
    generator = icm.Generator.load(out)
    assert generator.head_keys == [] and all(k.endswith(icm.LORA_SUFFIXES) for k in generator.keys)

    # The paper's use: generate, then evaluate with no training (a run of zero steps).
    run = lorafactory(
        *TINY, "variant=icm_lora", f"variant.generator={out}", "task=glue/sst2", "task.max_steps=0", cwd=workdir
    )
    assert run.returncode == 0, run.stderr[-3000:]
    [path] = (workdir / "runs").rglob("result.json")
    record = json.loads(path.read_text())
    assert record["status"] == "ok" and [h["step"] for h in record["history"]] == [0]
    summary = record["variant_summary"]
    assert summary["statistics_of"] == "glue/sst2" and summary["generator_tasks"] == ["glue/qnli", "glue/sst2"]
    saved = torch.load(path.parent / "adapter.pt")
    assert all(saved[k].abs().sum() > 0 for k in saved if k.endswith(".lora_B"))  # generated, not LoRA's B = 0


def test_fit_mistakes_are_one_line_and_exit_2(sweep, tmp_path, capsys):
    assert icm.main(["fit", str(tmp_path), "--out", str(tmp_path / "g.pt")]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0

    runs = sorted(p.parent for p in (sweep / "runs" / "icm").rglob("adapter.pt"))
    odd = tmp_path / "odd"
    shutil.copytree(runs[0], odd)
    state = torch.load(odd / "adapter.pt")
    key = next(k for k in state if k.endswith(".lora_A"))
    state[key] = torch.zeros(2, state[key].shape[1])
    torch.save(state, odd / "adapter.pt")
    assert icm.main(["fit", str(runs[1]), str(odd), "--out", str(tmp_path / "g.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "other adapter keys or shapes" in err and str(odd) in err and "\n" not in err

    record = json.loads((odd / "result.json").read_text())
    (odd / "result.json").write_text(json.dumps({**record, "model": "tiny-llama"}))
    assert icm.main(["fit", str(runs[1]), str(odd), "--out", str(tmp_path / "g.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert "runs of different models" in err and str(odd) in err and "\n" not in err

    dora = {**torch.load(runs[1] / "adapter.pt"), f"{key.removesuffix('.lora_A')}.magnitude": torch.ones(3)}
    torch.save(dora, odd / "adapter.pt")  # a layer with more than A and B: not a plain LoRA
    (odd / "result.json").write_text(json.dumps(record))
    assert icm.main(["fit", str(odd), "--out", str(tmp_path / "g.pt")]) == 2
    assert "saved no plain LoRA state" in capsys.readouterr().err

    (odd / "adapter.pt").unlink()
    assert icm.main(["fit", str(odd), "--out", str(tmp_path / "g.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert "has no adapter.pt" in err and "\n" not in err
    assert not (tmp_path / "g.pt").exists()
