"""The variant protocol and the layer helpers every variant shares.

A variant is a `Variant` subclass in its own file, registered with `@VARIANTS.register(name, config=...)`. It turns
target `nn.Linear` and `nn.Conv2d` modules into `AdapterLayer`s (`adapt`) and may take part in training through the
hooks below; the training loop calls every hook on every variant and never asks which variant it has.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lorafactory import quantize
from lorafactory.errors import ConfigError, check
from lorafactory.registry import Registry
from lorafactory.targets import HEAD_NAMES, TARGET_PRESETS, find_targets, in_head, matches, module_kind

__all__ = ["HEAD_NAMES", "TARGET_PRESETS", "find_targets", "in_head", "matches", "module_kind"]  # re-exported

TAXONOMY = ("baseline", "rank", "optimization", "initialization", "moe")
"""The LoRAFactory study's four axes, plus `baseline` for the reference rows (full fine-tuning, head only)."""


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
    """A preset (`attn`, `all-linear`; for conv nets `pointwise`, `all-conv`) or a list of module-name patterns
    (suffixes like `query` or regexes; every pattern must match). On the command line it defaults to the model's
    `model.targets`."""
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


class AutocastFunction(torch.autograd.Function):
    """A custom autograd function whose backward runs under the autocast state its forward ran under, on whatever
    device its inputs are on (`torch.amp.custom_bwd` does this for one device type named in advance). Under
    `trainer.precision=bf16-mixed` the forward's products come out in bf16 and the backward gets bf16 gradients, while
    the frozen weights and the adapter's parameters stay fp32: without autocast the backward's products would mix the
    two and fail. The gradients returned are cast to each input's dtype by autograd."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        forward, backward = cls.forward, cls.backward

        @functools.wraps(forward)
        def recording_forward(ctx: Any, *args: Any) -> Any:
            device = next((a.device.type for a in args if isinstance(a, Tensor)), "cpu")
            ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
            return forward(ctx, *args)

        @functools.wraps(backward)
        def autocast_backward(ctx: Any, *grads: Any) -> Any:
            device, enabled, dtype = ctx.autocast
            with torch.autocast(device, dtype=dtype, enabled=enabled):
                return backward(ctx, *grads)

        cls.forward, cls.backward = staticmethod(recording_forward), staticmethod(autocast_backward)


class AdapterLayer(nn.Module):
    """A frozen linear or convolution (`self.base`) plus a variant's trainable update, seen as a matrix.

    Variants are written once, for a d_out × d_in weight: `self.weight` is the base weight as that matrix (a view of
    its storage), `self.bias` its bias, `self.base_forward(x)` the frozen layer applied to `x` in linear form
    (`x` of shape (..., d_in)). Subclasses implement `adapter_forward(x)` (linear form) and `delta_weight()`.
    How the layer runs depends on the base module's kind (`lorafactory.targets.module_kind`):

    - `linear`: `adapter_forward(x)` as is.
    - `pointwise` (1×1 convolution): a linear map over channels, so `adapter_forward` runs on the channels-last view
      of the input (N, H, W, C): no copy when the model is in `torch.channels_last` memory format.
    - `conv` (k×k, grouped or depthwise): the weight is viewed as (out, in/groups·k·k) and the layer runs the base
      module's own forward with `W0 + ΔW` (so subclasses with their own padding keep it): only variants whose update
      is a weight (`Variant.mergeable`) can adapt these.

    Merging folds the update into the base weight so the layer computes `base(x)` alone; `merge_and_unload` goes
    further and puts the plain module back in the model.
    """

    saves_base: ClassVar[bool] = False
    """True when the variant rewrites the base weight (PiSSA residualization): it is then part of the adapter state."""

    def __init__(self, base: nn.Module):
        super().__init__()
        kind = module_kind(base)
        if kind is None:
            raise TypeError(f"{type(self).__name__} adapts nn.Linear and nn.Conv2d, got {type(base).__name__}")
        self.base = base
        self.kind = "conv" if kind == "depthwise" else kind
        self.out_features = base.weight.shape[0]
        self.in_features = base.weight[0].numel()
        self.merged = False
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)

    @property
    def weight(self) -> Tensor:
        """The frozen base weight W0 as a d_out × d_in matrix, sharing its storage (merged: W0 + ΔW). On a quantized
        base (`lorafactory.quantize`) it is the dequantized matrix, computed on each access: change it with
        `write_weight`, never in place."""
        weight = self.base.weight
        return weight if weight.dim() == 2 else weight.reshape(weight.shape[0], -1)

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    def base_forward(self, x: Tensor) -> Tensor:
        """The frozen layer on linear-form input (..., d_in); a quantized base dequantizes in the forward and again in
        the backward rather than keep its full-precision weight alive in between."""
        if quantize.is_quantized(self.base):
            return quantize.quantized_linear(x, self.base)
        return nn.functional.linear(x, self.weight, self.bias)

    @torch.no_grad()
    def write_weight(self, matrix: Tensor) -> None:
        """Overwrite the base weight with a d_out × d_in matrix (in the weight's own shape and dtype). A quantized base
        is dequantized first and stays in full precision (logged): what is written is kept exactly, so a merge into
        it is exact. Variants that keep a quantized base use `lorafactory.quantize.install_`."""
        quantize.dequantize_(self.base, why=f"{type(self).__name__} wrote its base weight (merge or init)")
        weight = self.base.weight
        weight.copy_(matrix.reshape(weight.shape).to(weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base(x)
        if self.kind == "linear":
            return self.adapter_forward(x)
        if self.kind == "pointwise":
            return self.adapter_forward(x.movedim(1, -1)).movedim(-1, 1)
        weight = (self.weight + self.delta_weight().to(self.weight.dtype)).view(self.base.weight.shape)
        return torch.func.functional_call(self.base, {"weight": weight}, (x,))

    def adapter_forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def delta_weight(self) -> Tensor:
        """The dense update ΔW (d_out × d_in) such that the adapted layer computes `(W0 + ΔW) x + b`."""
        raise NotImplementedError

    def original_weight(self) -> Tensor:
        """W0 as a d_out × d_in matrix, whether or not the update is merged (what a saved adapter state must hold
        when the variant rewrote the base). Layers whose merge is not additive override it."""
        if not self.merged:
            return self.weight
        return self.weight - self.delta_weight().to(self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ΔW into the base weight. A quantized base becomes full precision (see `write_weight`)."""
        if self.merged:
            return
        weight = self.weight
        dtype = torch.promote_types(weight.dtype, torch.float32)  # fp32 at least; a float64 model stays exact
        self.write_weight(weight.to(dtype) + self.delta_weight().to(dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        weight = self.weight
        dtype = torch.promote_types(weight.dtype, torch.float32)
        self.write_weight(weight.to(dtype) - self.delta_weight().to(dtype))
        self.merged = False

    def adapter_parameters(self) -> Iterator[nn.Parameter]:
        """The layer's own parameters (trainable or not), never the base layer's."""
        for name, param in self.named_parameters():
            if not name.startswith("base."):
                yield param

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind}, in_features={self.in_features}, out_features={self.out_features}, merged={self.merged}"
        )


def kaiming_(weight: Tensor) -> Tensor:
    """nn.Linear's default init (uniform, bound 1/sqrt(fan_in)), as LoRA uses for A."""
    return nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


def shared_state(model: nn.Module) -> nn.Module:
    """The model-level module `model.lf_shared` for state that exists once per model, not per layer (VeRA's random
    bases, VB-LoRA's bank, Uni-LoRA's vector): created on first use. Its parameters are counted and trained once, its
    state is saved with the adapter, and `merge_and_unload` removes it. Layers keep a reference to what they need
    without registering it as their own (see `SharedRef`)."""
    if not isinstance(getattr(model, "lf_shared", None), nn.Module):
        model.lf_shared = nn.Module()
    return model.lf_shared


class SharedRef:
    """A reference from a layer to a module it must not own (the model's `lf_shared`): not a submodule, so the
    shared state is neither registered, counted nor saved per layer; `copy.deepcopy` of the whole model keeps the
    layers pointing at the copy's shared module."""

    def __init__(self, module: nn.Module):
        self._module = [module]

    def __call__(self) -> nn.Module:
        return self._module[0]


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
    """For rank methods the study's kind (`expansion`, `sharing`, `budgeting`), plus `frequency`, `sparsity`,
    `quantization`, `multiplicative`, ..."""
    mergeable: ClassVar[bool] = True
    """The update is a weight (ΔW): it merges into the base for zero-cost inference, and can adapt k×k convolutions."""
    zero_init: ClassVar[bool] = True
    """The adapted model computes exactly what the base model computes before the first step."""
    params_formula: ClassVar[str]
    """Trainable parameters of one adapted d_out × d_in linear, as shown by `python -m lorafactory.variants`."""
    peft: ClassVar[str | None] = None
    """How Hugging Face PEFT spells the same method, when it has it (a parity test then compares the two)."""
    noisy_training: ClassVar[bool] = False
    """The training forward is stochastic by design (weight perturbation): train and eval compute the same function
    only with the noise off. The contract tests then check eval alone is deterministic."""
    memory_note: ClassVar[str | None] = None
    """Training memory beyond the trainable parameters and their Adam moments, when it matters (LoRA-Pro's full-size
    moments), shown in the zoo listing."""
    quantized_base: ClassVar[str | None] = None
    """Why the variant cannot run on a base already stored quantized (`model.quantize`), or None when it can: config
    validation and `adapt` then refuse in one line (`quantize.refusal`)."""

    def __init__(self, cfg: VariantConfig):
        self.cfg = cfg

    # --- structure -----------------------------------------------------------------------------------------------
    def make_layer(self, base: nn.Module) -> AdapterLayer:
        """The adapter layer that replaces one target module."""
        raise NotImplementedError

    def layer_params(self, d_in: int, d_out: int) -> int:
        """Trainable parameters of one adapted d_out × d_in layer (the formula of `params_formula`)."""
        raise NotImplementedError

    def trained_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """What the method trains, the task head aside: the adapter's parameters (model-level shared ones once) for
        adapters; every pretrained weight for full fine-tuning. Counted as `adapter_params` in records."""
        return adapter_parameters(model)

    def expected_params(self, model: nn.Module) -> int:
        """Trainable adapter parameters of an adapted model according to the variant's formula."""
        return sum(self.layer_params(layer.in_features, layer.out_features) for layer in adapter_layers(model))

    def adapt(self, model: nn.Module, head: Sequence[str] = HEAD_NAMES) -> nn.Module:
        """Freeze `model` and replace each target module with this variant's adapter layer, in place."""
        self.check_base(model)
        names = find_targets(model, self.cfg.targets, head)
        if not self.mergeable:
            convs = [n for n in names if module_kind(model.get_submodule(n)) in ("conv", "depthwise")]
            if convs:
                raise ConfigError(
                    f"variant={self.name} cannot adapt the k×k convolution '{convs[0]}': its update depends on the "
                    "input, so there is no weight to run through the convolution; target linear or 1×1 layers "
                    "(variant.targets=pointwise)"
                )
        freeze(model)
        for name in names:
            replace_module(model, name, self.make_layer(model.get_submodule(name)))
        return model

    def check_base(self, model: nn.Module) -> None:
        """Refuse, in one line, a model stored quantized when the variant cannot run on one (`quantized_base`)."""
        if self.quantized_base and any(quantize.is_quantized(m) for m in model.modules()):
            raise quantize.refusal(self.name, self.quantized_base)

    def peft_config(self, targets: list[str], head: list[str]) -> Any | None:
        """PEFT's config for the same method and settings (a `peft.PeftConfig`), or None when PEFT lacks the method.
        Used by the benchmark to time PEFT's twin; `targets` are module names, `head` the modules trained in full."""
        return None

    def peft_export(
        self, model: nn.Module, base: nn.Module, targets: list[str], head: list[str]
    ) -> tuple[Any, dict[str, Tensor]] | None:
        """The trained adapter of `model` as PEFT's: (config, adapter state) such that PEFT's model built with that
        config on `base` (the model as built before `adapt`: what a PEFT adapter is loaded on) and given that state
        computes what `model` computes. State keys are those of PEFT's saved `adapter_model.safetensors`
        (`base_model.model.<module>.<tensor>`, no adapter name; PEFT's model-level tensors as PEFT names them); the
        task head is the caller's. None when PEFT lacks the method (`python -m lorafactory.export --peft` uses it and
        checks the result against `model`); raises a one-line UserError when this run's adapter has no exact PEFT
        form."""
        return None

    def summary(self, model: nn.Module) -> dict[str, Any]:
        """What the run record should say about this variant's own state at the end of training (final ranks per
        layer, trainable parameters at start and end, phase lengths ...); JSON-serialisable."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """The variant's own training progress (phase, counters), saved in checkpoints; parameters and buffers of the
        model are saved with the model, not here."""
        return {}

    def load_state_dict(self, state: dict[str, Any], model: nn.Module) -> None:
        """Restore what `state_dict` returned when a run resumes from a checkpoint, after the model's state is loaded
        and before the optimizer is built: re-apply to `model` what depends on the progress (which parameters train
        in the current phase)."""

    # --- training hooks: the training loop calls all of them, for every variant --------------------------------------
    def init_from_data(self, model: nn.Module, batches: Iterable[dict[str, Tensor]], loss_fn: Any) -> None:
        """Data-dependent initialisation, before the optimizer exists (LoRA-GA, LoRA-SB, ...). `batches` is an endless
        stream of training batches in an order independent of training's: take as many as the method needs;
        `loss_fn(model, batch)` is the task loss. Not called when a run resumes (the state is in the checkpoint)."""

    def on_train_start(self, model: nn.Module, total_steps: int) -> None:
        """Training is about to start and will take `total_steps` optimizer steps (what the learning-rate schedule
        is built for): methods whose schedules are fractions of the run (AdaLoRA's budget) read it here."""

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]] | None:
        """Optimizer parameter groups with their own learning rates, or None for one group of all trainables."""
        return None

    def build_optimizer(self, param_groups: list[dict[str, Any]], cfg: Any) -> torch.optim.Optimizer | None:
        """A variant-specific optimizer over `param_groups`, or None to use the configured one. `cfg` is the `optim`
        config (`lr`, `weight_decay`, `optimizer.betas`, `optimizer.eps`)."""
        return None

    def aux_loss(self, model: nn.Module) -> Tensor | None:
        """A regulariser added to the task loss, or None."""
        return None

    def on_after_backward(self, model: nn.Module) -> None:
        """Gradients exist; edit them here."""

    def on_before_optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Right before `optimizer.step()`; Lightning calls it before clipping the gradients."""

    def on_train_batch_end(self, model: nn.Module, step: int) -> bool | None:
        """After the optimizer step; `step` counts optimizer steps taken so far. Return True when the set of trainable
        parameters changed (parameters added, replaced, frozen or unfrozen: rank growth, a phase switch): the loop then
        builds the optimizer again (`param_groups` included), carrying over the state of every parameter that is still
        there, and keeps the learning-rate schedule where it was."""
        return None

    def on_train_end(self, model: nn.Module) -> None:
        """After the last step: pruning, compression."""


# On the command line a variant's targets default to the model's (`model.targets`: `attn` for transformers, `pointwise`
# for conv nets), so every variant applies to every model without an override; `variant.targets=...` still wins.
VARIANTS: Registry[type[Variant]] = Registry(
    "variant", group="variant", node_values={"targets": "${oc.select:model.targets,attn}"}
)


# --- model-level helpers -------------------------------------------------------------------------------------------


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


def peft_layer_state(model: nn.Module, tensors: Callable[[AdapterLayer], Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Per-layer tensors under PEFT's saved keys (`Variant.peft_export`): `tensors(layer)` maps PEFT's names of one
    adapter layer's tensors (`lora_A.weight`, `hira_A`, ...) to their values."""
    return {
        f"base_model.model.{name}.{key}": value.detach()
        for name, layer in named_adapter_layers(model)
        for key, value in tensors(layer).items()
    }


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


