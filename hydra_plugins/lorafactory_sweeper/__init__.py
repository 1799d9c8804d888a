"""lorafactory's Hydra sweeper (`hydra/sweeper=lorafactory`, the default of `conf/config.yaml`): Hydra's basic grid
sweeper that does not launch runs whose folder already holds an `ok` record or is owned by a live process, so a
relaunched sweep leaves finished runs untouched (Hydra would rewrite their `.hydra/` and `run.log` before the run
could say it is done)."""

# No `from __future__ import annotations`: Hydra executes plugin modules outside sys.modules, where dataclasses
# cannot resolve string annotations.
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore

log = logging.getLogger(__name__)


@dataclass
class LorafactorySweeperConf:
    _target_: str = "hydra_plugins.lorafactory_sweeper.LorafactorySweeper"
    max_batch_size: int | None = None
    params: dict[str, str] | None = field(default=None)


ConfigStore.instance().store(group="hydra/sweeper", name="lorafactory", node=LorafactorySweeperConf)


class LorafactorySweeper(BasicSweeper):
    skipped: list[tuple[str, Path]] = []
    """(reason, run folder) of every job this process's sweeps did not launch, for the summary."""

    def get_job_batch(self) -> Sequence[Sequence[str]]:
        batch = super().get_job_batch()
        keep = []
        for overrides in batch:
            reason, folder = self._skip_reason(list(overrides))
            if reason is None:
                keep.append(overrides)
            else:
                log.info("Skipping (%s): %s", reason, folder)
                LorafactorySweeper.skipped.append((reason, folder))
        return keep

    def _skip_reason(self, overrides: list[str]) -> tuple[str | None, Path | None]:
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import OmegaConf

        from lorafactory.results.record import RECORD_NAME, read_record
        from lorafactory.runlock import is_locked, owner

        assert self.hydra_context is not None and self.config is not None
        job: Any = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        HydraConfig.instance().set_config(job)  # the run folder's path reads `${hydra:overrides.task}`
        folder = Path(OmegaConf.select(job, "hydra.sweep.dir")) / OmegaConf.select(job, "hydra.sweep.subdir")
        if is_locked(folder):
            return f"running elsewhere, {owner(folder)}", folder
        record = folder / RECORD_NAME
        if record.exists():
            try:
                if read_record(record).status == "ok":
                    return "done", folder
            except (OSError, ValueError, TypeError):
                pass  # an unreadable record: the run goes again (and keeps the record aside)
        return None, folder
