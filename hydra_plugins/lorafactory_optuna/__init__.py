"""`hydra/sweeper=optuna` (conf/hydra/sweeper/optuna.yaml): hyperparameter search with Optuna's TPE sampler, its
runs recorded like every other run (the same deterministic folders, `result.json`, the same report).

`hydra.sweeper.params` holds two kinds of values. Plain values and comma lists (`variant: lora,dora`, `glob(*)`) are a
grid, as for the basic sweeper: one Optuna study per combination. `interval(a, b)` (`tag(log, interval(a, b))` for a
log scale), `choice(a, b, ...)` and `range(...)` are searched within each study. `seed` is neither: every seed runs at
every trial's values and the trial's score is their mean, as in the learning-rate bracketing.

The objective is each run's `selection_metric` (held-out training examples, or validation for tasks reported on a test
set), the split the report chooses on, so the search does not fit the split results are reported on; records without
one (`task.selection_samples=0`) give their `final_metric`, as in the report. The direction is the task's. A trial
with a diverged run is told to Optuna as pruned, which its TPE ranks below every completed trial: the values that made
a run diverge are learned to be bad. A trial with a failed run (an error, not a score) is told as failed, which TPE
leaves out.

A relaunch of the same command proposes the same trials (the sampler is seeded and is told the same values in the same
order), finds their records and skips them, so a stopped search resumes and a larger `n_trials` extends it. The
studies' trials, values and run folders are written to `<sweep dir>/optuna.json`.

Why not Hydra's `hydra-optuna-sweeper`: it requires optuna < 3 (2.10, 2021), whose database storage fails with
SQLAlchemy 2, and it launches every trial, so Hydra rewrites `.hydra/` and `run.log` of finished runs on a relaunch.
This one is the grid sweeper of `lorafactory_sweeper` (which skips finished runs) with Optuna's ask-and-tell around it.
"""

# No `from __future__ import annotations`: Hydra executes plugin modules outside sys.modules, where dataclasses
# cannot resolve string annotations.
import importlib.util
import itertools
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore

# The module, not the class: Hydra's plugin scan executes `lorafactory_sweeper` again after this import, and the
# summary reads the skipped runs from the class that module then holds (its methods look the class up at call time).
from hydra_plugins import lorafactory_sweeper

log = logging.getLogger(__name__)


@dataclass
class OptunaConf:
    n_trials: int = 20
    """Trials per study (one study per combination of the grid's values)."""
    n_jobs: int = 1
    """Trials asked of each study per round, launched together (in parallel with the joblib, Ray or SLURM launcher).
    Part of what a relaunch must repeat to propose the same trials."""
    seed: int = 0
    """The TPE sampler's seed, the same for every study: every variant starts from the same random trials."""
    n_startup_trials: int = 8
    """Random trials before TPE models the scores."""


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.lorafactory_optuna.OptunaSweeper"
    params: dict[str, str] | None = field(default=None)
    optuna: OptunaConf = field(default_factory=OptunaConf)


ConfigStore.instance().store(group="hydra/sweeper", name="lorafactory_optuna", node=OptunaSweeperConf)


@dataclass
class Trial:
    """One trial's values as overrides, and what its runs ended as."""

    number: int
    overrides: list[str]
    runs: list[list[str]]
    state: str = "running"
    value: float | None = None
    note: str = ""


