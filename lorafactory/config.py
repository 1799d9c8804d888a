"""Hydra glue: OmegaConf resolvers, the deterministic run id, and a one-line check of command-line overrides.

Run folders are `runs/<name>/<model>/<task>/<variant>/<run id>`, where the run id hashes the overrides that change
what is trained (not the ones already in the path, nor logging or launcher settings) and ends with the seed. The same
command therefore always lands in the same folder, which is what lets a relaunched sweep skip finished runs.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from lorafactory.errors import ConfigError, UnknownNameError

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


def check_overrides(args: Sequence[str]) -> None:
    """Fail with one line on an unknown group option (`variant=doraa`) or config key, or a value of the wrong type.

    Sweeps are checked through their first value of each choice; anything this cannot parse is left to Hydra."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Glob
    from hydra.errors import HydraException

    overrides = [a for a in args if not a.startswith("-")]
    if len(overrides) != len([a for a in args if a not in ("-m", "--multirun")]):
        return  # other Hydra flags (--cfg, --config-name, ...): leave everything to Hydra
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException:
        return
    single = []
    for o in parsed:
        key = o.key_or_group.lstrip("+~")
        if key.startswith("hydra"):
            continue
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
                continue
            values = [v for v in o.sweep_string_iterator()]
        else:
            values = [o.get_value_element_as_str()]
        if key in GROUPS:
            valid = group_options(key)
            for value in values:
                if value not in valid and value != "null":
                    raise UnknownNameError(key, value, valid)
        single.append(f"{o.input_line.split('=', 1)[0]}={values[0]}" if values else o.input_line)
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            compose(config_name="config", overrides=single)
    except HydraException as err:
        raise ConfigError(_one_line(err)) from None


def _one_line(err: Exception) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    head = lines[0] if lines else type(err).__name__
    detail = next((ln for ln in lines[1:] if not ln.startswith(("full_key", "object_type", "To append"))), "")
    missing = re.match(r"Could not override '([^']+)'", head)
    if missing:
        return f"unknown config key '{missing.group(1)}' ({detail}); `--cfg job` prints every key"
    return f"{head} {detail}".strip()
