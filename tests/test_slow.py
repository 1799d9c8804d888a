"""Slow: the real model on real data, as the README promises (`make test-slow`, needs the dataset mirror)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import data_dir

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(data_dir() is None, reason="needs the GLUE mirror (LORAFACTORY_DATA_DIR)"),
]


def test_default_dora_run_on_sst2_passes_080_within_15_minutes(tmp_path: Path):
    env = {**os.environ, "LORAFACTORY_DATA_DIR": str(data_dir()), "HF_HUB_OFFLINE": "1"}
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "lorafactory", "variant=dora", "task=glue/sst2", "trainer.progress_bar=false"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=15 * 60,
    )
    elapsed = time.monotonic() - start
    assert result.returncode == 0, result.stderr[-2000:]
    [path] = tmp_path.glob("runs/default/minilm-l6/glue/sst2/dora/*/result.json")
    record = json.loads(path.read_text())
    assert record["final"]["accuracy"] >= 0.80, record["history"]
    assert elapsed < 15 * 60


@pytest.mark.parametrize("task", ["glue/cola", "glue/mrpc", "glue/rte", "glue/stsb", "glue/qnli"])
def test_every_glue_task_trains_with_its_default_budget(tmp_path: Path, task: str):
    env = {**os.environ, "LORAFACTORY_DATA_DIR": str(data_dir()), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "lorafactory", f"task={task}", "trainer.progress_bar=false"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=20 * 60,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    [path] = tmp_path.glob("runs/default/minilm-l6/**/result.json")
    record = json.loads(path.read_text())
    # Clearly better than predicting the majority class (the floor each metric has on these validation sets).
    floor = {"glue/cola": 0.1, "glue/mrpc": 0.82, "glue/rte": 0.53, "glue/stsb": 0.7, "glue/qnli": 0.6}[task]
    assert record["final_metric"] > floor, record["history"]
