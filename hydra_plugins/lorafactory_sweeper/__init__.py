"""lorafactory's Hydra sweepers.

- `hydra/sweeper=lorafactory` (the default of `conf/config.yaml`): Hydra's basic grid sweeper that does not launch
  runs whose folder already holds an `ok` record or is owned by a live process, so a relaunched sweep leaves finished
  runs untouched (Hydra would rewrite their `.hydra/` and `run.log` before the run could say it is done).
- With `hydra.sweeper.lr` set (`sweep=lr_bracket`): for every combination of the swept values but the learning rate
  and the seed, a search in log learning rate that brackets the optimum (`lorafactory.bracket`): it launches a round
  of runs through the configured launcher, reads their records, and decides the next round, until every search is
  over. Finished runs are reused, so a stopped search resumes where it was.
"""

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
class BracketConf:
    key: str = "optim.lr_scale"
    """The swept learning-rate override (a multiple of each variant's default rate by default)."""
    grid: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0])
    step: float = 2.0
    budget: int = 8
    refine: int = 1


@dataclass
class LorafactorySweeperConf:
    _target_: str = "hydra_plugins.lorafactory_sweeper.LorafactorySweeper"
    max_batch_size: int | None = None
    params: dict[str, str] | None = field(default=None)
    lr: BracketConf | None = None
    """None: the grid of `params`. Set: bracket each combination's learning rate instead (`sweep=lr_bracket`)."""


ConfigStore.instance().store(group="hydra/sweeper", name="lorafactory", node=LorafactorySweeperConf)


