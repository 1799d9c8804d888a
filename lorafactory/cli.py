"""The command line: `python -m lorafactory [overrides]` trains one run, `-m` sweeps.

Mistakes (unknown names, impossible values, missing data) print one line and exit with status 2. In a sweep a failing
run is recorded as failed and the sweep goes on.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

import lorafactory.variants  # noqa: F401  (registers every variant's config in Hydra's ConfigStore)
from lorafactory.config import CONF_DIR, check_overrides, check_run_folder
from lorafactory.errors import UserError
from lorafactory.slots import available_cores

log = logging.getLogger("lorafactory")


def quiet() -> None:
    """Keep the console to the progress bar and our own lines."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
    # Lightning cannot see that our loader resumes mid-epoch (`training.callbacks.DataProgress` restores its position
    # and the random state), so it warns on every resume that results may be unreliable: they are exact (tested).
    warnings.filterwarnings("ignore", ".*resuming from a checkpoint that ended before the epoch ended.*")
    # torch's deprecation inside Lightning's own pytree helper: nothing a user can act on.
    warnings.filterwarnings("ignore", r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    from lorafactory.models import quiet_transformers
    from lorafactory.runlock import RunningElsewhere
    from lorafactory.train import run
    from lorafactory.training.callbacks import Interrupted

    quiet()
    quiet_transformers()
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    if cfg.threads is None and multirun:
        # Parallel jobs share the cores instead of oversubscribing them.
        cores = available_cores()
        n_jobs = hc.launcher.get("n_jobs") or 1
        n_jobs = cores if n_jobs < 0 else n_jobs
        cfg.threads = max(1, cores // n_jobs)
    try:
        record = run(cfg, hc.runtime.output_dir, list(hc.overrides.task))
    except RunningElsewhere as err:
        if not other_rank():
            print(f"skipped: {err}", file=sys.stderr)
        if multirun:
            return  # another process owns the run; the sweep goes on
        sys.exit(EXIT_RUNNING_ELSEWHERE)
    except Interrupted as err:
        if other_rank():  # rank 0 says it, and requeues the job once
            sys.exit(err.exit_code)
        print(f"interrupted: {cfg.variant.name} on {cfg.task.name}: {err}", file=sys.stderr)
        if multirun:  # the whole sweep was asked to stop: say where it stands, and stop
            print(sweep_summary(Path(hc.sweep.dir)))
        requeue_on_slurm(err)
        sys.exit(err.exit_code)
    except UserError as err:
        if multirun:
            log.error("failed (recorded): %s", err)
            return
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except Exception:
        if multirun:
            log.exception("failed (recorded in %s)", hc.runtime.output_dir)
            return
        raise
    if record is None:  # another rank of a run on several devices: rank 0 reports it
        return
    if record.status == "ok":
        say_ok(record)
    else:
        print(f"{record.status}: {record.variant} on {record.task}: {record.error}", file=sys.stderr)
        if not multirun:
            sys.exit(EXIT_FAILED)


def say_ok(record: Any) -> None:
    print(
        f"ok: {record.variant} on {record.task}: {record.primary_metric} {record.final_metric:.4f} "
        f"(best {record.best_metric:.4f} at step {record.best_step}) -> {record.run_dir}/result.json"
    )


def settled(folder: Path, cfg: DictConfig) -> bool:
    """Whether a single run is settled before it starts: its folder is owned by a live process (said, exit 3), or
    holds the `ok` record of these very settings (said, True). Looked at before Hydra writes its `.hydra/` and
    `run.log` into the folder, which would replace a finished run's training log; `train.run` checks both again
    under the folder's lock."""
    from lorafactory.config import run_state
    from lorafactory.runlock import owner

    state, record = run_state(folder, cfg)
    if state == "elsewhere":
        print(f"skipped: running elsewhere ({owner(folder)}): {folder}", file=sys.stderr)
        sys.exit(EXIT_RUNNING_ELSEWHERE)
    if state == "done":
        print(f"Already done, skipping: {folder}", file=sys.stderr)
        say_ok(record)
    return state == "done"


# Exit statuses (README, "What a run writes"): 0 ok; 1 a run failed or diverged (a sweep: any of its runs);
# 2 a mistake in the command, config or environment; 3 the run folder is owned by another live process;
# 128 + N stopped by signal N (143 SIGTERM, 138 SIGUSR1) after a checkpoint: launch again to resume.
EXIT_FAILED, EXIT_USER_ERROR, EXIT_RUNNING_ELSEWHERE = 1, 2, 3


def requeue_on_slurm(err: Exception) -> None:
    """SIGUSR1 in a SLURM job (`--signal=USR1@<seconds>` before its time limit): put the same job back in the queue;
    the relaunch resumes from the checkpoint just saved."""
    import signal
    import subprocess

    job = os.environ.get("SLURM_JOB_ID")
    if getattr(err, "signum", None) != signal.SIGUSR1 or not job or other_rank():  # once per job: from rank 0
        return
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        print(f"requeued SLURM job {job}" if done.returncode == 0 else f"scontrol requeue {job}: {done.stderr}")
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"could not requeue SLURM job {job}: {exc}", file=sys.stderr)


def other_rank() -> bool:
    """Whether this process is a rank other than 0 of a run on several devices, started by torchrun, SLURM or
    Lightning (rank 0 speaks for the run)."""
    from lorafactory.training.distributed import external_ranks

    found = external_ranks()
    if found is not None:
        return found[0] != 0
    return int(os.environ.get("LOCAL_RANK", "0")) != 0 and int(os.environ.get("WORLD_SIZE", "1")) > 1


def sweep_summary(sweep_dir: Path) -> str:
    from hydra_plugins.lorafactory_sweeper import LorafactorySweeper
    from lorafactory.results.render import status_text
    from lorafactory.results.status import sweep_status

    status = sweep_status(sweep_dir)
    status.skipped = [folder for _, folder in LorafactorySweeper.skipped]
    return status_text(status, sweep_dir)


class SweepSummary(Callback):
    """At the end of a sweep, how its runs stand and the command that makes the report; remembers whether any run
    failed, so the command exits non-zero."""

    failed = 0

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from lorafactory.results.status import sweep_status

        sweep_dir = Path(config.hydra.sweep.dir)
        if sweep_dir.is_dir() and not other_rank():
            print(sweep_summary(sweep_dir))
            status = sweep_status(sweep_dir)
            SweepSummary.failed = len(status.failed) + len(status.diverged)
            print(f"report: python -m lorafactory.report {sweep_dir}")


def main() -> None:
    try:
        check_overrides(sys.argv[1:])
        single = check_run_folder(sys.argv[1:])
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    if single is not None and settled(*single):
        return
    hydra_main()
    if SweepSummary.failed:
        print(f"{SweepSummary.failed} run(s) of the sweep failed or diverged (see above)", file=sys.stderr)
        sys.exit(EXIT_FAILED)
