"""Checks of the whole composed config, run before anything heavy is built: every user mistake answers in about the
time `--help` takes, as one line naming the override to fix (`task.batch_size must be an integer >= 1, got 0`).

The YAML files stay short and untyped; the rules live here, one line per field. Variant fields are checked by the
variant's own config dataclass (`variants.base.build_variant`), tasks and models by their registries.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lorafactory.errors import ConfigError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*$")


def _get(cfg: DictConfig, key: str) -> Any:
    try:
        return OmegaConf.select(cfg, key, throw_on_missing=True)
    except OmegaConfBaseException as err:
        if "Missing mandatory value" in str(err):
            raise ConfigError(f"{key} must be set ({key}=...)") from None
        raise ConfigError(f"{key} cannot be resolved: {str(err).splitlines()[0]}") from None


def integer(low: int | None = None, optional: bool = False) -> Callable[[str, Any], None]:
    def rule(key: str, value: Any) -> None:
        if value is None and optional:
            return
        bound = f" >= {low}" if low is not None else ""
        none = " (or null)" if optional else ""
        if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
            raise ConfigError(f"{key} must be an integer{bound}{none}, got {value!r}")

    return rule


def number(low: float | None = None, high: float | None = None, above: bool = False, optional: bool = False):
    """A finite float in [low, high) (or (low, high) with `above`)."""

    def rule(key: str, value: Any) -> None:
        if value is None and optional:
            return
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        ok = ok and (low is None or (value > low if above else value >= low)) and (high is None or value < high)
        if not ok:
            lower = "" if low is None else f" {'>' if above else '>='} {low:g}"
            upper = "" if high is None else f" and < {high:g}"
            raise ConfigError(f"{key} must be a number{lower}{upper}, got {value!r}")

    return rule


def boolean(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")


def one_of(*choices: str) -> Callable[[str, Any], None]:
    def rule(key: str, value: Any) -> None:
        if value not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(choices)}, got {value!r}")

    return rule


def text(optional: bool = False) -> Callable[[str, Any], None]:
    """A non-empty string (a column, a split, a dataset)."""

    def rule(key: str, value: Any) -> None:
        if value is None and optional:
            return
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{key} must be a non-empty name{' (or null)' if optional else ''}, got {value!r}")

    return rule


def strings(key: str, value: Any) -> None:
    if not isinstance(value, list | tuple | ListConfig) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{key} must be a list of non-empty strings (e.g. ['\\n']), got {value!r}")


def template(*placeholders: str) -> Callable[[str, Any], None]:
    """A format string whose placeholders are among `placeholders` (any of them, or `{{`/`}}` for braces)."""

    def rule(key: str, value: Any) -> None:
        import string

        text()(key, value)
        try:
            used = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
        except ValueError as err:
            raise ConfigError(
                f"{key} is not a valid template ({err}); write literal braces as {{{{ and }}}}"
            ) from None
        unknown = sorted(used - set(placeholders))
        if unknown:
            raise ConfigError(
                f"{key} uses {{{unknown[0]}}}, which this task does not provide; it can use: "
                f"{', '.join('{' + p + '}' for p in placeholders)}"
            )

    return rule


def class_names(key: str, value: Any) -> None:
    """At least two distinct class names, in the order of the model's outputs."""
    names = list(value) if isinstance(value, ListConfig | list | tuple) else None
    if names is None or len(names) < 2 or len(set(map(str, names))) != len(names):
        raise ConfigError(f"{key} must list at least two distinct class names, e.g. {key}=[cat,dog], got {value!r}")


def run_name(key: str, value: Any) -> None:
    if not isinstance(value, str) or not _NAME.match(value) or ".." in value.split("/"):
        raise ConfigError(
            f"{key} must be a folder name under paths.runs (letters, digits, '.', '_', '-', nested with '/'), "
            f"got {value!r}"
        )


def quantize_option(key: str, value: Any) -> None:
    """`model.quantize`: null, a format name, or a mapping of `quantize.QuantizeConfig`'s fields."""
    from lorafactory.quantize import QuantizeConfig

    QuantizeConfig.parse(OmegaConf.to_container(value) if OmegaConf.is_config(value) else value)