class LorafactorySweeper(BasicSweeper):
    skipped: list[tuple[str, Path]] = []
    """(reason, run folder) of every job this process's sweeps did not launch, for the summary."""

    def __init__(self, max_batch_size: int | None, params: dict[str, str] | None = None, lr: Any = None) -> None:
        super().__init__(max_batch_size, params)
        self.bracket = None
        if lr is not None:
            from lorafactory.bracket import BracketRule

            self.key = lr.key
            self.bracket = BracketRule(
                tuple(float(x) for x in lr.grid), float(lr.step), int(lr.budget), int(lr.refine)
            )

    def sweep(self, arguments: list[str]) -> Any:
        return super().sweep(arguments) if self.bracket is None else self.bracket_sweep(arguments)

    def get_job_batch(self) -> Sequence[Sequence[str]]:
        return self._launchable([list(overrides) for overrides in super().get_job_batch()])

    def _job(self, overrides: list[str]) -> Any:
        """The job's composed config (with `hydra`), as its launch will see it."""
        from hydra.core.hydra_config import HydraConfig

        assert self.hydra_context is not None and self.config is not None
        job: Any = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        HydraConfig.instance().set_config(job)  # the run folder's path reads `${hydra:overrides.task}`
        return job

    @staticmethod
    def _folder_of(job: Any) -> Path:
        from omegaconf import OmegaConf

        return Path(OmegaConf.select(job, "hydra.sweep.dir")) / OmegaConf.select(job, "hydra.sweep.subdir")

    def _folder(self, overrides: list[str]) -> Path:
        return self._folder_of(self._job(overrides))

    def _skip_reason(self, overrides: list[str]) -> tuple[str | None, Path | None]:
        """Why not to launch a job (`config.run_state`): owned by a live process, or done with these settings."""
        from lorafactory.config import run_state
        from lorafactory.runlock import owner

        job = self._job(overrides)
        folder = self._folder_of(job)
        state, _ = run_state(folder, job)
        if state == "elsewhere":
            return f"running elsewhere, {owner(folder)}", folder
        return state, folder

    # --- learning-rate bracketing ------------------------------------------------------------------------------------
    def bracket_sweep(self, arguments: list[str]) -> Any:
        """Rounds of runs until every (model, task, variant, ...) has its best learning rate bracketed, or its budget
        is spent (`lorafactory.bracket`). Every seed runs at every learning rate; their mean is the score."""
        import itertools

        from hydra.core.override_parser.overrides_parser import OverridesParser
        from omegaconf import OmegaConf

        from lorafactory.bracket import next_lrs, summarise

        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        overrides = parser.parse_overrides(self._parse_config() + list(arguments))
        axes: dict[str, list[str]] = {}
        for o in overrides:
            key = o.get_key_element()
            if key.lstrip("+~") == self.key:
                raise ValueError(f"sweep=lr_bracket chooses {self.key} itself; remove it from the command line")
            values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
            axes[key] = [f"{key}={v}" for v in values]
        seeds = axes.pop("seed", ["seed=0"])
        cells = [list(combo) for combo in itertools.product(*axes.values())]
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")

        # Reuse what run folders already hold: the starting grid from an earlier launch, or from a grid sweep.
        scores = [self._known(cell, seeds, self.bracket.grid) for cell in cells]
        blocked: set[int] = set()  # a run owned by another process: nothing to decide on in this launch
        returns, job_idx = [], 0
        for round_ in itertools.count(1):
            proposals = {i: next_lrs(scores[i], self.bracket) for i in range(len(cells)) if i not in blocked}
            proposals = {i: lrs for i, lrs in proposals.items() if lrs}
            if not proposals:
                break
            batch = [
                [*cells[i], f"{self.key}={lr:g}", seed] for i, lrs in proposals.items() for lr in lrs for seed in seeds
            ]
            launch = self._launchable(batch)
            log.info("Learning-rate bracketing, round %d: %d runs", round_, len(launch))
            if launch:
                returns.append(self.launcher.launch(launch, initial_job_idx=job_idx))
                job_idx += len(launch)
            for i, lrs in proposals.items():
                found = self._known(cells[i], seeds, lrs)
                if len(found) < len(lrs):
                    blocked.add(i)
                scores[i].update(found)
        for i, cell in enumerate(cells):
            state = summarise(scores[i])
            verdict = "bracketed" if state["bracketed"] else "NOT bracketed (budget spent, or runs owned elsewhere)"
            log.info(
                "%s: best %s=%s of %d tried, %s", " ".join(cell), self.key, state["best"], state["tried"], verdict
            )
        return returns

    def _launchable(self, batch: list[list[str]]) -> list[list[str]]:
        """The runs of `batch` to launch, each once: not those done or owned by another process (logged, and listed
        for the sweep's summary). A search may propose one run twice in a round (a space of choices only)."""
        keep, seen = [], set()
        for overrides in batch:
            if tuple(overrides) in seen:
                continue
            seen.add(tuple(overrides))
            reason, folder = self._skip_reason(overrides)
            if reason is None:
                keep.append(overrides)
            else:
                log.info("Skipping (%s): %s", reason, folder)
                LorafactorySweeper.skipped.append((reason, folder))
        return keep

    def _outcome(self, overrides: list[str]) -> float | None:
        """The run's score, higher is better (WORSE if it diverged or failed); None if it has no record."""
        from lorafactory.bracket import WORSE
        from lorafactory.config import settings_drift
        from lorafactory.results.record import read_record

        job = self._job(overrides)
        try:
            record = read_record(self._folder_of(job))
        except (OSError, ValueError, TypeError):
            return None
        if record.status == "interrupted" or settings_drift(record.config, job):
            return None  # not run yet with these settings
        metric = record.selection_metric if record.selection_metric is not None else record.final_metric
        if record.status != "ok" or metric is None:
            return WORSE
        return metric if record.direction == "max" else -metric

    def _known(self, cell: list[str], seeds: list[str], lrs: Any) -> dict[float, float]:
        """Mean score per learning rate of `lrs` for which every seed has a result (a diverged or failed seed makes
        the rate WORSE)."""
        from lorafactory.bracket import WORSE, canonical

        scores = {}
        for lr in lrs:
            outcomes = [self._outcome([*cell, f"{self.key}={lr:g}", seed]) for seed in seeds]
            if any(o is None for o in outcomes):
                continue
            finite = [o for o in outcomes if o > WORSE]
            scores[canonical(lr)] = sum(finite) / len(finite) if len(finite) == len(outcomes) else WORSE
        return scores
