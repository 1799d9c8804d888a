"""How far a sweep has got: run folders by state (done, failed, diverged, running or interrupted) and the runs its
`multirun.yaml` asked for that have no folder yet. Reads records and Hydra's files only."""

from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from lorafactory.results.record import RECORD_NAME, RunRecord, read_record

log = logging.getLogger(__name__)


# --- sweep progress --------------------------------------------------------------------------------------------------


@dataclass
class SweepStatus:
    """Run folders by state, and what a sweep asked for but has no folder yet."""

    done: list[Path] = field(default_factory=list)
    failed: list[Path] = field(default_factory=list)
    diverged: list[Path] = field(default_factory=list)
    interrupted: list[Path] = field(default_factory=list)
    """Stopped by a signal with a checkpoint: launching the sweep again resumes them."""
    running: list[Path] = field(default_factory=list)
    """A folder with a checkpoint or Hydra files but no record: still running, or killed."""
    skipped: list[Path] = field(default_factory=list)
    """Runs this launch did not start: done already, or owned by another live process (set by the sweep)."""
    unreadable: list[Path] = field(default_factory=list)
    expected: int | None = None
    """Runs the sweeps' `multirun.yaml` asked for; None when there is no multirun.yaml to say."""
    missing: list[list[str]] = field(default_factory=list)
    """The overrides of each expected run with no folder, when folders can be matched to overrides."""
    missing_count: int | None = None


def sweep_status(root: str | os.PathLike) -> SweepStatus:
    """Count run folders below `root` by state, and the runs its sweeps asked for that have no folder at all."""
    root = Path(root)
    status = SweepStatus()
    records: dict[Path, RunRecord] = {}
    for folder in sorted(run_folders(root)):
        if not (folder / RECORD_NAME).exists():
            status.running.append(folder)
            continue
        try:
            records[folder] = record = read_record(folder)
        except (OSError, ValueError, TypeError):
            status.unreadable.append(folder)
            continue
        states = {"ok": status.done, "failed": status.failed, "diverged": status.diverged}
        states.get(record.status, status.interrupted).append(folder)
    for multirun in sorted(root.rglob("multirun.yaml")):
        _count_missing(status, multirun, records)
    return status


def run_folders(root: Path) -> set[Path]:
    """Folders holding a record, a checkpoint folder or Hydra's `.hydra/`: every run that has started."""
    found = {p.parent for p in root.rglob(RECORD_NAME)}
    found |= {p.parent for name in (".hydra", "checkpoints") for p in root.rglob(name) if p.is_dir()}
    return found


def expected_runs(multirun: Path) -> list[list[str]] | None:
    """The overrides of every job a Hydra sweep asked for, as its basic sweeper expands them; None if unknowable."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Glob

    from lorafactory.config import group_options

    cfg = OmegaConf.load(multirun)
    if OmegaConf.select(cfg, "hydra.sweeper.lr") is not None or OmegaConf.select(cfg, "hydra.sweeper.optuna"):
        return None  # a bracketing or Optuna search decides its runs as it goes: no fixed list to expect
    params, task = OmegaConf.select(cfg, "hydra.sweeper.params"), OmegaConf.select(cfg, "hydra.overrides.task")
    # Like Hydra's basic sweeper: sweeper params first, command-line overrides replace those with the same key.
    arguments = [f"{key}={value}" for key, value in (params or {}).items()] + [str(o) for o in task or []]
    choices: dict[str, list[str]] = {}
    for override in OverridesParser.create().parse_overrides(arguments):
        key = override.get_key_element()
        if isinstance(override.value(), Glob):  # glob(*) over a group's top-level options, as Hydra expands it
            options = [n for n in group_options(key) if "/" not in n]
            choices[key] = [f"{key}={value}" for value in override.value().filter(options)]
        elif not override.is_sweep_override():
            choices[key] = [f"{key}={override.get_value_element_as_str()}"]
        elif override.is_discrete_sweep():
            choices[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
        else:  # an interval, for an optimizing sweeper: the runs are not known in advance
            return None
    return [list(job) for job in itertools.product(*choices.values())]


def _count_missing(status: SweepStatus, multirun: Path, records: dict[Path, RunRecord]) -> None:
    try:
        jobs = expected_runs(multirun)
    except Exception as err:  # a hand-edited or foreign multirun.yaml should not stop the count of the rest
        log.warning("cannot read the sweep in %s: %s", multirun, err)
        return
    if jobs is None:
        return
    status.expected = (status.expected or 0) + len(jobs)
    folders = list(run_folders(multirun.parent))
    found = [_override_set(_folder_overrides(f, records.get(f))) for f in folders]
    if any(overrides is None for overrides in found):
        # Some folder cannot be matched to its overrides: fall back to counting.
        missing = max(0, len(jobs) - len(folders))
    else:
        absent = [job for job in jobs if _override_set(job) not in found]
        status.missing += absent
        missing = len(absent)
    status.missing_count = (status.missing_count or 0) + missing


def _override_set(overrides: list[str] | None) -> frozenset[str] | None:
    """Overrides in Hydra's canonical spelling (`optim.lr=1e-4` and `optim.lr=0.0001` are the same run), or None."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    if overrides is None:
        return None
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException:
        return None
    return frozenset(f"{o.get_key_element()}={o.get_value_element_as_str()}" for o in parsed)


def _folder_overrides(folder: Path, record: RunRecord | None) -> list[str] | None:
    """The overrides a run folder was launched with: Hydra's copy (rewritten by each relaunch) or the record's."""
    hydra_copy = folder / ".hydra" / "overrides.yaml"
    if hydra_copy.is_file():
        try:
            return [str(o).strip() for o in OmegaConf.load(hydra_copy)]
        except Exception as err:  # a broken copy should not stop the count; the record may still say
            log.warning("cannot read %s: %s", hydra_copy, err)
    return None if record is None else [o.strip() for o in record.overrides]
