"""Quantized storage for frozen base weights: `model.quantize` and the quantization-aware variants (QLoRA, LoftQ,
LQ-LoRA, QWHA).

A quantized layer keeps its module (`nn.Linear`, or a 1×1 `nn.Conv2d`, a linear map over channels); its `weight`
becomes a `torch.nn.utils.parametrize` parametrization whose stored tensor is the packed 4-bit codes and whose module
(`NF4Weight`) holds the block scales, so reading `module.weight` gives the dequantized weight and the module's own
forward keeps working. Quantization and dequantization are bitsandbytes' (`quantize_4bit` / `dequantize_4bit`, with
native CPU kernels): NF4 with its standard 16-value codebook, blocks of 64 values, and double quantization of the
block scales (8-bit, blocks of 256, offset by their mean), as QLoRA (Dettmers et al., 2023) defines them. The chosen
library, and the measurements behind the choice, are in docs/decisions.md.

The float32 scales are stored as int32 bit patterns, so casting the model (`.double()`, `.to(torch.bfloat16)`) never
rounds them; a zero-size buffer follows the model's dtype and gives the dtype the weight dequantizes to.

`k×k` convolutions are not quantized: their adapters run the convolution with `W0 + ΔW` (`AdapterLayer.forward`), a
dense weight anyway. Only the format `nf4` exists; another (`int8`) is a codec module like `NF4Weight` (quantize, and
dequantize as a parametrization) plus its name in `FORMATS`.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lorafactory.errors import ConfigError, check
from lorafactory.targets import TARGET_PRESETS, find_targets, module_kind

log = logging.getLogger("lorafactory")

FORMATS = ("nf4",)
"""Storage formats `model.quantize` accepts."""
NESTED_BLOCK = 256  # double quantization: one 8-bit code per block scale, one float scale per 256 of them (QLoRA)


@dataclass(frozen=True)
class QuantizeConfig:
    """What `model.quantize` asks for: `nf4`, or a mapping with these keys."""

    format: str = "nf4"
    """Storage format of the frozen weights (one of FORMATS)."""
    layers: Any = "targets"
    """`targets`: the layers the variant adapts (`variant.targets`); `all-linear`: every nn.Linear outside the head
    (QLoRA's setting); or any other value `variant.targets` takes (a preset, or module names)."""
    block_size: int = 64
    """Values per absmax block."""
    double_quant: bool = True
    """Quantize the block scales too (8-bit, blocks of 256): 0.127 instead of 0.5 bits per weight for scales."""

    def __post_init__(self) -> None:
        check(
            self.format in FORMATS, f"model.quantize.format must be one of {', '.join(FORMATS)}, got {self.format!r}"
        )
        if isinstance(self.layers, str):
            check(
                self.layers in ("targets", *TARGET_PRESETS),
                f"model.quantize.layers must be targets, one of {', '.join(sorted(TARGET_PRESETS))} or a list of "
                f"module names, got {self.layers!r}",
            )
        else:
            check(
                isinstance(self.layers, tuple) and len(self.layers) > 0,
                f"model.quantize.layers must be targets, a preset or a non-empty list of module names, "
                f"got {self.layers!r}",
            )
        check(
            self.block_size in (32, 64, 128, 256, 512, 1024, 2048, 4096),
            f"model.quantize.block_size must be a power of two in [32, 4096], got {self.block_size}",
        )
        check(
            isinstance(self.double_quant, bool),
            f"model.quantize.double_quant must be true or false, got {self.double_quant!r}",
        )

    @classmethod
    def parse(cls, option: Any) -> QuantizeConfig | None:
        """`model.quantize` as written in a config: null, a format name, or a mapping of this class's fields."""
        if option is None or option is False:
            return None
        if isinstance(option, str):
            return cls(format=option)
        try:
            values = dict(option)
        except (TypeError, ValueError):
            raise ConfigError(
                f"model.quantize must be null, a format ({', '.join(FORMATS)}) or a mapping, got {option!r}"
            ) from None
        extra = sorted(set(values) - set(cls.__dataclass_fields__))
        check(
            not extra,
            f"model.quantize has no option {', '.join(extra)}; it takes format, layers, block_size, double_quant",
        )
        layers = values.get("layers", "targets")
        if isinstance(layers, Sequence) and not isinstance(layers, str):
            values["layers"] = tuple(str(v) for v in layers)
        return cls(**values)


@functools.cache
def _nested_code() -> Tensor:
    import bitsandbytes.functional as bnbf

    return bnbf.create_dynamic_map()  # the signed 8-bit dynamic code bitsandbytes quantizes block scales with


@functools.cache
def _nf4_code() -> Tensor:
    import bitsandbytes.functional as bnbf

    return bnbf.get_4bit_type("nf4", device="cpu").float()  # the 16 NF4 values, as bitsandbytes quantizes to them


def _bits(t: Tensor) -> Tensor:
    return t.float().contiguous().view(torch.int32)


class NF4Weight(nn.Module):
    """The parametrization of a quantized `weight`: packed NF4 codes in, the dequantized weight out.

    Buffers: `absmax` (the block scales: 8-bit codes with double quantization, else float32 bits), `nested_absmax` and
    `nested_offset` (double quantization only, float32 bits), `dtype_ref` (not saved; follows the model's dtype)."""

    def __init__(self, shape: Sequence[int], block_size: int, double_quant: bool, dtype: torch.dtype):
        super().__init__()
        self.shape = tuple(shape)
        self.block_size = block_size
        self.double_quant = double_quant
        self.register_buffer("dtype_ref", torch.empty(0, dtype=dtype), persistent=False)

    @classmethod
    @torch.no_grad()
    def quantize(cls, weight: Tensor, block_size: int = 64, double_quant: bool = True) -> tuple[Tensor, NF4Weight]:
        """Packed codes and their parametrization for `weight` (any shape; quantized as its flattened matrix)."""
        import bitsandbytes.functional as bnbf

        matrix = weight.detach().reshape(weight.shape[0], -1).float().contiguous()
        packed, state = bnbf.quantize_4bit(
            matrix, blocksize=block_size, compress_statistics=double_quant, quant_type="nf4"
        )
        module = cls(weight.shape, block_size, double_quant, weight.dtype)
        if double_quant:
            module.register_buffer("absmax", state.absmax)
            module.register_buffer("nested_absmax", _bits(state.state2.absmax))
            module.register_buffer("nested_offset", _bits(state.offset.reshape(1)))
        else:
            module.register_buffer("absmax", _bits(state.absmax))
        return packed, module

    def state(self) -> Any:
        """bitsandbytes' `QuantState` for the stored codes."""
        from bitsandbytes.functional import QuantState

        matrix_shape = torch.Size((self.shape[0], int(torch.Size(self.shape[1:]).numel())))
        if not self.double_quant:
            absmax = self.absmax.view(torch.float32)
            return QuantState(absmax, matrix_shape, None, self.block_size, "nf4", torch.float32)
        nested = QuantState(
            self.nested_absmax.view(torch.float32), code=_nested_code(), blocksize=NESTED_BLOCK, dtype=torch.float32
        )
        offset = self.nested_offset.view(torch.float32)[0]
        return QuantState(
            self.absmax, matrix_shape, None, self.block_size, "nf4", torch.float32, offset=offset, state2=nested
        )

    def forward(self, packed: Tensor) -> Tensor:
        import bitsandbytes.functional as bnbf

        columns = int(torch.Size(self.shape[1:]).numel())
        if packed.device.type == "cpu" and columns % self.block_size:
            # bitsandbytes 0.50's CPU kernel misplaces block scales when rows are not whole blocks on some CPUs
            # (AVX512-BF16): dequantize these by the codebook lookup its own quantization defines.
            return self._lookup(packed).view(self.shape).to(self.dtype_ref.dtype)
        # Always ask for float32: bitsandbytes' CPU kernel leaves other dtypes (float64) unwritten.
        return bnbf.dequantize_4bit(packed, self.state()).view(self.shape).to(self.dtype_ref.dtype)

    def _lookup(self, packed: Tensor) -> Tensor:
        """code[nibble] × its block's scale, two nibbles per byte, high first (bitsandbytes' layout), in float32."""
        n = int(torch.Size(self.shape).numel())
        flat = packed.reshape(-1)
        nibbles = torch.stack((flat >> 4, flat & 0xF), dim=1).reshape(-1)[:n].long()
        code = _nf4_code().to(packed.device)
        if self.double_quant:
            nested = self.nested_absmax.view(torch.float32).repeat_interleave(NESTED_BLOCK)[: self.absmax.numel()]
            scales = _nested_code().to(packed.device)[self.absmax.long()] * nested
            scales = scales + self.nested_offset.view(torch.float32)[0]
        else:
            scales = self.absmax.view(torch.float32)
        return code[nibbles] * scales.repeat_interleave(self.block_size)[:n]

    def extra_repr(self) -> str:
        return f"nf4, shape={self.shape}, block_size={self.block_size}, double_quant={self.double_quant}"


@dataclass
class QuantizedMatrix:
    """A quantized weight outside any module (what LoftQ and LQ-LoRA iterate on): install it with `install_`."""

    packed: Tensor
    codec: NF4Weight

    def dequantize(self) -> Tensor:
        return self.codec(self.packed)


def quantize_matrix(weight: Tensor, block_size: int = 64, double_quant: bool = True) -> QuantizedMatrix:
    """NF4 codes of `weight` (dequantize them with `.dequantize()`, in `weight`'s dtype)."""
    return QuantizedMatrix(*NF4Weight.quantize(weight, block_size, double_quant))


def refusal(variant: str, reason: str) -> ConfigError:
    """The one-line error of a variant that cannot run on a quantized base (`Variant.quantized_base` gives why)."""
    return ConfigError(
        f"variant={variant} cannot run on a base stored quantized (model.quantize): {reason}; drop model.quantize"
    )


def quantizable(module: nn.Module) -> bool:
    return module_kind(module) in ("linear", "pointwise")


def is_quantized(module: nn.Module) -> bool:
    return parametrize.is_parametrized(module, "weight") and isinstance(module.parametrizations.weight[0], NF4Weight)


def codec(module: nn.Module) -> NF4Weight:
    return module.parametrizations.weight[0]


def install_(module: nn.Module, quantized: QuantizedMatrix) -> None:
    """Store `quantized` as `module.weight` (frozen), replacing whatever it held."""
    check(quantizable(module), f"only nn.Linear and 1×1 convolutions are stored quantized, not {module}")
    shape = tuple(module.weight.shape)
    check(
        math.prod(shape) == math.prod(quantized.codec.shape), f"{module} cannot hold a {quantized.codec.shape} matrix"
    )
    quantized.codec.shape = shape  # a matrix computed for a 1×1 convolution dequantizes in the convolution's shape
    if parametrize.is_parametrized(module, "weight"):
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
    # The codes become the parametrization's stored tensor ("original"); `unsafe` because they are packed uint8 of
    # another shape than the weight they stand for.
    del module.weight
    module.weight = nn.Parameter(quantized.packed, requires_grad=False)
    parametrize.register_parametrization(module, "weight", quantized.codec, unsafe=True)


def quantize_(module: nn.Module, config: QuantizeConfig | None = None) -> None:
    """Store `module`'s weight quantized (in place); a module already quantized is left as it is."""
    if is_quantized(module):
        return
    config = config or QuantizeConfig()
    install_(module, quantize_matrix(module.weight, config.block_size, config.double_quant))


def dequantize_(module: nn.Module, why: str | None = None) -> None:
    """Put a full-precision weight (the dequantized one) back in place of the quantized storage; `why` is logged
    (once per reason)."""
    if not is_quantized(module):
        return
    if why is not None and why not in _logged:
        _logged.add(why)
        log.info("%s: a quantized base weight is dequantized and kept in full precision from now on", why)
    value = module.weight.detach()
    parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
    module.weight = nn.Parameter(value, requires_grad=False)


_logged: set[str] = set()


def storage_bytes(module: nn.Module) -> int:
    """Bytes the frozen weight takes: codes and saved scales when quantized, else the dense weight."""
    if not is_quantized(module):
        return module.weight.numel() * module.weight.element_size()
    packed = module.parametrizations.weight.original
    state = codec(module).state_dict()
    return packed.numel() * packed.element_size() + sum(t.numel() * t.element_size() for t in state.values())


def parameter_count(model: nn.Module) -> int:
    """Parameters of `model`, a quantized weight counted as the values it stands for, not its packed codes."""
    total = sum(p.numel() for p in model.parameters())
    for module in model.modules():
        if is_quantized(module):
            total += math.prod(codec(module).shape) - module.parametrizations.weight.original.numel()
    return total


class _QuantizedLinear(torch.autograd.Function):
    """`x Wᵀ + b` with W dequantized in the forward and again in the backward, so no dequantized weight stays alive
    between the two (QLoRA's memory saving). W is frozen; x and b get their gradients."""

    @staticmethod
    def forward(ctx, x: Tensor, packed: Tensor, bias: Tensor | None, weight_codec: NF4Weight) -> Tensor:
        ctx.codec = weight_codec
        ctx.save_for_backward(packed)
        weight = weight_codec(packed)
        return F.linear(x, weight.reshape(weight.shape[0], -1).to(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        (packed,) = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            weight = ctx.codec(packed)
            grad_x = grad @ weight.reshape(weight.shape[0], -1).to(grad.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(dim=0)
        return grad_x, None, grad_bias, None


def quantized_linear(x: Tensor, module: nn.Module) -> Tensor:
    """The frozen quantized layer on linear-form input (..., d_in)."""
    return _QuantizedLinear.apply(x, module.parametrizations.weight.original, module.bias, codec(module))


def quantize_model_(
    model: nn.Module, option: Any, head: Sequence[str], variant_targets: Any | None = None
) -> list[str]:
    """Apply `model.quantize` to a built model; the names of the layers now stored quantized."""
    config = QuantizeConfig.parse(option)
    if config is None:
        return []
    layers = config.layers
    if layers == "targets":
        check(
            variant_targets is not None,
            "model.quantize.layers=targets quantizes the layers the variant adapts, but no variant.targets is "
            "known here; give layers: all-linear or a list of module names",
        )
        layers = variant_targets
    try:
        names = find_targets(model, list(layers) if isinstance(layers, tuple) else layers, head)
    except ConfigError as err:  # find_targets speaks of variant.targets; here they came from model.quantize.layers
        if config.layers == "targets":
            raise
        raise ConfigError(str(err).replace("variant.targets", "model.quantize.layers", 1)) from None
    skipped = [n for n in names if not quantizable(model.get_submodule(n))]
    if skipped:
        log.warning(
            "model.quantize: %d k×k convolution(s) stay in full precision (%s...): their adapters run the "
            "convolution with W0 + ΔW",
            len(skipped),
            skipped[0],
        )
    done = [n for n in names if quantizable(model.get_submodule(n))]
    for name in done:
        quantize_(model.get_submodule(name), config)
    return done
