"""`python -m lorafactory.export RUN --merged OUT`: transformers loads the merged model back and it computes what the
run's adapted model computes. `--peft OUT`: PEFT's `PeftModel.from_pretrained` loads the adapter of every variant PEFT
has on a fresh base and computes the same. What cannot be exported says why in one line."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import batch_for, tiny_cfg
from omegaconf import OmegaConf
from test_sweeps import TINY, run
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from lorafactory.config import CONF_DIR
from lorafactory.errors import UserError
from lorafactory.export import build_base, export_peft, load_run, peft_variants
from lorafactory.models import unfreeze
from lorafactory.results.record import RunRecord, read_record, write_record
from lorafactory.variants import VARIANTS, Variant, adapter_parameters, adapter_state_dict, build_variant
from lorafactory.variants.base import named_adapter_layers
from lorafactory.variants.lora import LoRA


def trained(workdir: Path, variant: str, *args: str) -> Path:
    result = run(*TINY, f"variant={variant}", "name=export", "optim.lr=3e-2", *args, cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    [record] = (workdir / "runs" / "export").rglob(f"{variant}/*/result.json")
    return record.parent


def export(run_dir: Path, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lorafactory.export", str(run_dir), "--merged", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("variant", ["dora", "pissa"])
def test_a_merged_export_loads_in_transformers_and_computes_the_same(workdir, variant):
    run_dir = trained(workdir, variant)
    result = export(run_dir, workdir / "merged")
    assert result.returncode == 0, result.stderr[-3000:]
    plain = AutoModelForSequenceClassification.from_pretrained(workdir / "merged").eval()
    tokenizer = AutoTokenizer.from_pretrained(workdir / "merged")
    batch = tokenizer(["a fine film", "dull and slow, awful"], padding=True, return_tensors="pt")
    adapted = load_run(run_dir).model
    with torch.no_grad():
        expected = adapted(**batch).logits
        torch.testing.assert_close(plain(**batch).logits, expected, atol=1e-5, rtol=1e-4)
        assert not any("lora" in name for name in plain.state_dict())  # a plain model: no adapter left
        again = AutoModelForSequenceClassification.from_pretrained(workdir / "merged").eval()
        assert torch.equal(again(**batch).logits, plain(**batch).logits)  # deterministic reload


def test_what_cannot_be_exported_says_why_in_one_line(workdir):
    unmergeable = trained(workdir, "moe_lora")
    result = export(unmergeable, workdir / "out")
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "variant=moe_lora has no merged form" in result.stderr
    unsaved = trained(workdir, "lora", "save_adapter=false")
    result = export(unsaved, workdir / "out")
    assert result.returncode == 2 and "launched with save_adapter=false" in result.stderr
    result = export(workdir, workdir / "out")
    assert result.returncode == 2 and "is not a run folder" in result.stderr


def peft_export(run_dir: Path, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lorafactory.export", str(run_dir), "--peft", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def peft_twin(run_dir: Path, adapter: Path):
    """PEFT's model: the run's base, built afresh, with the exported adapter."""
    from peft import PeftModel

    config = OmegaConf.create(read_record(run_dir).config)
    return PeftModel.from_pretrained(build_base(config).module, adapter).eval()


def test_a_trained_run_exported_to_peft_computes_the_same_in_peft(workdir):
    """End to end: a PiSSA run (its base rewritten at init) trained by the CLI, exported by the CLI as PEFT's rank-2r
    conversion, loaded by PEFT on the original base."""
    run_dir = trained(workdir, "pissa")
    result = peft_export(run_dir, workdir / "peft")
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((workdir / "peft" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["init_lora_weights"]) == ("LORA", 16, True)
    loaded = load_run(run_dir)
    batch = loaded.preprocessor(["a fine film", "dull and slow, awful"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = loaded.model(**batch).logits
        torch.testing.assert_close(
            peft_twin(run_dir, workdir / "peft")(**batch).logits, expected, atol=1e-5, rtol=1e-4
        )


# --- every variant PEFT has, from a run folder written directly (no training) ----------------------------------------

QUANTIZED = {"qlora", "loftq"}
"""Trained on a 4-bit base: refused (PEFT loads an adapter on the full-precision base)."""
SETTINGS = {
    "boft": {"butterfly_factors": 1},  # PEFT builds more factors only with its CUDA kernel (refusal tested below)
    "vblora": {"vector_length": 32, "num_vectors": 16},  # PEFT needs b to divide every width (refusal tested below)
    "randlora": {"r": 4},
}
"""Settings PEFT can reproduce on tiny-bert, where a variant's defaults are refused."""


