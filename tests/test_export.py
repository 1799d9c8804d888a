"""`python -m lorafactory.export RUN --merged OUT`: transformers loads the merged model back and it computes what the
run's adapted model computes; what cannot be exported says why in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_sweeps import TINY, run
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from lorafactory.export import load_run


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


@pytest.mark.parametrize("variant", ["lora", "dora", "rslora"])
def test_a_peft_export_loads_in_peft_and_computes_the_same(workdir, variant):
    from conftest import tiny
    from peft import PeftModel

    run_dir = trained(workdir, variant)
    result = subprocess.run(
        [sys.executable, "-m", "lorafactory.export", str(run_dir), "--peft", str(workdir / "peft")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    base = tiny("tiny-bert", 2).module  # the same base the run adapted (built deterministically from its config)
    theirs = PeftModel.from_pretrained(base, workdir / "peft").eval()
    loaded = load_run(run_dir)
    ours, tokenizer = loaded.model, loaded.preprocessor
    batch = tokenizer(["a fine film", "dull and slow, awful"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(theirs(**batch).logits, ours(**batch).logits, atol=1e-5, rtol=1e-4)


def test_a_variant_without_a_peft_export_says_so(workdir):
    result = subprocess.run(
        [sys.executable, "-m", "lorafactory.export", str(trained(workdir, "vera")), "--peft", str(workdir / "p")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "variant=vera has no PEFT export (it exists for dora, lora" in result.stderr
