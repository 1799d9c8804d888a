"""The variant protocol and the layer helpers every variant shares.

A variant is a `Variant` subclass in its own file, registered with `@VARIANTS.register(name, config=...)`. It turns
target `nn.Linear` modules into `AdapterLayer`s (`adapt`) and may take part in training through the hooks below; the
training loop calls every hook on every variant and never asks which variant it has.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lorafactory.errors import ConfigError, check
from lorafactory.registry import Registry

TAXONOMY = ("rank", "optimization", "initialization", "moe")

# Target presets, matched as module-name suffixes (see `matches`). `all-linear` is every nn.Linear outside the head.
TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "attn": ("query", "value", "q_proj", "v_proj"),
    "all-linear": (),
}
# Task heads are trained in full (they are new), never adapted: HF names them like this for BERT, Llama and ViT.
HEAD_NAMES = ("classifier", "score", "lm_head")


@dataclass
class VariantConfig:
    """Fields every variant has. Subclasses add their own, each documented once, right under it."""

    name: str = ""
    """Registry name, filled in by the registry (`variant=<name>` selects it)."""
    r: int = 8
    """Rank of the update (or the variant's own budget knob, see its docstring)."""
    alpha: float = 16.0
    """Scale numerator: the update is multiplied by `alpha / r` unless the variant says otherwise."""
    dropout: float = 0.0
    """Dropout on the adapter's input (training only)."""
    targets: Any = "attn"
    """A preset (`attn`, `all-linear`) or a list of module-name patterns (suffixes like `query` or regexes)."""
    lr_mult: float = 1.0
    """This variant's default learning rate relative to LoRA's (the task's `lr`); `sweep=lr_grid` centres on it."""

    def __post_init__(self) -> None:
        check(self.r >= 1, f"variant.r must be >= 1, got {self.r}")
        check(self.alpha > 0, f"variant.alpha must be > 0, got {self.alpha}")
        check(0.0 <= self.dropout < 1.0, f"variant.dropout must be in [0, 1), got {self.dropout}")
        check(self.lr_mult > 0, f"variant.lr_mult must be > 0, got {self.lr_mult}")
        if isinstance(self.targets, str):
            check(
                self.targets in TARGET_PRESETS,
                f"variant.targets must be one of {sorted(TARGET_PRESETS)} or a list of module names, "
                f"got '{self.targets}'",
            )
        else:
            self.targets = [str(t) for t in self.targets]
            check(len(self.targets) > 0, "variant.targets must not be an empty list")


class AdapterLayer(nn.Module):
    """A frozen `nn.Linear` (`self.base`) plus a variant's trainable update.

    Subclasses implement `adapter_forward(x)` and `delta_weight()`. Merging folds the update into `base.weight` so the
    layer computes `base(x)` alone; `merge_and_unload` goes further and puts the plain `nn.Linear` back in the model.
    """

    saves_base: ClassVar[bool] = False
    """True when the variant rewrites the base weight (PiSSA residualization): it is then part of the adapter state."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{type(self).__name__} adapts nn.Linear, got {type(base).__name__}")
        self.base = base
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.merged = False
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base(x)
        return self.adapter_forward(x)

    def adapter_forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def delta_weight(self) -> Tensor:
        """The dense update ΔW (d_out × d_in) such that the adapted layer computes `(W0 + ΔW) x + b`."""
        raise NotImplementedError

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        weight = self.base.weight
        weight.copy_((weight.float() + self.delta_weight().float()).to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        weight = self.base.weight
        weight.copy_((weight.float() - self.delta_weight().float()).to(weight.dtype))
        self.merged = False

    def adapter_parameters(self) -> Iterator[nn.Parameter]:
        """The layer's own parameters (trainable or not), never the base layer's."""
        for name, param in self.named_parameters():
            if not name.startswith("base."):
                yield param

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, merged={self.merged}"


def kaiming_(weight: Tensor) -> Tensor:
    """nn.Linear's default init (uniform, bound 1/sqrt(fan_in)), as LoRA uses for A."""
    return nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


class Variant:
    """A LoRA variant: how to adapt a model, and how to take part in training.

    Class attributes describe the variant for the zoo listing and the leaderboards. The hooks are no-ops here; a
    variant overrides the ones its method needs.
    """

    name: ClassVar[str]
    paper: ClassVar[str]
    """Title, authors, venue and arXiv id."""
    taxonomy: ClassVar[str]
    """One of TAXONOMY: the axis of the LoRAFactory study the variant belongs to."""
    tags: ClassVar[tuple[str, ...]] = ()
    mergeable: ClassVar[bool] = True
    zero_init: ClassVar[bool] = True
    """The adapted model computes exactly what the base model computes before the first step."""
    params_formula: ClassVar[str]
    """Trainable parameters of one adapted d_out × d_in linear, as shown by `python -m lorafactory.variants`."""
    peft: ClassVar[str | None] = None
    """How Hugging Face PEFT spells the same method, when it has it (a parity test then compares the two)."""

    def __init__(self, cfg: VariantConfig):
        self.cfg = cfg

    # --- structure -----------------------------------------------------------------------------------------------
    def make_layer(self, base: nn.Linear) -> AdapterLayer:
        """The adapter layer that replaces one target linear."""
        raise NotImplementedError

    def layer_params(self, d_in: int, d_out: int) -> int:
        """Trainable parameters of one adapted d_out × d_in linear (the formula of `params_formula`)."""
        raise NotImplementedError

    def expected_params(self, model: nn.Module) -> int:
        """Trainable adapter parameters of an adapted model according to the variant's formula."""
        return sum(self.layer_params(layer.in_features, layer.out_features) for layer in adapter_layers(model))

    def adapt(self, model: nn.Module, head: Sequence[str] = HEAD_NAMES) -> nn.Module:
        """Freeze `model` and replace each target linear with this variant's adapter layer, in place."""
        names = find_targets(model, self.cfg.targets, head)
        freeze(model)
        for name in names:
            replace_module(model, name, self.make_layer(model.get_submodule(name)))
        return model

    # --- training hooks: the training loop calls all of them, for every variant --------------------------------------
    def init_from_data(self, model: nn.Module, batches: Iterable[dict[str, Tensor]], loss_fn: Any) -> None:
        """Data-dependent initialisation, before the first step (LoRA-GA, LoRA-SB, ...)."""

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]] | None:
        """Optimizer parameter groups with their own learning rates, or None for one group of all trainables."""
        return None

    def build_optimizer(self, param_groups: list[dict[str, Any]], cfg: Any) -> torch.optim.Optimizer | None:
        """A variant-specific optimizer, or None to use the configured one."""
        return None

    def aux_loss(self, model: nn.Module) -> Tensor | None:
        """A regulariser added to the task loss, or None."""
        return None

    def on_after_backward(self, model: nn.Module) -> None:
        """Gradients exist; edit them here."""

    def on_before_optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Right before `optimizer.step()` (after gradient clipping)."""

    def on_train_batch_end(self, model: nn.Module, step: int) -> None:
        """After the optimizer step; `step` counts optimizer steps taken so far."""

    def on_train_end(self, model: nn.Module) -> None:
        """After the last step: pruning, compression."""


VARIANTS: Registry[type[Variant]] = Registry("variant", group="variant")


# --- model-level helpers -------------------------------------------------------------------------------------------


def matches(name: str, pattern: str) -> bool:
    """A pattern matches a module name as a dotted suffix (`query` matches `encoder.layer.0.attention.self.query`)
    or, failing that, as a full regular expression."""
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def _in_head(name: str, head: Sequence[str]) -> bool:
    """Whether module `name` lies in the head: under one of its module paths, or under a module with a head name."""
    parts = name.split(".")
    return any(h in parts if "." not in h else name == h or name.startswith(h + ".") for h in head)


def find_targets(model: nn.Module, targets: str | Sequence[str], head: Sequence[str] = HEAD_NAMES) -> list[str]:
    """Names of the nn.Linear modules that `targets` selects; a ConfigError names the override if there are none."""
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not _in_head(n, head)]
    patterns = TARGET_PRESETS[targets] if isinstance(targets, str) else tuple(targets)
    if isinstance(targets, str) and not patterns:  # all-linear
        found = linear
    else:
        found = [n for n in linear if any(matches(n, p) for p in patterns)]
    if not found:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise ConfigError(
            f"variant.targets={targets!r} matched no nn.Linear in the model; its linear layers are named: "
            f"{', '.join(leaves)}"
        )
    return found


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def freeze(model: nn.Module) -> None:
    for param in model.parameters():
        param.requires_grad_(False)


def adapter_layers(model: nn.Module) -> list[AdapterLayer]:
    return [m for m in model.modules() if isinstance(m, AdapterLayer)]


def named_adapter_layers(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLayer)]


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter the variant added (shared model-level ones once), whether it trains or not."""
    seen: dict[int, nn.Parameter] = {}
    for layer in adapter_layers(model):
        for param in layer.adapter_parameters():
            seen.setdefault(id(param), param)
    shared = getattr(model, "lf_shared", None)
    if isinstance(shared, nn.Module):
        for param in shared.parameters():
            seen.setdefault(id(param), param)
    return list(seen.values())


