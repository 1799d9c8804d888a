"""Runs a cluster user can trust: one owner per run folder, signals that checkpoint and say so, a resumed run that is
the run it would have been, divergence recorded as such, and folders and files that stay what they were."""

from __future__ import annotations

import csv
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_sweeps import TINY, records, run

from lorafactory.results.record import read_record
from lorafactory.runlock import RunLock, RunningElsewhere, is_locked

# Long enough to be caught in the middle (64 examples × 20 epochs at batch 4: 320 steps; all of the mirror's 64
# training sentences, none set aside for selection).
LONG = [
    *TINY,
    "task.max_train_samples=64",
    "task.selection_samples=0",
    "task.batch_size=4",
    "task.epochs=20",
    "trainer.ckpt_every_n_steps=16",
]
# Long enough that a test starved of CPU by a loaded machine still finds it running (1,600 steps): for tests that
# stop it anyway.
LONGER = [*LONG, "task.epochs=100"]


def start(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lorafactory", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ,
    )


def wait_for(find, process: subprocess.Popen, timeout: float = 180.0):
    """Poll `find()` until it returns something, while `process` runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        found = find()
        if found:
            return found
        time.sleep(0.01)
    out, err = process.communicate() if process.poll() is not None else ("", "")
    pytest.fail(f"gave up waiting (exit {process.poll()}): {err[-2000:]}")


def first_checkpoint(root: Path):
    return lambda: next(root.rglob("last.ckpt"), None) if root.exists() else None


# --- 1. one owner per run folder ---------------------------------------------------------------------------------


def test_a_second_launch_of_a_running_folder_says_so_and_does_not_train(workdir):
    first = start(*LONGER, "name=twice", cwd=workdir)
    wait_for(first_checkpoint(workdir / "runs"), first)
    second = run(*LONGER, "name=twice", cwd=workdir)
    assert second.returncode == 3, second.stderr
    assert f"running elsewhere (pid {first.pid} on host " in second.stderr
    assert first.poll() is None, "the first owner must still be running"
    first.send_signal(signal.SIGTERM)  # its own end, not the second launch's: the record says so
    out, err = first.communicate(timeout=300)
    assert first.returncode == 143, err
    [record] = records(workdir / "runs").values()
    assert record.status == "interrupted" and record.resumed == 0  # the first owner's record, untouched by the second


def hold_lock(folder: Path) -> subprocess.Popen:
    """Another process that owns `folder` until its stdin closes."""
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from lorafactory.runlock import RunLock\nwith RunLock({str(folder)!r}):\n input()"],
        stdin=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not is_locked(folder) and time.monotonic() < deadline:
        time.sleep(0.01)
    return holder


def test_a_sweep_moves_past_a_run_owned_elsewhere(workdir):
    from lorafactory.config import run_id

    folder = workdir / "runs" / "shared" / "tiny-bert" / "glue" / "sst2" / "lora" / run_id([*TINY, "name=shared"], 0)
    holder = hold_lock(folder)
    sweep = run("-m", *TINY, "name=shared", "seed=0,1", cwd=workdir)
    holder.communicate("\n", timeout=60)
    assert sweep.returncode == 0, sweep.stdout + sweep.stderr
    assert "Skipping (running elsewhere, pid" in sweep.stdout + sweep.stderr
    assert "skipped by this launch  1" in sweep.stdout
    assert [r.seed for r in records(workdir / "runs").values()] == [1]


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / ".lock").write_text("pid 999999 on host gone\n")  # the file of a killed owner; the OS lock died with it
    assert not is_locked(folder)
    with RunLock(folder):
        assert f"pid {os.getpid()}" in (folder / ".lock").read_text()


def test_the_lock_is_exclusive_between_processes(tmp_path):
    holder = hold_lock(tmp_path)
    with pytest.raises(RunningElsewhere, match=f"pid {holder.pid}"):
        RunLock(tmp_path).__enter__()
    holder.communicate("\n", timeout=60)
    with RunLock(tmp_path):  # released with its owner
        pass


# --- 2. signals ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGUSR1, 138)])
def test_a_signal_checkpoints_records_interrupted_and_a_relaunch_resumes(workdir, signum, code):
    process = start(*LONGER, "name=signalled", cwd=workdir)
    wait_for(first_checkpoint(workdir / "runs"), process)
    process.send_signal(signum)
    out, err = process.communicate(timeout=120)
    assert process.returncode == code, err
    assert f"interrupted by {signal.Signals(signum).name}" in err
    [record] = records(workdir / "runs").values()
    assert record.status == "interrupted" and "launch again to resume" in record.error
    run_dir = Path(record.run_dir)
    stopped_at = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert stopped_at % 16 != 0 or stopped_at > 16  # saved at the signal, not only at the periodic checkpoint

    again = run(*LONGER, "name=signalled", cwd=workdir)
    assert again.returncode == 0, again.stderr
    final = read_record(run_dir)
    assert final.status == "ok" and final.resumed == 1 and final.steps == 1600
    assert (run_dir / "result.interrupted-1.json").is_file()


def test_a_signalled_sweep_stops_with_a_summary(workdir):
    process = start("-m", *LONGER, "name=stopped", "seed=0,1", cwd=workdir)
    wait_for(first_checkpoint(workdir / "runs"), process)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert "interrupted             1" in out  # the summary, and the second run was not started
    assert len(records(workdir / "runs")) == 1


def test_a_signal_after_training_records_the_run_ok_and_stops_the_sweep(workdir):
    """SIGTERM during the last validation, when no training step is left to stop at: the run finishes and is recorded
    `ok`, and the sweep stops there, exit 143, instead of losing the signal and starting its next run."""
    script = Path(__file__).with_name("signal_at_last_validation.py")
    result = subprocess.run(
        [sys.executable, str(script), "-m", *TINY, "name=late", "seed=0,1"],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=600,
        env=os.environ,
    )
    assert result.returncode == 143, result.stderr[-3000:]
    assert "interrupted by SIGTERM after the run had finished training (recorded ok)" in result.stderr
    [record] = records(workdir / "runs").values()
    assert record.status == "ok" and record.seed == 0  # recorded, and seed 1 never started


def test_a_signal_at_the_end_of_a_validation_stops_with_143_not_0(workdir):
    """SIGTERM after the last validation batch's hooks, where Lightning raises its own SystemExit at the epoch's end:
    still an `interrupted` record and exit 143."""
    script = Path(__file__).with_name("signal_at_validation_end.py")
    result = subprocess.run(
        [sys.executable, str(script), *LONG, "name=valend"], cwd=workdir, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 143, result.stderr[-3000:]
    [record] = records(workdir / "runs").values()
    assert record.status == "interrupted"


# --- 3. a resumed run is the run it would have been ----------------------------------------------------------------


def test_a_killed_and_resumed_run_ends_exactly_as_an_uninterrupted_one(workdir):
    args = [*LONG, "optim.lr=3e-2", "task.epochs=6", "trainer.ckpt_every_n_steps=5", "trainer.evals_per_epoch=3"]
    args.append("trainer.log_every_n_steps=1")
    whole = run(*args, "name=whole", cwd=workdir)
    assert whole.returncode == 0, whole.stderr
    killed = start(*args, "name=killed", cwd=workdir)
    checkpoint = wait_for(first_checkpoint(workdir / "runs" / "killed"), killed)
    wait_for(lambda: torch.load(checkpoint, weights_only=True)["global_step"] >= 40, killed)  # mid-epoch 2
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    resumed = run(*args, "name=killed", cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr

    [a] = records(workdir / "runs" / "whole").values()
    [b] = records(workdir / "runs" / "killed").values()
    assert b.resumed == 1 and a.resumed == 0
    assert [h["step"] for h in a.history] == [h["step"] for h in b.history]
    for ha, hb in zip(a.history, b.history, strict=True):
        for key in ha:
            assert hb[key] == pytest.approx(ha[key], abs=1e-6), (key, ha, hb)
    assert b.wall_time_s > 0 and b.throughput > 0
    # The metric log keeps the rows written before the kill, once each, at the steps the record counts: the
    # uninterrupted run's rows.
    log_a, log_b = metric_rows(a), metric_rows(b)
    assert [int(r["step"]) for r in log_b if r["val/loss"]] == [h["step"] for h in b.history], log_b
    train_a = {int(r["step"]): float(r["train/loss"]) for r in log_a if r["train/loss"]}
    train_b = [(int(r["step"]), float(r["train/loss"])) for r in log_b if r["train/loss"]]
    assert [step for step, _ in train_b] == list(range(1, b.steps + 1)), log_b
    for step, loss in train_b:
        assert loss == pytest.approx(train_a[step], abs=1e-6), step


def metric_rows(record) -> list[dict[str, str]]:
    with open(Path(record.run_dir) / "logs" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


# --- 4. divergence -------------------------------------------------------------------------------------------------


def test_a_run_whose_loss_runs_away_is_diverged_not_ok(workdir):
    args = ["task.max_train_samples=64", "task.batch_size=4", "task.epochs=3", "optim=sgd", "optim.lr=100"]
    result = run(*TINY, *args, cwd=workdir)
    assert result.returncode == 1, result.stdout + result.stderr
    [record] = records(workdir / "runs").values()
    assert record.status == "diverged"
    assert any(s in record.error for s in ("ran away", "exploded", "became")), record.error


def test_the_divergence_rule():
    from lorafactory.errors import Diverged
    from lorafactory.training.callbacks import DivergenceGuard

    class Trainer:
        global_step = 0
        sanity_checking = False

    guard = DivergenceGuard(factor=3.0, window=5, reference_steps=3)
    for loss in [1.0, 1.0, 1.0, 2.0, 2.5, 2.9, 2.9, 2.9]:  # high but within 3× of the start: noisy, not diverged
        guard.on_train_batch_end(Trainer(), None, {"loss": torch.tensor(loss)})
    with pytest.raises(Diverged, match="more than 3× its first 3 steps"):
        for loss in [9.0] * 5:
            guard.on_train_batch_end(Trainer(), None, {"loss": torch.tensor(loss)})


def test_an_exploding_or_nan_validation_loss_is_divergence():
    from lorafactory.errors import Diverged
    from lorafactory.training.callbacks import DivergenceGuard

    class Trainer:
        global_step = 7
        sanity_checking = False

    class Module:
        history = [{"step": 7, "loss": 6.9}]

    guard = DivergenceGuard(eval_factor=10.0, reference_steps=2)
    for loss in (0.6, 0.8):
        guard.on_train_batch_end(Trainer(), None, {"loss": torch.tensor(loss)})
    guard.on_validation_end(Trainer(), Module())  # below 10× the first steps' mean 0.7
    for loss, shown in ((7.1, "7.1"), (float("nan"), "nan")):
        Module.history = [{"step": 7, "loss": loss}]
        with pytest.raises(Diverged, match=f"validation loss exploded: {shown} at step 7, more than 10× "):
            guard.on_validation_end(Trainer(), Module())


def test_a_resumed_runs_wall_time_and_throughput_add_up_every_attempt():
    from lorafactory.training.callbacks import RunStats

    first = RunStats(variant=None, attempt_start=time.perf_counter() - 30.0)  # trained 30 s up to its checkpoint
    first.step_times, first.samples = [0.5, 0.5], 8
    second = RunStats(variant=None, attempt_start=time.perf_counter() - 10.0)  # the relaunch, 10 s so far
    second.load_state_dict(first.state_dict())
    second.step_times.append(1.0)
    second.samples += 4

    assert second.wall_s == pytest.approx(40.0, abs=1.0)
    assert second.summary()["throughput"] == pytest.approx(12 / 2.0)
    assert second.summary()["resumed"] == 1


# --- 8, 9, 10. sweeps, folders and files ---------------------------------------------------------------------------


def test_a_sweep_with_failures_exits_non_zero_after_running_everything(workdir):
    result = run("-m", *TINY, "variant.targets=[query],[nothing_here]", "name=mixed", cwd=workdir)
    assert result.returncode == 1
    assert "1 run(s) of the sweep failed or diverged" in result.stderr
    assert {r.status for r in records(workdir / "runs").values()} == {"ok", "failed"}


def test_a_relaunched_sweep_leaves_finished_runs_untouched(workdir):
    first = run("-m", *TINY, "seed=0,1", "name=again", cwd=workdir)
    assert first.returncode == 0, first.stderr
    files = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (workdir / "runs" / "again").rglob("*") if p.is_file()}
    files = {p: v for p, v in files.items() if p.name != "multirun.yaml"}
    second = run("-m", *TINY, "seed=0,1", "name=again", cwd=workdir)
    assert second.returncode == 0, second.stderr
    assert "Skipping (done)" in second.stdout + second.stderr
    for path, (content, mtime) in files.items():
        assert path.read_bytes() == content and path.stat().st_mtime_ns == mtime, path


def test_a_relaunched_single_run_leaves_its_finished_folder_untouched(workdir):
    first = run(*TINY, "name=single", cwd=workdir)
    assert first.returncode == 0, first.stderr
    root = workdir / "runs" / "single"
    files = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}
    second = run(*TINY, "name=single", cwd=workdir)
    assert second.returncode == 0, second.stderr
    assert "Already done, skipping: " in second.stderr and second.stdout.startswith("ok: lora on glue/sst2: accuracy ")
    assert {p for p in root.rglob("*") if p.is_file()} == set(files)  # not even a new run.log line or .hydra file
    for path, (content, mtime) in files.items():
        assert path.read_bytes() == content and path.stat().st_mtime_ns == mtime, path


def test_a_single_run_owned_elsewhere_is_refused_before_anything_is_written(workdir):
    from lorafactory.config import run_id

    folder = workdir / "runs" / "owned" / "tiny-bert" / "glue" / "sst2" / "lora" / run_id([*TINY, "name=owned"], 0)
    holder = hold_lock(folder)
    second = run(*TINY, "name=owned", cwd=workdir)
    holder.communicate("\n", timeout=60)
    assert second.returncode == 3 and "skipped: running elsewhere (pid " in second.stderr, second.stderr
    assert sorted(p.name for p in folder.iterdir()) == [".lock"]  # Hydra wrote no .hydra/ nor run.log


def test_records_are_readable_by_the_group(workdir):
    result = run(*TINY, cwd=workdir)
    assert result.returncode == 0, result.stderr
    [path] = (workdir / "runs").rglob("result.json")
    assert path.stat().st_mode & 0o044 == 0o044


class Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_planted_checkpoint_is_not_executed_and_is_kept_aside(workdir):
    probe = run(*TINY, "task.epochs=1", "name=planted", cwd=workdir)  # learn the folder
    [record] = records(workdir / "runs").values()
    run_dir = Path(record.run_dir)
    (run_dir / "result.json").unlink()
    (run_dir / "checkpoints").mkdir()
    with open(run_dir / "checkpoints" / "last.ckpt", "wb") as f:
        pickle.dump({"state_dict": Payload()}, f)
    again = run(*TINY, "task.epochs=1", "name=planted", cwd=workdir)
    assert probe.returncode == 0 and again.returncode == 0, again.stderr
    assert not (workdir / "pwned").exists() and not (run_dir / "pwned").exists()
    assert read_record(run_dir).status == "ok" and read_record(run_dir).resumed == 0
    assert (run_dir / "last.ckpt.corrupt-1").is_file()  # kept for inspection after the run cleaned up


# --- 11, 12. messages and state -------------------------------------------------------------------------------------


def test_an_unreadable_mirror_file_is_named(workdir, fake_mirror, tmp_path):
    import shutil

    broken = tmp_path / "broken-mirror"
    shutil.copytree(fake_mirror, broken)
    target = broken / "nyu-mll" / "glue" / "sst2" / "train-00000-of-00001.parquet"
    target.write_bytes(target.read_bytes()[:100])
    result = subprocess.run(
        [sys.executable, "-m", "lorafactory", *TINY, "paths.cache_dir=" + str(tmp_path / "cache")],
        cwd=workdir,
        capture_output=True,
        text=True,
        env={**os.environ, "LORAFACTORY_DATA_DIR": str(broken)},
        timeout=300,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "train-00000-of-00001.parquet" in result.stderr and "Hub failed" not in result.stderr


@pytest.mark.parametrize(("logger", "pattern"), [("tensorboard", "tb/events.out.tfevents.*"), ("wandb", "wandb/*")])
def test_other_loggers_write_into_the_run_folder(workdir, logger, pattern):
    pytest.importorskip({"tensorboard": "tensorboard", "wandb": "wandb"}[logger])
    result = subprocess.run(
        [sys.executable, "-m", "lorafactory", *TINY, f"logger={logger}"],
        cwd=workdir,
        capture_output=True,
        text=True,
        env={**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    [record] = records(workdir / "runs").values()
    assert list(Path(record.run_dir).glob(pattern)), sorted(p.name for p in Path(record.run_dir).rglob("*"))


def test_sigusr1_in_a_slurm_job_requeues_the_job_and_sigterm_does_not(tmp_path, monkeypatch):
    from lorafactory.cli import requeue_on_slurm
    from lorafactory.training.callbacks import Interrupted

    calls = tmp_path / "calls"
    scontrol = tmp_path / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    for name in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_NTASKS", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")

    requeue_on_slurm(Interrupted(signal.SIGTERM, None))  # scancel or preemption: relaunching is the user's call
    assert not calls.exists()
    requeue_on_slurm(Interrupted(signal.SIGUSR1, None))  # the time limit is near: the same job goes back in the queue
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "100")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    requeue_on_slurm(Interrupted(signal.SIGUSR1, None))
    assert calls.read_text().splitlines() == ["requeue 4242", "requeue 100_3"]


@pytest.mark.parametrize("reachable", [True, False])
def test_wandb_runs_offline_when_its_server_cannot_be_reached(monkeypatch, reachable):
    import socket

    from hydra import compose, initialize_config_dir

    import lorafactory.variants  # noqa: F401  (the variant configs the composition needs)
    from lorafactory.config import CONF_DIR

    class Connection:
        def close(self) -> None:
            pass

    def connect(address, timeout=None):
        if not reachable:
            raise OSError("Network is unreachable")
        return Connection()

    monkeypatch.setattr(socket, "create_connection", connect)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["logger=wandb"])
    assert cfg.logger.offline is (not reachable)