class OptunaSweeper(lorafactory_sweeper.LorafactorySweeper):
    def __init__(self, params: dict[str, str] | None = None, optuna: Any = None) -> None:
        super().__init__(max_batch_size=None, params=params)
        if importlib.util.find_spec("optuna") is None:  # say so before anything runs
            print('error: hydra/sweeper=optuna needs Optuna: pip install -e ".[optuna]"', file=sys.stderr)
            sys.exit(2)  # a mistake in the environment (README, exit statuses)
        conf = optuna if optuna is not None else OptunaConf()
        self.n_trials, self.n_jobs = int(conf.n_trials), int(conf.n_jobs)
        self.seed, self.n_startup_trials = int(conf.seed), int(conf.n_startup_trials)
        if self.n_trials < 1 or self.n_jobs < 1:
            raise ValueError("hydra.sweeper.optuna.n_trials and n_jobs must be at least 1")

    def sweep(self, arguments: list[str]) -> Any:
        import optuna
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from omegaconf import OmegaConf

        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        axes, space = split_space(parser.parse_overrides(self._parse_config() + list(arguments)))
        if not space:
            raise ValueError(
                "hydra.sweeper.params has nothing to search: add interval(...), choice(...) or range(...)"
            )
        seeds = axes.pop("seed", ["seed=0"])
        cells = [list(combo) for combo in itertools.product(*axes.values())]
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own lines say what each trial gave
        studies = []
        for cell in cells:
            # Multivariate: the best rate depends on the rank (the update's scale is alpha / r), so the two are
            # modelled jointly rather than each on its own.
            sampler = optuna.samplers.TPESampler(
                seed=self.seed, n_startup_trials=self.n_startup_trials, multivariate=True
            )
            studies.append(optuna.create_study(direction=self._direction(cell, seeds[0]), sampler=sampler))
        trials: list[list[Trial]] = [[] for _ in cells]
        returns, job_idx = [], 0
        for round_ in range(-(-self.n_trials // self.n_jobs)):
            asked = []
            for i, (cell, study) in enumerate(zip(cells, studies, strict=True)):
                for _ in range(min(self.n_jobs, self.n_trials - len(trials[i]))):
                    trial = study.ask(space)
                    values = [format_value(key, trial.params[key]) for key in space]
                    runs = [[*cell, *values, seed] for seed in seeds]
                    asked.append((i, trial, Trial(trial.number, values, runs)))
            launch = self._launchable([run for _, _, t in asked for run in t.runs])
            log.info("Optuna, round %d: %d trials, %d runs to launch", round_ + 1, len(asked), len(launch))
            if launch:
                round_returns = self.launcher.launch(launch, initial_job_idx=job_idx)
                job_idx += len(launch)
                returns.append(round_returns)
                for ret in round_returns:
                    _ = ret.return_value  # raises what a job raised outside its run, as Hydra's basic sweeper does
            for i, trial, found in asked:
                self._tell(studies[i], trial, found)
                trials[i].append(found)
                log.info("%s %s: %s %s", " ".join(cells[i]), " ".join(found.overrides), found.state, found.value)
        self._write(sweep_dir, cells, studies, trials)
        return returns

    def _direction(self, cell: list[str], seed: str) -> str:
        """`maximize` or `minimize`, as the cell's task declares its primary metric."""
        from lorafactory.tasks import get_task

        assert self.hydra_context is not None and self.config is not None
        job: Any = self.hydra_context.config_loader.load_sweep_config(self.config, [*cell, seed])
        return "maximize" if get_task(job.task).direction == "max" else "minimize"

    def _tell(self, study: Any, trial: Any, found: Trial) -> None:
        from optuna.trial import TrialState

        from lorafactory.results.record import read_record

        runs = []
        for overrides in found.runs:
            try:
                runs.append(read_record(self._folder(overrides)))
            except (OSError, ValueError, TypeError):
                runs.append(None)
        found.state, found.value, found.note = trial_outcome(runs)
        if found.state == "complete":
            study.tell(trial, found.value)
        else:
            study.tell(trial, state=TrialState.PRUNED if found.state == "pruned" else TrialState.FAIL)

    def _write(self, sweep_dir: Path, cells: list[list[str]], studies: list[Any], trials: list[list[Trial]]) -> None:
        from lorafactory.results.record import write_json_atomic

        out = []
        for cell, study, found in zip(cells, studies, trials, strict=True):
            complete = [t for t in found if t.state == "complete"]
            best = None
            if complete:
                pick = max if study.direction.name == "MAXIMIZE" else min
                top = pick(complete, key=lambda t: t.value)
                best = {"number": top.number, "overrides": top.overrides, "value": top.value}
                log.info(
                    "%s: best of %d trials %s = %s", " ".join(cell), len(found), " ".join(top.overrides), top.value
                )
            out.append(
                {
                    "cell": cell,
                    "direction": study.direction.name.lower(),
                    "best": best,
                    "trials": [
                        {
                            "number": t.number,
                            "overrides": t.overrides,
                            "state": t.state,
                            "value": t.value,
                            "note": t.note,
                            "runs": [str(self._folder(run).relative_to(sweep_dir)) for run in t.runs],
                        }
                        for t in found
                    ],
                }
            )
        write_json_atomic(sweep_dir / "optuna.json", {"objective": "selection_metric", "studies": out})


def trial_outcome(records: list[Any]) -> tuple[str, float | None, str]:
    """(state, value, note) of a trial from its runs' records (None: no readable record): `complete` with the mean
    objective over seeds, `pruned` when a run diverged (and none failed), else `failed`."""
    import math

    if any(r is None for r in records):
        return "failed", None, "no record"
    states = {r.status for r in records}
    if states == {"ok"}:
        scores = [r.selection_metric if r.selection_metric is not None else r.final_metric for r in records]
        if any(s is None or not math.isfinite(s) for s in scores):
            return "failed", None, "no objective in the record"
        return "complete", sum(scores) / len(scores), ""
    if states == {"ok", "diverged"} or states == {"diverged"}:
        return "pruned", None, "diverged"
    return "failed", None, ", ".join(sorted(states - {"ok"}))


def split_space(overrides: list[Any]) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """(grid: key -> its overrides, search space: key -> Optuna distribution). A later override of a key replaces an
    earlier one (the command line replaces `hydra.sweeper.params`)."""
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    axes: dict[str, list[str]] = {}
    space: dict[str, Any] = {}
    for o in overrides:
        key, value = o.get_key_element(), o.value()
        axes.pop(key, None)
        space.pop(key, None)
        if isinstance(value, IntervalSweep):  # Hydra reads its bounds as floats: integers are choice() or range()
            space[key] = FloatDistribution(float(value.start), float(value.end), log="log" in value.tags)
        elif isinstance(value, RangeSweep) or (isinstance(value, ChoiceSweep) and not value.simple_form):
            space[key] = CategoricalDistribution(list(o.sweep_string_iterator()))
        elif o.is_sweep_override():
            axes[key] = [f"{key}={v}" for v in o.sweep_string_iterator()]
        else:
            axes[key] = [f"{key}={o.get_value_element_as_str()}"]
    if any(key.lstrip("+~") == "seed" for key in space):
        raise ValueError("seed cannot be searched: every trial runs every seed (seed=0,1,2)")
    return axes, space


def format_value(key: str, value: Any) -> str:
    """An override for a trial's value; floats with 6 significant digits, so that the same trial proposed again is
    the same override (and so the same run folder) and the folder's overrides stay readable."""
    if isinstance(value, float):
        return f"{key}={float(f'{value:.6g}')!r}"
    return f"{key}={value}"