def count_trainable(params: Iterable[nn.Parameter]) -> int:
    return sum(p.numel() for p in params if p.requires_grad)


def merge_adapters(model: nn.Module) -> None:
    for layer in adapter_layers(model):
        layer.merge()


def unmerge_adapters(model: nn.Module) -> None:
    for layer in adapter_layers(model):
        layer.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every update into its base weight and put the plain nn.Linear back: zero cost at inference."""
    for name, layer in named_adapter_layers(model):
        layer.merge()
        replace_module(model, name, layer.base)
    if hasattr(model, "lf_shared"):
        del model.lf_shared
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """What a fresh `adapt`-ed copy of the base model needs to compute what `model` computes: the adapter layers'
    state (base weights only where the variant rewrote them), model-level shared state, and every other trainable
    parameter (the task head)."""
    keep: set[str] = set()
    for name, layer in named_adapter_layers(model):
        for key in layer.state_dict():
            if layer.saves_base or not key.startswith("base."):
                keep.add(f"{name}.{key}")
    keep |= {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in keep or k.startswith("lf_shared.")}


def load_adapter_state_dict(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Load what `adapter_state_dict` saved into a model adapted with the same variant and targets."""
    expected = set(adapter_state_dict(model))
    unexpected = sorted(set(state) - set(model.state_dict()))
    missing = sorted(expected - set(state))
    if unexpected or missing:
        raise ConfigError(
            "adapter state does not fit this model (different variant or targets?): "
            f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        )
    model.load_state_dict(state, strict=False)


def build_variant(cfg: str | Mapping[str, Any] | VariantConfig) -> Variant:
    """The variant a config names (`{"name": "dora", "r": 16}`, a DictConfig, or just "dora"), its values
    validated; errors name the override."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, VariantConfig):
        return VARIANTS.get(cfg.name)(cfg)
    if isinstance(cfg, str):
        cfg = {"name": cfg}
    values = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    cls = VARIANTS.get(values.get("name", ""))
    config_cls = VARIANTS.config_cls(cls.name)
    extra = sorted(set(values) - set(config_cls.__dataclass_fields__))
    if extra:
        raise ConfigError(f"variant '{cls.name}' has no option {', '.join('variant.' + e for e in extra)}")
    return cls(config_cls(**values))
