"""Sweeps as a user runs them: every combination into one folder, failures recorded while the sweep goes on,
relaunches that skip finished runs, resume a killed one and rerun failed ones, parallel jobs, and the report."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from lorafactory.config import config_drift
from lorafactory.results.record import RunRecord, read_record, write_record

TINY = ["model=tiny-bert", "task.max_train_samples=32", "task.max_eval_samples=16", "trainer.progress_bar=false"]


def run(*args: str, cwd: Path, module: str = "lorafactory") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=os.environ
    )


def records(root: Path) -> dict[str, RunRecord]:
    """Every record under `root`, keyed by its folder relative to `root`."""
    return {str(p.parent.relative_to(root)): read_record(p) for p in sorted(root.rglob("result.json"))}


def test_sweep_runs_every_combination_into_one_folder_and_reports(workdir):
    result = run("-m", *TINY, "variant=lora,dora", "optim.lr=1e-3,3e-3", "seed=0,1", "name=study", cwd=workdir)
    assert result.returncode == 0, result.stderr
    found = records(workdir / "runs" / "study")
    assert len(found) == 8 and all(r.status == "ok" for r in found.values())
    combos = {(r.variant, r.lr, r.seed) for r in found.values()}
    assert combos == {(v, lr, s) for v in ("lora", "dora") for lr in (1e-3, 3e-3) for s in (0, 1)}
    assert "done                    8" in result.stdout and "python -m lorafactory.report runs/study" in result.stdout

    report = run("runs/study", "--out", "reports/study", cwd=workdir, module="lorafactory.report")
    assert report.returncode == 0, report.stderr
    table = (workdir / "reports" / "study" / "leaderboard.csv").read_text().splitlines()
    header = table[0].split(",")
    rows = [dict(zip(header, line.split(","), strict=False)) for line in table[1:]]
    assert sorted(r["variant"] for r in rows) == ["dora", "lora"]
    assert all(r["n"] == "2" for r in rows)  # two seeds at the chosen learning rate
    assert (workdir / "reports" / "study" / "index.html").is_file()


def test_failures_are_recorded_the_sweep_goes_on_and_a_relaunch_only_reruns_them(workdir):
    args = ["-m", *TINY, "variant.targets=[nothing_here],[query]", "name=mixed"]
    first = run(*args, cwd=workdir)
    assert first.returncode == 1, first.stderr  # every run ran; the sweep says one failed
    found = records(workdir / "runs" / "mixed")
    by_status = {r.status: r for r in found.values()}
    assert set(by_status) == {"ok", "failed"}
    assert "'nothing_here'" in by_status["failed"].error and "matched no" in by_status["failed"].error
    [ok_folder] = [workdir / "runs" / "mixed" / k for k, r in found.items() if r.status == "ok"]
    ok_bytes = (ok_folder / "result.json").read_bytes()

    again = run(*args, cwd=workdir)
    assert again.returncode == 1, again.stderr
    assert "Skipping (done)" in again.stdout + again.stderr
    assert (ok_folder / "result.json").read_bytes() == ok_bytes  # the finished run was not touched
    [failed_folder] = [workdir / "runs" / "mixed" / k for k, r in found.items() if r.status == "failed"]
    assert (failed_folder / "result.failed-1.json").is_file()  # the earlier failure is kept, the run tried again
    assert read_record(failed_folder).status == "failed"


def test_a_diverging_run_is_recorded_as_diverged(workdir):
    result = run(*TINY, "task.max_train_samples=64", "task.batch_size=4", "optim=sgd", "optim.lr=1e30", cwd=workdir)
    assert result.returncode == 1
    [record] = records(workdir / "runs").values()
    assert record.status == "diverged" and "loss became" in record.error


def test_a_killed_run_resumes_from_its_checkpoint(workdir):
    args = [*TINY, "task.max_train_samples=64", "task.selection_samples=0", "task.batch_size=2", "task.epochs=12"]
    args.append("trainer.ckpt_every_n_steps=8")
    process = subprocess.Popen(
        [sys.executable, "-m", "lorafactory", *args, "name=killed"],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=os.environ,
    )
    deadline = time.monotonic() + 120
    checkpoint = None
    while time.monotonic() < deadline and process.poll() is None and checkpoint is None:
        checkpoint = next((workdir / "runs").rglob("last.ckpt"), None) if (workdir / "runs").exists() else None
        time.sleep(0.01)
    assert checkpoint is not None, "the run finished or failed before writing a checkpoint"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    run_dir = checkpoint.parent.parent
    assert not (run_dir / "result.json").exists()

    resumed = run(*args, "name=killed", cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming from" in resumed.stdout + resumed.stderr
    record = read_record(run_dir)
    assert record.status == "ok" and record.steps == 12 * 32  # the full schedule, not restarted from zero
    assert len(record.history) >= 2  # evaluations from before the kill were kept with the checkpoint


def test_a_finished_run_trained_with_other_settings_runs_again(workdir):
    """The run id hashes the overrides, not the defaults: after a default changes (a variant's `lr_mult`, set from a
    study), a finished run sits in the folder of a run it is not. A relaunch trains it again and keeps the old record
    aside, in a sweep as in a single run; an unchanged one is still skipped."""
    args = ["-m", *TINY, "variant=lora", "optim.lr_scale=1,2", "name=drift"]
    assert run(*args, cwd=workdir).returncode == 0
    root = workdir / "runs" / "drift"
    [folder] = [root / k for k, r in records(root).items() if r.config["optim"]["lr_scale"] == 1]
    record = read_record(folder)  # as if trained when lora's default lr_mult was 0.5
    record.config["variant"]["lr_mult"], record.config["optim"]["lr"] = 0.5, record.lr / 2
    write_record(folder, record)

    again = run(*args, cwd=workdir)
    assert again.returncode == 0, again.stderr
    out = again.stdout + again.stderr
    assert "variant.lr_mult: 0.5 → 1" in out and f"optim.lr: {record.lr / 2} → {record.lr}" in out
    assert out.count("Skipping (done)") == 1  # the lr_scale=2 run
    assert read_record(folder / "result.stale-1.json").config["variant"]["lr_mult"] == 0.5
    assert read_record(folder).config["variant"]["lr_mult"] == 1 and read_record(folder).status == "ok"


def test_bracketing_reuses_a_grids_runs_and_retrains_a_stale_one(workdir):
    """`sweep=lr_bracket` starts from what the run folders hold: a grid sweep's finished runs are its first round, a
    run trained with other settings is trained again, and a best rate at an edge of what was tried is extended past
    it until the budget is spent."""
    assert run("-m", *TINY, "name=br", "optim.lr_scale=1,2", cwd=workdir).returncode == 0
    root = workdir / "runs" / "br"
    [stale] = [root / k for k, r in records(root).items() if r.config["optim"]["lr_scale"] == 2]
    record = read_record(stale)  # as if trained when lora's default lr_mult was 0.5
    record.config["variant"]["lr_mult"] = 0.5
    write_record(stale, record)

    rule = ["hydra.sweeper.lr.grid=[1,2]", "hydra.sweeper.lr.budget=3", "hydra.sweeper.lr.refine=0"]
    bracket = run("-m", *TINY, "sweep=lr_bracket", "name=br", "variant=lora", "seed=0", *rule, cwd=workdir)
    assert bracket.returncode == 0, bracket.stderr
    out = bracket.stdout + bracket.stderr
    # round 1 trains only the stale rate again (×1 is reused as it is), then the search extends past an edge: with two
    # points tried, the best is at one
    assert "round 1: 1 runs" in out and "optim.lr_scale=2 seed=0" in out and "variant.lr_mult: 0.5 → 1" in out
    assert (stale / "result.stale-1.json").is_file() and read_record(stale).config["variant"]["lr_mult"] == 1
    scales = sorted(r.config["optim"]["lr_scale"] for r in records(root).values())
    assert len(scales) == 3 and {1, 2} < set(scales) and "of 3 tried" in out


def test_config_drift_compares_what_a_run_computes():
    trained = {"optim": {"lr": 1e-3, "lr_scale": 1}, "variant": {"r": 8, "lr_mult": 0.5}, "paths": {"runs": "a"}}
    now = {"optim": {"lr": 0.001, "lr_scale": 1.0}, "variant": {"r": 8, "lr_mult": 0.5, "new_field": 3}}
    assert config_drift(trained, now | {"paths": {"runs": "b"}, "name": "x"}) == []  # same numbers, same run
    now["variant"]["r"] = 16
    assert config_drift(trained, now) == ["variant.r: 8 → 16"]


def test_parallel_jobs_write_correct_records(workdir):
    result = run(
        "-m", *TINY, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "variant=lora,pissa", "seed=0,1", cwd=workdir
    )
    assert result.returncode == 0, result.stderr
    found = records(workdir / "runs" / "default")
    assert len(found) == 4 and all(r.status == "ok" for r in found.values())
    for folder, record in found.items():
        assert folder.split("/")[3] == record.variant and folder.endswith(f"-s{record.seed}")
        assert Path(record.run_dir).resolve() == (workdir / "runs" / "default" / folder).resolve()


def _write_many(path: str, tag: int) -> None:
    for i in range(200):
        write_record(path, RunRecord(status="ok", model="m", task="t", variant=f"v{tag}", seed=i, lr=1e-3))


def test_concurrent_writers_never_leave_a_partial_record(tmp_path):
    writers = [multiprocessing.Process(target=_write_many, args=(str(tmp_path), tag)) for tag in range(2)]
    for w in writers:
        w.start()
    reads = 0
    while any(w.is_alive() for w in writers):
        if (tmp_path / "result.json").exists():
            json.loads((tmp_path / "result.json").read_text())  # raises on a torn write
            reads += 1
    for w in writers:
        w.join()
    assert reads > 0 and read_record(tmp_path).variant in ("v0", "v1")
    assert not list(tmp_path.glob(".result.json.*"))  # no temp files left behind