def run_folder(root: Path, variant: dict, model: dict | None = None, prepare=None) -> Path:
    """A finished tiny-bert run's folder as training leaves it (record + adapter.pt), without training: the variant
    (all linear layers unless it says otherwise) adapts the model (`model` overrides its config) with its
    data-dependent init, if any, then every adapter and head parameter moves off its initial value so the adapter
    changes the outputs; `prepare(variant, model)` runs last."""
    cfg = {
        "model": {**OmegaConf.to_container(tiny_cfg("tiny-bert")), **(model or {})},
        "task": OmegaConf.to_container(OmegaConf.load(CONF_DIR / "task" / "glue" / "sst2.yaml")),
        "variant": dataclasses.asdict(build_variant({"targets": "all-linear", **variant}).cfg),
    }
    config = OmegaConf.create(cfg)
    loaded = build_base(config)
    torch.manual_seed(0)  # the adapters' random init: the same whatever ran before
    adapter = build_variant(config.variant)
    adapter.adapt(loaded.module, head=loaded.not_adapted)
    unfreeze(loaded.module, loaded.head)
    batches = iter(lambda: batch_for(loaded, batch_size=4, seq=12), None)
    adapter.init_from_data(loaded.module, batches, lambda m, batch: m(**batch).loss)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in [*adapter_parameters(loaded.module), *(p for p in loaded.module.parameters() if p.requires_grad)]:
            p.add_(torch.randn(p.shape, generator=g) * (0.3 * p.abs().mean() + 0.3))
    if prepare is not None:
        prepare(adapter, loaded.module)
    record = RunRecord(
        status="ok", model="tiny-bert", task="glue/sst2", variant=adapter.name, seed=0, lr=1e-3, config=cfg
    )
    write_record(root, record)
    torch.save(adapter_state_dict(loaded.module), root / "adapter.pt")
    return root


def assert_peft_computes_the_run(run_dir: Path, adapter: Path) -> None:
    """PEFT's model (fresh base + exported adapter) gives the run's logits, and those are far from the base's, so the
    comparison would see a wrong mapping. In float64, where the two agree to round-off (PEFT's FourierFT builds its
    update in float32 whatever the model's dtype: ~1e-6)."""
    ours = load_run(run_dir)
    loaded = build_base(ours.config)
    batch = {k: v for k, v in batch_for(loaded, batch_size=4, seq=12, seed=5).items() if k != "labels"}
    with torch.no_grad():
        expected = ours.model.double()(**batch).logits
        base = loaded.module.double().eval()(**batch).logits
        theirs = peft_twin(run_dir, adapter).double()(**batch).logits
    scale = expected.abs().max()
    assert (theirs - expected).abs().max() <= 1e-5 * scale
    assert (expected - base).abs().max() > 0.1 * scale


