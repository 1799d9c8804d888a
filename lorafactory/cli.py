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
from lorafactory.config import CONF_DIR, check_overrides
from lorafactory.errors import UserError

log = logging.getLogger("lorafactory")


def quiet() -> None:
    """Keep the console to the progress bar and our own lines."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    from lorafactory.models import quiet_transformers
    from lorafactory.train import run

    quiet()
    quiet_transformers()
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    if cfg.threads is None and multirun:
        # Parallel jobs share the cores instead of oversubscribing them.
        n_jobs = hc.launcher.get("n_jobs") or 1
        n_jobs = os.cpu_count() if n_jobs < 0 else n_jobs
        cfg.threads = max(1, (os.cpu_count() or 1) // n_jobs)
    try:
        record = run(cfg, hc.runtime.output_dir, list(hc.overrides.task))
    except UserError as err:
        if multirun:
            log.error("failed (recorded): %s", err)
            return
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except Exception:
        if multirun:
            log.exception("failed (recorded in %s)", hc.runtime.output_dir)
            return
        raise
    if record.status == "ok":
        metric = record.primary_metric
        print(
            f"{record.status}: {record.variant} on {record.task}: {metric} {record.final_metric:.4f} "
            f"(best {record.best_metric:.4f} at step {record.best_step}) -> {record.run_dir}/result.json"
        )
    else:
        print(f"{record.status}: {record.variant} on {record.task}: {record.error}", file=sys.stderr)
        if not multirun:
            sys.exit(1)


class SweepSummary(Callback):
    """At the end of a sweep, how its runs stand and the command that makes the report."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from lorafactory.results.render import status_text
        from lorafactory.results.status import sweep_status

        sweep_dir = Path(config.hydra.sweep.dir)
        if sweep_dir.is_dir():
            print(status_text(sweep_status(sweep_dir), sweep_dir))
            print(f"report: python -m lorafactory.report {sweep_dir}")


def main() -> None:
    try:
        check_overrides(sys.argv[1:])
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    hydra_main()
