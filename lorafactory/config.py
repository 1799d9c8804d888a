"""Hydra glue: OmegaConf resolvers, the deterministic run id, and a one-line check of command-line overrides.

Run folders are `runs/<name>/<model>/<task>/<variant>/<run id>`, where the run id hashes the overrides that change
what is trained (not the ones already in the path, nor logging or launcher settings) and ends with the seed. The same
command therefore always lands in the same folder, which is what lets a relaunched sweep skip finished runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from lorafactory.errors import ConfigError, UnknownNameError

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("model", "variant", "task", "optim", "scheduler", "trainer", "logger", "sweep", "experiment")
# Overrides that do not change what is trained: group choices already in the path, naming, logging and launching.
# (`variant=dora` is in the path; `variant.r=16` is not, and is hashed.)
RUN_ID_IGNORED = (
    "name",
    "seed",
    "model",
    "task",
    "variant",
    "sweep",
    "save_adapter",
    "threads",
    "trainer.progress_bar",
)
RUN_ID_IGNORED_PREFIXES = ("hydra", "logger", "paths")


def _canonical(value: Any) -> Any:
    """Values that mean the same config hash the same: 1e-4 and 0.0001, 16 and 16.0."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int | float):
        value = float(value)
        return int(value) if value.is_integer() else float(f"{value:.10g}")
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in sorted(value.items())}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return str(value)