@pytest.mark.parametrize("name", sorted(n for n in peft_variants() if n not in QUANTIZED))
def test_every_peft_variant_exports_an_adapter_peft_loads_with_the_same_outputs(tmp_path, name):
    run_dir = run_folder(tmp_path / "run", {"name": name, **SETTINGS.get(name, {})})
    export_peft(run_dir, tmp_path / "peft")
    assert {p.name for p in (tmp_path / "peft").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    assert_peft_computes_the_run(run_dir, tmp_path / "peft")


def test_adalora_exports_its_allocated_ranks_as_pefts_rank_pattern(tmp_path):
    """After training each AdaLoRA layer keeps its own rank: PEFT rebuilds those ranks."""

    def allocate(variant, model):
        for i, (_, layer) in enumerate(named_adapter_layers(model)):
            layer.prune(torch.arange(layer.r) <= i % 4, fold=False)  # ranks 1, 2, 3, 4 (all of init_r), 1, ...

    run_dir = run_folder(tmp_path / "run", {"name": "adalora", "r": 2, "init_r": 4}, prepare=allocate)
    export_peft(run_dir, tmp_path / "peft")
    pattern = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["rank_pattern"]
    assert sorted({sum(mask) for mask in pattern.values()}) == [1, 2, 3, 4]
    assert_peft_computes_the_run(run_dir, tmp_path / "peft")


def test_every_variant_peft_has_maps_its_state_onto_pefts():
    """A variant with a PEFT config (`peft_config`) implements the export (inherited from its family's file or its
    own), so the two cannot drift apart; the export lists exactly those variants."""
    with warnings.catch_warnings():  # AdaLoRA's config warns that no run length is known
        warnings.simplefilter("ignore")
        with_config = [n for n in VARIANTS.names() if build_variant(n).peft_config(["x"], []) is not None]
    assert sorted(with_config) == peft_variants()
    missing = [n for n in with_config if VARIANTS.get(n).peft_export is Variant.peft_export]
    assert not missing, f"{missing} have a PEFT config but do not implement `peft_export`"


def test_a_wrong_mapping_is_caught_before_anything_is_written(tmp_path, monkeypatch):
    run_dir = run_folder(tmp_path / "run", {"name": "lora"})
    export = LoRA.peft_export

    def scaled(self, *args):  # the scale s 5 % off, as a wrong alpha convention would make it
        config, state = export(self, *args)
        config.lora_alpha *= 1.05
        return config, state

    monkeypatch.setattr(LoRA, "peft_export", scaled)
    with pytest.raises(UserError, match="variant=lora: PEFT's model loaded from the exported adapter computes"):
        export_peft(run_dir, tmp_path / "peft")

    def dropped(self, *args):
        config, state = export(self, *args)
        return config, {k: v for k, v in state.items() if "layer.1." not in k}

    monkeypatch.setattr(LoRA, "peft_export", dropped)
    with pytest.raises(UserError, match="does not fit PEFT's adapter: missing"):
        export_peft(run_dir, tmp_path / "peft")
    assert not (tmp_path / "peft").exists() and [p.name for p in tmp_path.iterdir()] == ["run"]


@pytest.mark.parametrize(
    "variant, model, message",
    [
        ({"name": "qlora"}, None, "variant=qlora: the run's base is stored in 4 bits"),
        ({"name": "loftq"}, None, "variant=loftq: the run's base is stored in 4 bits"),
        ({"name": "lora"}, {"quantize": "nf4"}, "variant=lora: the run's base is stored in 4 bits"),
        ({"name": "vblora"}, None, "variant=vblora: 'bert.encoder.layer.0.attention.self.query' (32 × 32) is not"),
        ({"name": "boft"}, None, "variant=boft: PEFT builds 2 butterfly factors only with its CUDA extension"),
    ],
    ids=["qlora", "loftq", "model.quantize", "vblora-width", "boft-factors"],
)
def test_what_peft_cannot_reproduce_is_refused_in_one_line(tmp_path, variant, model, message):
    if variant["name"] == "boft":
        from peft.tuners.boft.layer import get_fbd_cuda

        if get_fbd_cuda() is not None:
            pytest.skip("PEFT's BOFT CUDA kernel builds here: two factors export")
    run_dir = run_folder(tmp_path / "run", variant, model=model)
    with pytest.raises(UserError, match=re.escape(message)) as refusal:
        export_peft(run_dir, tmp_path / "peft")
    assert "\n" not in str(refusal.value) and "use --merged" in str(refusal.value)
    assert not (tmp_path / "peft").exists()


@pytest.mark.parametrize("variant", ["randlora", "boft"])
def test_layers_peft_cannot_set_up_alike_are_refused(variant):
    """RandLoRA layers with different numbers of bases (PEFT's pairing of the shared B depends on it), a BOFT layer
    whose width made it fall back to another block size (PEFT has one for all)."""
    base = torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.Linear(12, 4))
    model = copy.deepcopy(base)
    adapter = build_variant({"name": variant, "r": 4, "targets": ["0", "1"]})
    with warnings.catch_warnings():  # BOFT warns of the fallback it takes
        warnings.simplefilter("ignore")
        adapter.adapt(model, head=())
    reason = {
        "randlora": "its layers have different numbers of bases ([1, 3])",
        "boft": "'1' fell back to block_size=6",
    }[variant]
    with pytest.raises(UserError, match=re.escape(f"variant={variant}: {reason}")) as refusal:
        adapter.peft_export(model, base, ["0", "1"], [])
    assert "use --merged" in str(refusal.value)


def test_a_variant_without_a_peft_export_says_so(tmp_path):
    result = peft_export(run_folder(tmp_path / "run", {"name": "mora"}), tmp_path / "p")
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert (
        f"variant=mora has no PEFT export (it exists for {', '.join(peft_variants())}); use --merged" in result.stderr
    )
