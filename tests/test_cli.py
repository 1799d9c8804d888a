"""The command line as a user runs it, in a subprocess: one run end to end on a tiny model and a slice of data,
and every user mistake printed as one line with a non-zero exit and no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = ["model=tiny-bert", "task.max_train_samples=48", "task.max_eval_samples=24", "trainer.progress_bar=false"]


def lorafactory(*args: str, cwd: Path, env: dict[str, str] | None = None, module: str = "lorafactory"):
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=300
    )


def test_one_run_trains_evaluates_and_records(workdir):
    result = lorafactory(*TINY_RUN, "variant=dora", "task=glue/sst2", cwd=workdir)
    assert result.returncode == 0, result.stderr
    [record_path] = (workdir / "runs" / "default" / "tiny-bert" / "glue" / "sst2" / "dora").glob("*/result.json")
    record = json.loads(record_path.read_text())
    assert record["status"] == "ok"
    assert (record["variant"], record["task"], record["model"]) == ("dora", "glue/sst2", "tiny-bert")
    assert record["primary_metric"] == "accuracy" and record["direction"] == "max"
    assert 0.0 <= record["final_metric"] <= 1.0 and record["final"]["accuracy"] == record["final_metric"]
    assert record["steps"] == 2 and record["train_samples"] == 48 and record["eval_samples"] == 24
    assert record["adapter_params"] > 0 and record["trainable_params"] > record["adapter_params"]
    assert record["step_time_s"] > 0 and record["peak_memory_mb"] > 0 and record["wall_time_s"] > 0
    assert record["activation_mb"] > 0 and record["train_state_mb"] > 0 and record["resumed"] == 0
    assert record["chance_metric"] == 0.5  # the fake mirror's validation labels alternate: the majority class is half
    # Chosen on a quarter of the mirror's 64 training sentences (sst2 asks for 500), reported on validation.
    assert record["selection_source"] == "held-out training examples" and record["selection_samples"] == 16
    assert record["selection_metric"] == record["selection"]["accuracy"]
    examples = record["eval_examples"]
    assert len(examples["outputs"]) == len(examples["labels"]) == 24
    hits = sum(o == y for o, y in zip(examples["outputs"], examples["labels"], strict=True))
    assert hits / 24 == pytest.approx(record["final_metric"])
    assert record["versions"]["torch"] and record["config"]["variant"]["name"] == "dora"
    assert (record_path.parent / "adapter.pt").is_file()
    assert not (record_path.parent / "checkpoints").exists()  # removed once the run is recorded
    assert "accuracy" in result.stdout and "result.json" in result.stdout

    again = lorafactory(*TINY_RUN, "variant=dora", "task=glue/sst2", cwd=workdir)
    assert again.returncode == 0
    assert "Already done" in again.stdout + again.stderr
    assert json.loads(record_path.read_text()) == record  # untouched


def test_carved_task_is_marked_in_its_record(workdir):
    result = lorafactory(*TINY_RUN, "task=glue/qnli", cwd=workdir)
    assert result.returncode == 0, result.stderr
    [record_path] = (workdir / "runs").rglob("result.json")
    assert "not comparable" in json.loads(record_path.read_text())["data_note"]
    # QNLI asks for the BERT pooler to train with the head (task.train_in_full): it is saved with the adapter.
    state = torch.load(record_path.parent / "adapter.pt", weights_only=True)
    assert {"bert.pooler.dense.weight", "bert.pooler.dense.bias"} <= set(state)


def test_variant_zoo_lists_every_registered_variant(workdir):
    from lorafactory.variants import VARIANTS

    result = lorafactory(cwd=workdir, module="lorafactory.variants")
    assert result.returncode == 0, result.stderr
    for name in VARIANTS.names():
        cls = VARIANTS.get(name)
        assert name in result.stdout and cls.params_formula in result.stdout and cls.paper in result.stdout


def test_the_committed_zoo_page_is_current(workdir):
    result = lorafactory("--markdown", cwd=workdir, module="lorafactory.variants")
    committed = (Path(__file__).parents[1] / "docs" / "zoo.md").read_text()
    assert result.stdout == committed, "docs/zoo.md is stale: python -m lorafactory.variants --markdown > docs/zoo.md"


MISTAKES = [
    (["variant=doraa"], "unknown variant 'doraa'. Did you mean 'dora'? Valid: adalora, allora"),
    (["task=glue/sst3"], "unknown task 'glue/sst3'"),
    (["model=bert-tiny"], "unknown model 'bert-tiny'"),
    (["-m", "variant=lora,doraa"], "unknown variant 'doraa'"),
    (["--cfg", "job", "variant=doraa"], "unknown variant 'doraa'"),
    (["variant.rr=16"], "unknown config key 'variant.rr'"),
    (["trainer.max_steps=3"], "unknown config key 'trainer.max_steps'; did you mean task.max_steps?"),
    (["+foo=1"], "unknown config key 'foo'"),
    (["+task.eval_every_n_stepz=4"], "unknown config key 'task.eval_every_n_stepz'"),
    (["variant.r=0"], "variant.r must be >= 1, got 0"),
    (["variant.r=2.5"], "variant.r must be an integer, got 2.5"),
    (["variant.alpha=-2"], "variant.alpha must be > 0, got -2"),
    (["optim.lr=-1e-3"], "optim.lr must be a number > 0, got -0.001"),
    (["optim.lr=abc"], "optim.lr must be a number > 0, got 'abc'"),
    (["-m", "optim.lr=1e-3,abc"], "optim.lr must be a number > 0, got 'abc'"),
    (["task.batch_size=0"], "task.batch_size must be an integer >= 1, got 0"),
    (["task.max_train_samples=0"], "task.max_train_samples must be an integer >= 1 (or null), got 0"),
    (["task.max_steps=-5"], "task.max_steps must be an integer >= 0 (or null), got -5"),
    (["task.max_length=0"], "task.max_length must be an integer >= 8, got 0"),
    (["task.epochs=0"], "task.epochs must be an integer >= 1, got 0"),
    (["trainer.evals_per_epoch=0"], "trainer.evals_per_epoch must be an integer >= 1, got 0"),
    (["seed=-1"], "seed must be an integer >= 0, got -1"),
    (["seed=abc"], "seed must be an integer >= 0, got 'abc'"),
    (["name=../../x"], "name must be a folder name under paths.runs"),
    (["model=hub"], "model=hub needs a Hub id: add model.id=<id>"),
    (["model=tiny-vit"], "model tiny-vit takes vision input; task glue/sst2 is a text task"),
]
if not torch.cuda.is_available():
    MISTAKES.append((["trainer=gpu"], "trainer=gpu) needs a CUDA GPU and this machine has none"))


@pytest.mark.parametrize(("args", "expected"), MISTAKES, ids=[" ".join(a) for a, _ in MISTAKES])
def test_mistakes_are_caught_before_anything_is_built(args, expected):
    """Every mistake in a command is found by checking the composed config, before Hydra starts a run: it answers in
    the time `--help` takes, not after loading a model and data."""
    from lorafactory.config import check_overrides
    from lorafactory.errors import UserError

    with pytest.raises(UserError) as caught:
        check_overrides(["model=tiny-bert", *args])
    assert expected in str(caught.value)


@pytest.mark.parametrize("args", [["+task.eval_every_n_steps=4"], ["+task.eval_every_n_steps=4,8", "seed=0,1"]])
def test_what_the_code_reads_is_accepted(args):
    """`+` adds a key the config lacks: an optional field the code reads is accepted, swept or not."""
    from lorafactory.config import check_overrides

    check_overrides(["model=tiny-bert", *args])


# Target names can only be checked against the model's modules, once it is built: the run reports them.
TARGET_TYPO = (["variant.targets=[query,valeu]"], "variant.targets: 'valeu' (in ['query', 'valeu']) matched no")
SUBPROCESS_MISTAKES = [MISTAKES[i] for i in (0, 4, 7, 12, 18)] + [TARGET_TYPO]


@pytest.mark.parametrize(("args", "expected"), SUBPROCESS_MISTAKES, ids=[" ".join(a) for a, _ in SUBPROCESS_MISTAKES])
def test_user_mistakes_print_one_line(workdir, args, expected):
    result = lorafactory(*TINY_RUN, *args, cwd=workdir)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr
    if args == TARGET_TYPO[0]:  # found once the model is built, in a run folder that records it (a sweep counts it)
        [record] = (workdir / "runs").rglob("result.json")
        assert json.loads(record.read_text())["status"] == "failed"
        return
    assert not (workdir / "runs").exists(), "a mistake must not leave a run folder behind"


def test_unwritable_places_are_one_line(workdir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = lorafactory(*TINY_RUN, f"paths.runs={blocker}/runs", cwd=workdir)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: cannot write the run folder" in result.stderr and "paths.runs" in result.stderr
    result = lorafactory(*TINY_RUN, cwd=workdir, env={"LORAFACTORY_CACHE": str(blocker / "cache")})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: paths.cache_dir (LORAFACTORY_CACHE)" in result.stderr and "not writable" in result.stderr


def test_missing_data_says_which_dataset_where_it_looked_and_how_to_get_it(workdir, tmp_path):
    empty = tmp_path / "no-data-here"
    empty.mkdir()
    result = lorafactory(*TINY_RUN, "task=glue/rte", cwd=workdir, env={"LORAFACTORY_DATA_DIR": str(empty)})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "nyu-mll/glue" in line and "rte" in line and str(empty) in line
    assert "LORAFACTORY_DATA_DIR" in line and "network" in line