@contextmanager
def merged(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """The model with every adapter merged into its base weight (so it computes at the base model's cost), unmerged
    again on exit; a no-op when not `enabled` (variants whose update is not a weight run unmerged)."""
    if not enabled:
        yield model
        return
    merge_adapters(model)
    try:
        yield model
    finally:
        unmerge_adapters(model)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every update into its base weight and put the plain module back: zero cost at inference."""
    for name, layer in named_adapter_layers(model):
        layer.merge()
        replace_module(model, name, layer.base)
    if hasattr(model, "lf_shared"):
        del model.lf_shared
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """What a fresh `adapt`-ed copy of the base model needs to compute what `model` computes: the adapter layers'
    state (base weights only where the variant rewrote them, always unmerged), model-level shared state, and every
    other trainable parameter (the task head). The same whether or not the adapters are merged."""
    keep: set[str] = set()
    unmerged: dict[str, Tensor] = {}
    for name, layer in named_adapter_layers(model):
        for key in layer.state_dict():
            if layer.saves_base or not key.startswith("base."):
                keep.add(f"{name}.{key}")
        if layer.saves_base and layer.merged:  # save W_res, not W_res + ΔW (a fresh model adds ΔW itself)
            with torch.no_grad():
                unmerged[f"{name}.base.weight"] = layer.original_weight().reshape(layer.base.weight.shape)
    keep |= {n for n, p in model.named_parameters() if p.requires_grad}
    state = model.state_dict()
    return {
        k: unmerged.get(k, v).detach().clone() for k, v in state.items() if k in keep or k.startswith("lf_shared.")
    }


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