def run_id(overrides: Sequence[str], seed: Any) -> str:
    """`<8 hex digits of the relevant overrides>-s<seed>`, or `default-s<seed>` when there are none."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    items = []
    for o in parsed:
        key = o.key_or_group.lstrip("+~")
        if key in RUN_ID_IGNORED or key.split(".")[0].split("/")[0] in RUN_ID_IGNORED_PREFIXES:
            continue
        items.append([key, _canonical(o.value())])
    if not items:
        return f"default-s{seed}"
    digest = hashlib.sha1(json.dumps(sorted(items, key=lambda kv: kv[0])).encode()).hexdigest()[:8]
    return f"{digest}-s{seed}"


DRIFT_IGNORED = (
    "name",
    "save_adapter",
    "threads",
    "paths",
    "logger",
    "hydra",
    "trainer.progress_bar",
    "trainer.log_every_n_steps",
    "trainer.ckpt_every_n_steps",
    "trainer.device_slots",
    "trainer.accelerator",
    "trainer.devices",
)
"""Settings that do not change what a run computes (naming, logging, checkpointing, where it runs)."""


def config_drift(trained: Any, now: Any, prefix: str = "") -> list[str]:
    """`key: was → now` for each setting a finished run was trained with that its configuration resolves to
    differently today, e.g. after a variant's default `lr_mult` changed. The run id hashes the overrides, not the
    defaults, so such a run sits in the folder of a run it is not. Settings that only one side has are not compared:
    a field added since (whose default keeps the old behaviour) must not make every earlier run stale."""
    if isinstance(trained, dict) and isinstance(now, dict):
        out = []
        for key in sorted(set(trained) & set(now), key=str):
            path = f"{prefix}{key}"
            if path not in DRIFT_IGNORED:
                out += config_drift(trained[key], now[key], f"{path}.")
        return out
    if _canonical(trained) == _canonical(now):
        return []
    return [f"{prefix.rstrip('.')}: {trained} → {now}"]


def resolved(cfg: Any) -> dict[str, Any] | None:
    """`cfg` without Hydra's own node, resolved to plain data as run records store it; None if it does not resolve
    (the run then fails on it, and says why)."""
    try:
        return OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
    except Exception:  # any unresolvable value
        return None


def settings_drift(trained: Any, cfg: Any) -> list[str]:
    """`config_drift` between a record's settings and those `cfg` resolves to now; none when `cfg` does not resolve
    (the run then fails on it, and says why)."""
    now = resolved(cfg)
    return [] if now is None else config_drift(trained, now)


def run_state(folder: Path, cfg: Any) -> tuple[str | None, Any]:
    """What a launch finds in a run folder before it trains: ("elsewhere", None) when a live process owns it,
    ("done", the record) when it holds the `ok` record of the settings `cfg` resolves to, else (None, None): the run
    goes. An `ok` record of other settings (`config_drift`) is named in a warning; `train.run` keeps it aside."""
    from lorafactory.results.record import RECORD_NAME, read_record
    from lorafactory.runlock import is_locked

    if is_locked(folder):
        return "elsewhere", None
    try:
        record = read_record(folder / RECORD_NAME)
    except (OSError, ValueError, TypeError):  # none, or unreadable: the run goes again (and keeps it aside)
        return None, None
    if record.status != "ok":
        return None, None
    drift = settings_drift(record.config, cfg)
    if drift:
        log.warning("Trained with other settings (%s), running again: %s", "; ".join(drift), folder)
        return None, None
    return "done", record


def _mul(*factors: Any) -> float:
    out = 1.0
    for f in factors:
        out *= float(f)
    return float(f"{out:.10g}")  # 1e-3 * 0.5 prints as 0.0005, not 0.0005000000000000001


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "--", str(text)).strip("-") or "model"


def _offline(host: str) -> bool:
    """True when `host` cannot be reached on port 443 within a second (used to put loggers in offline mode)."""
    try:
        socket.create_connection((host, 443), timeout=1.0).close()
        return False
    except OSError:
        return True


def register_resolvers() -> None:
    resolvers = {"lf.run_id": run_id, "lf.mul": _mul, "lf.slug": _slug, "lf.offline": _offline}
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()


# --- checking overrides before Hydra composes ------------------------------------------------------------------------


def group_options(group: str) -> list[str]:
    """The options of a config group: YAML files under conf/<group>/ and dataclasses in Hydra's ConfigStore."""
    from hydra.core.config_store import ConfigStore

    import lorafactory.variants  # noqa: F401  (registers the variant dataclasses)

    names = set()
    root = CONF_DIR / group
    if root.is_dir():
        names |= {str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml")}
    stored = ConfigStore.instance().repo.get(group, {})
    names |= {n.removesuffix(".yaml") for n in stored if n.endswith(".yaml")}
    return sorted(names)


# Hydra flags that take a value; `--cfg job variant=doraa` still gets its overrides checked.
FLAGS_WITH_VALUE = ("--cfg", "-c", "--package", "-p", "--info", "-i", "--experimental-rerun")
FLAGS_OWN_CONFIG = ("--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd")


def split_args(args: Sequence[str]) -> list[str] | None:
    """The overrides among command-line arguments, without Hydra's flags; None when the command selects another
    primary config (nothing here can check that one)."""
    overrides, skip = [], False
    for i, arg in enumerate(args):
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in FLAGS_OWN_CONFIG:
            return None
        if arg in FLAGS_WITH_VALUE:
            # `--info` may stand alone; the others always take a value
            skip = arg not in ("--info", "-i") or (i + 1 < len(args) and "=" not in args[i + 1])
            continue
        if arg.startswith("-"):
            continue
        overrides.append(arg)
    return overrides


def check_overrides(args: Sequence[str]) -> None:
    """Fail with one line, before Hydra starts, on any mistake in the command: an unknown group option
    (`variant=doraa`), an unknown key (`trainer.max_steps`, `+foo=1`), a value of the wrong type or range — for every
    value of a sweep, each checked in a config composed with the first value of the others (`schema.validate`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Glob
    from hydra.errors import HydraException

    overrides = split_args(args)
    if overrides is None:
        return
    multirun = any(a in ("-m", "--multirun") for a in args)
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as err:
        raise ConfigError(_one_line(err)) from None
    from lorafactory.schema import RULES

    choices: list[list[str]] = []  # each override as typed, once per value it sweeps
    for o in parsed:
        key = o.key_or_group  # the parser keeps `+`, `++` and `~` apart, in `o.type`
        raw_key = ("++" if o.is_force_add() else "+" if o.is_add() else "~" if o.is_delete() else "") + key
        if key.startswith("hydra"):
            continue
        if o.is_add() and key not in GROUPS and key not in RULES:
            # optional keys the code reads (`+task.eval_every_n_steps=4`) are in the schema; any other is a typo
            raise ConfigError(
                f"unknown config key '{key}' ({o.input_line}): '+' adds a key the config does not have, and nothing "
                "would read it; `--cfg job` prints every key"
            )
        if isinstance(o.value(), Glob):  # expand glob() as Hydra will: over the group's top level only
            options = group_options(key) if key in GROUPS else []
            values = o.value().filter([n for n in options if "/" not in n])
            if key in GROUPS and not values:
                raise ConfigError(
                    f"{o.input_line} matches no {key} (glob does not reach into subfolders); "
                    f"list them instead: {key}={','.join(options)}"
                )
        elif o.is_sweep_override():
            if not o.is_choice_sweep():
                continue  # ranges and intervals: left to Hydra and to the run
            values = [v for v in o.sweep_string_iterator()]
        else:
            values = [o.get_value_element_as_str()]
        if key in GROUPS:
            valid = group_options(key)
            for value in values:
                if value not in valid and value != "null":
                    raise UnknownNameError(key, value, valid)
        if o.is_delete() and o.value() is None:
            choices.append([o.input_line])  # `~key` alone
        else:
            choices.append([f"{raw_key}={value}" for value in values])
    # Hydra's own overrides are kept for the launch check: whether several devices can be launched depends on them.
    hydra_overrides = [o.input_line for o in parsed if o.key_or_group.lstrip("+~").startswith("hydra")]
    first = [c[0] for c in choices if c]
    _compose_and_validate(first, hydra_overrides, multirun)
    for i, overrides in enumerate(choices):
        for override in overrides[1:]:
            others = [c[0] for j, c in enumerate(choices) if j != i and c]
            _compose_and_validate([*others, override], hydra_overrides, multirun)


def check_run_folder(args: Sequence[str]) -> tuple[Path, Any] | None:
    """Fail with one line when the folder a command writes into (the run folder, or a sweep's) cannot be written:
    Hydra writes it before any of our code runs, and would answer with a traceback. For a single run, its folder and
    composed config (with `hydra`), so that the command can look at what the folder holds before Hydra writes there."""
    import tempfile

    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import HydraException

    overrides = split_args(args)
    if overrides is None:
        return None
    multirun = any(a in ("-m", "--multirun") for a in args)
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        multirun = multirun or str(OmegaConf.select(cfg, "hydra.mode")) == "RunMode.MULTIRUN"  # an enum
        folder = Path(OmegaConf.select(cfg, "hydra.sweep.dir" if multirun else "hydra.run.dir"))
    except (HydraException, ValueError, TypeError, KeyError):  # sweeps and exotic values: Hydra and the run decide
        return None
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is a file")
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-test-"):
            pass
    except OSError as err:
        raise ConfigError(
            f"cannot write the run folder {folder} ({err.strerror or err}); point paths.runs somewhere writable"
        ) from None
    return None if multirun else (folder, cfg)


def _compose_and_validate(overrides: list[str], hydra_overrides: Sequence[str] = (), multirun: bool = False) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    from lorafactory.schema import validate

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
    except HydraException as err:
        raise ConfigError(_one_line(err, overrides)) from None
    # Before `validate`: trainer=ddp on a machine without GPUs is refused under -m for the launch first.
    if _asks_for_devices(cfg):
        _check_launch_command(overrides, list(hydra_overrides), multirun)
    else:
        check_launch(cfg, multirun)
    validate(cfg)


def _asks_for_devices(cfg: Any) -> bool:
    from lorafactory.training.distributed import world_size

    try:
        return world_size(cfg.trainer) > 1
    except (TypeError, ValueError):  # not numbers: `validate` says so
        return False


def _check_launch_command(overrides: list[str], hydra_overrides: list[str], multirun: bool) -> None:
    """`check_launch` for a command, with the sweep mode and launcher its config chooses (a sweep config sets
    `hydra.mode: MULTIRUN`; `hydra/launcher=slurm_ddp` starts one task per device)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=[*overrides, *hydra_overrides], return_hydra_config=True)
        multirun = multirun or str(OmegaConf.select(cfg, "hydra.mode")) == "RunMode.MULTIRUN"  # an enum
        launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    except (HydraException, OmegaConfBaseException, ValueError, TypeError, KeyError):  # Hydra will say what is wrong
        return
    check_launch(cfg, multirun, launcher=launcher)


def check_launch(cfg: Any, multirun: bool, ranks: Any = None, launcher: dict[str, Any] | None = None) -> None:
    """Fail with one line when a run cannot have the devices its config asks for (`trainer.devices` ×
    `trainer.num_nodes` > 1: one run on several devices, `training.distributed`), before anything is built.

    `ranks` (`distributed.Ranks`) when the run is starting, its ranks known; else the command is checked, with its
    Hydra `launcher` config. Refused: `trainer.strategy=ddp` under a multirun when nothing but Lightning would start
    the ranks (it starts them by running the command again: the whole sweep, once per device)."""
    from lorafactory.training.distributed import STRATEGIES, external_ranks, world_size

    trainer = cfg.trainer
    strategy = trainer.get("strategy") or "auto"
    if strategy not in STRATEGIES:
        raise ConfigError(f"trainer.strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    nodes = trainer.get("num_nodes") or 1
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise ConfigError(f"trainer.num_nodes must be an integer >= 1, got {nodes!r}")
    world = ranks.world_size if ranks is not None else world_size(trainer)
    if world == 1:
        return
    if ranks is not None and ranks.launch == "external" and world != world_size(trainer):
        raise ConfigError(
            f"this run has {world} ranks (torchrun or SLURM tasks), but trainer.devices × trainer.num_nodes is "
            f"{world_size(trainer)}: set them to match"
        )
    if strategy == "auto":
        raise ConfigError(
            f"trainer.devices={trainer.devices} asks for one run on several devices: use trainer=ddp (GPUs) or "
            "trainer=ddp_cpu, or set trainer.strategy=ddp or ddp_spawn"
        )
    batch = cfg.task.batch_size
    if batch % world:
        raise ConfigError(
            f"task.batch_size={batch} is the global batch and must split evenly over the run's {world} devices: "
            f"make it a multiple of {world}"
        )
    if trainer.get("device_slots"):
        raise ConfigError("trainer.device_slots gives each run one device: it cannot go with trainer.devices > 1")
    if strategy == "ddp_spawn" and nodes > 1:
        raise ConfigError(
            "trainer.strategy=ddp_spawn starts the ranks of one node; for several nodes use trainer.strategy=ddp "
            "with hydra/launcher=slurm_ddp or torchrun"
        )
    if launcher is not None and "submitit" in str(launcher.get("_target_", "")):
        tasks, job_nodes = launcher.get("tasks_per_node", 1), launcher.get("nodes", 1)
        if (tasks, job_nodes) == (trainer.devices, nodes) or (tasks, strategy) == (1, "ddp_spawn"):
            return  # one task per rank; or one task that starts the ranks itself
        raise ConfigError(
            f"hydra.launcher.tasks_per_node={tasks} and nodes={job_nodes} must be trainer.devices={trainer.devices} "
            f"and trainer.num_nodes={nodes} for a run on several devices: hydra/launcher=slurm_ddp sets them"
        )
    relaunching = ranks.launch == "relaunch" if ranks is not None else external_ranks() is None and strategy == "ddp"
    if multirun and relaunching:
        raise ConfigError(
            "trainer.strategy=ddp starts each device's rank by running the command again, and a sweep's command "
            "(-m) runs the whole sweep: use trainer.strategy=ddp_spawn (trainer=ddp_cpu on the CPU), "
            "hydra/launcher=slurm_ddp on SLURM, or start the command with torchrun"
        )


def _all_keys(overrides: list[str]) -> list[str]:
    """Every dotted key of the config composed with `overrides` minus the failing ones (for suggestions)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    groups = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in GROUPS]
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=groups)
    except HydraException:
        return []
    keys: list[str] = []

    def walk(node: Any, prefix: str) -> None:
        for k in node:
            value = node._get_node(k)
            path = f"{prefix}{k}"
            if OmegaConf.is_dict(value):
                walk(value, path + ".")
            else:
                keys.append(path)

    walk(cfg, "")
    return keys


def _one_line(err: Exception, overrides: list[str] | None = None) -> str:
    import difflib

    text = f"{err}\n{err.__cause__}" if err.__cause__ is not None else str(err)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    head = lines[0] if lines else type(err).__name__
    missing = re.match(r"Could not override '([^']+)'", head)
    if missing:
        key = missing.group(1)
        keys = _all_keys(overrides or [])
        leaf = key.rsplit(".", 1)[-1]
        same_leaf = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]
        close = same_leaf or difflib.get_close_matches(key, keys, n=2, cutoff=0.6)
        hint = f"; did you mean {' or '.join(close[:2])}?" if close else ""
        return f"unknown config key '{key}'{hint} (`--cfg job` prints every key)"
    typed = re.search(r"Value '([^']*)' (?:of type '\w+' )?could not be converted to (\w+)", text)
    key = re.search(r"full_key: (\S+)", text)
    if typed and key:
        kind = {"Integer": "an integer", "Float": "a number", "Boolean": "true or false"}.get(typed.group(2))
        return f"{key.group(1)} must be {kind or typed.group(2)}, got {typed.group(1)}"
    detail = next((ln for ln in lines[1:] if not ln.startswith(("full_key", "object_type", "To append"))), "")
    return f"{head} {detail}".strip()