RULES: dict[str, Callable[[str, Any], None]] = {
    "name": run_name,
    "seed": integer(0),
    "save_adapter": boolean,
    "threads": integer(1, optional=True),
    "model.quantize": quantize_option,
    "task.lr": number(0, above=True),
    "task.epochs": integer(1),
    "task.max_steps": integer(0, optional=True),  # 0: evaluate the starting point (icm_lora's generated adapter)
    "task.batch_size": integer(1),
    "task.eval_batch_size": integer(1),
    "task.max_length": integer(8),
    "task.max_train_samples": integer(1, optional=True),
    "task.max_eval_samples": integer(1, optional=True),
    "task.selection_samples": integer(0, optional=True),
    "task.dataset": text(),
    "task.image_column": text(),
    "task.label_column": text(),
    "task.labels": class_names,
    "task.train_split": text(optional=True),
    "task.eval_split": text(),
    "task.augment": boolean,
    "model.modality": one_of("text", "vision"),
    "model.image_size": integer(8),
    "model.dropout": number(0, 1),
    "model.drop_connect_rate": number(0, 1),
    "model.channels_last": boolean,
    # Generation tasks (tasks/causal.py): templates and evaluation settings.
    "task.response": template("target"),
    "task.mask_prompt": boolean,
    "task.max_new_tokens": integer(1),
    "task.stop": strings,
    "task.val_samples": integer(0),
    "task.eval_untuned": boolean,
    "task.forgetting_samples": integer(0),
    "task.length_buckets": integer(1, optional=True),
    "task.answers": one_of("label", "text"),
    "task.option_norm": one_of("none", "chars"),
    "task.eval_every_n_steps": integer(1, optional=True),
    "optim.lr": number(0, above=True),
    "optim.lr_scale": number(0, above=True),
    "optim.weight_decay": number(0),
    "scheduler.kind": one_of("linear", "cosine", "constant"),
    "scheduler.warmup_ratio": number(0, 1),
    "trainer.devices": integer(1),
    "trainer.device_slots": integer(1, optional=True),
    "trainer.evals_per_epoch": integer(1),
    "trainer.gradient_clip_val": number(0, optional=True),
    "trainer.log_every_n_steps": integer(1),
    "trainer.ckpt_every_n_steps": integer(1),
    "trainer.progress_bar": boolean,
    "trainer.divergence.factor": number(1, above=True),
    "trainer.divergence.window": integer(1),
    "trainer.divergence.reference_steps": integer(1),
    "trainer.divergence.eval_factor": number(1, above=True),
}


def validate(cfg: DictConfig) -> None:
    """Raise a ConfigError naming the first impossible value in the composed config (variant fields included)."""
    from lorafactory.models import MODELS, check_head_kind, model_modality
    from lorafactory.tasks import get_task
    from lorafactory.variants.base import build_variant

    for key, rule in RULES.items():
        if OmegaConf.select(cfg, key, default="__absent__") == "__absent__":
            continue  # a config without the key (tests compose partial configs); the consumer decides
        rule(key, _get(cfg, key))
    # model=hub names itself after its id: without one, nothing below can name the model.
    if _get(cfg, "model.builder") == "hub" and (OmegaConf.is_missing(cfg.model, "id") or not cfg.model.get("id")):
        raise ConfigError("model=hub needs a Hub id: add model.id=<id>, e.g. model.id=FacebookAI/roberta-base")
    _get(cfg, "task.name")
    task = get_task(cfg.task)
    model = MODELS.get(_get(cfg, "model.builder"))
    modality = model_modality(cfg.model)
    if modality != task.modality:
        raise ConfigError(
            f"model {_get(cfg, 'model.name')} takes {modality} input; task {task.name} is a {task.modality} task"
        )
    check_head_kind(_get(cfg, "model.name"), model, task.head, task.name)
    fields = getattr(task, "prompt_fields", None)
    for key in ("task.prompt", "task.prompt_no_input"):
        if fields is not None and OmegaConf.select(cfg, key, default=None) is not None:
            template(*fields)(key, _get(cfg, key))
    variant = build_variant(cfg.variant)
    if variant.quantized_base and OmegaConf.select(cfg, "model.quantize", default=None):
        from lorafactory.quantize import refusal

        raise refusal(variant.name, variant.quantized_base)
    _check_accelerator(str(_get(cfg, "trainer.accelerator")))


def _check_accelerator(accelerator: str) -> None:
    import torch

    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={accelerator} (trainer=gpu) needs a CUDA GPU and this machine has none "
            "(torch.cuda.is_available() is False): use trainer=cpu"
        )
