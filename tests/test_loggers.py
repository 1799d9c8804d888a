"""Each metric logger writes something a reader can open: TensorBoard event files with the validation metrics, and a
wandb run stored offline (this machine cannot reach api.wandb.ai) with its history."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_sweeps import TINY


def train(workdir: Path, *args: str, env: dict[str, str] | None = None) -> Path:
    result = subprocess.run(
        [sys.executable, "-m", "lorafactory", *TINY, "task.epochs=2", "name=logged", *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [record] = (workdir / "runs" / "logged").rglob("result.json")
    return record.parent


def test_tensorboard_events_hold_the_validation_metrics(workdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = train(workdir, "logger=tensorboard", "trainer.log_every_n_steps=1")
    [events] = (run_dir / "tb").rglob("events.out.tfevents.*")
    reader = EventAccumulator(str(events.parent))
    reader.Reload()
    record = json.loads((run_dir / "result.json").read_text())
    accuracy = reader.Scalars("val/accuracy")
    assert [e.step for e in accuracy] == [h["step"] for h in record["history"]]
    assert accuracy[-1].value == pytest.approx(record["history"][-1]["accuracy"], abs=1e-6)
    # Training losses at the optimizer step they come from, as the record counts steps (Lightning's own step, the
    # steps done before the batch, would be one less).
    assert [e.step for e in reader.Scalars("train/loss")] == list(range(1, record["steps"] + 1))


def test_wandb_runs_offline_into_the_run_folder(workdir):
    run_dir = train(workdir, "logger=wandb", env={"WANDB_SILENT": "true", "WANDB_MODE": "offline"})
    [offline] = (run_dir / "wandb").glob("offline-run-*")
    [history] = offline.glob("run-*.wandb")
    assert history.stat().st_size > 0
    assert "val/accuracy" in history.read_bytes().decode("latin-1")
