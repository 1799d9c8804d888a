"""Tied-LoRA — "Tied-LoRA: Enhancing parameter efficiency of LoRA with Weight Tying" (Renduchintala, Konuk, Kuchaiev;
NAACL 2024, arXiv 2311.09578).

Update rule: one LoRA pair A ∈ R^{r×d_in}, B ∈ R^{d_out×r} tied across all layers (one pair per weight shape), and
per layer two scaling vectors, v ∈ R^{d_out} on B's output and u ∈ R^r on A's output:

    y = W0 x + b + s · Λ_v B Λ_u A x,    Λ_v = diag(v), Λ_u = diag(u),    s = alpha / r

The paper's configurations differ in which of v, B, u, A train; this is the one it recommends, vBuA, where all four
train (A and B tied). Trainable parameters: r · (d_in + d_out) once per weight shape, plus d_out + r per layer.

Init: A kaiming-uniform, B = 0 (LoRA's), u = v = 1: the tied adapter starts as one LoRA shared by every layer, and
the model equals the base at step 0.

Computation: Tied-LoRA is LoRA with computed factors A' = Λ_u A and B' = Λ_v B (vera.py's `FactoredLinear`): the
merged-weight GEMM with many tokens, two rank-r branches otherwise, factor gradients from rank-r products; the tied
A and B live once in the model's `lf_shared` and receive the sum of every layer's gradient through autograd.

Choices:
- Tying groups: the authors' NeMo code ties the adapter of the fused QKV projection (`LoraKQVAdapterWeightTying`, which
  tells layers apart by a learned position embedding, not by the paper's u and v), so "tied across layers" is one pair
  for the one target of each layer. Here the targets are separate modules, and layers whose weights have the same shape
  share a pair (all square attention projections together, the FFN's up and down projections each on their own);
  per-layer v and u still tell them apart.
- Init of u, v and B (not in the parts of the paper we could read): LoRA's init with unit scalings, so vBuA starts
  exactly where a tied LoRA does.
- Learning rate: the paper varies it for every configuration; we could not read a default relative to LoRA's, so
  `lr_mult` stays 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lorafactory.variants.base import VARIANTS, SharedRef, VariantConfig, adapter_layers, kaiming_
from lorafactory.variants.vera import FactoredLinear, SharedStateVariant, weight_dims


def shape_key(d_out: int, d_in: int) -> str:
    return f"{d_out}x{d_in}"


class TiedPairVariant(SharedStateVariant):
    """A variant whose trainable A (r × d_in) and B (d_out × r) exist once per weight shape in the model's shared
    state, as `lf_shared.A_<d_out>x<d_in>` and `lf_shared.B_<d_out>x<d_in>` (Tied-LoRA, S2-LoRA)."""

    def init_pair(self, d_out: int, d_in: int, factory: dict) -> tuple[Tensor, Tensor]:
        """The initial (A, B) of one shape group."""
        raise NotImplementedError

    def init_shared(self, shared: nn.Module, targets: list[nn.Module]) -> None:
        factory = {"dtype": targets[0].weight.dtype, "device": targets[0].weight.device}
        for d_out, d_in in sorted({weight_dims(m) for m in targets}):
            A, B = self.init_pair(d_out, d_in, factory)
            shared.register_parameter(f"A_{shape_key(d_out, d_in)}", nn.Parameter(A))
            shared.register_parameter(f"B_{shape_key(d_out, d_in)}", nn.Parameter(B))

    def expected_params(self, model: nn.Module) -> int:
        layers = adapter_layers(model)
        shapes = {(layer.out_features, layer.in_features) for layer in layers}
        per_layer = sum(self.layer_params(layer.in_features, layer.out_features) for layer in layers)
        return per_layer + sum(self.cfg.r * (d_in + d_out) for d_out, d_in in shapes)


def tied_pair(layer: FactoredLinear) -> tuple[Tensor, Tensor]:
    """The shared (A, B) of a layer's shape group."""
    shared, key = layer.shared(), shape_key(layer.out_features, layer.in_features)
    return getattr(shared, f"A_{key}"), getattr(shared, f"B_{key}")


class TiedLoRALinear(FactoredLinear):
    """The shape group's tied A and B, scaled by the layer's own `v` (d_out, on B's output) and `u` (r, on A's)."""

    def __init__(self, base: nn.Module, shared: SharedRef, r: int, scaling: float, dropout: float = 0.0):
        super().__init__(base, shared, scaling, dropout)
        factory = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.v = nn.Parameter(torch.ones(self.out_features, **factory))
        self.u = nn.Parameter(torch.ones(r, **factory))

    def factor_inputs(self) -> tuple[Tensor, ...]:
        return (*tied_pair(self), self.v, self.u)

    def factors(self, A: Tensor, B: Tensor, v: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
        return u.unsqueeze(1) * A, v.unsqueeze(1) * B

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.u.numel()}, scaling={self.scaling:g}"


@dataclass
class TiedLoRAConfig(VariantConfig):
    pass


@VARIANTS.register("tied_lora", config=TiedLoRAConfig)
class TiedLoRA(TiedPairVariant):
    name = "tied_lora"
    paper = (
        "Tied-LoRA: Enhancing parameter efficiency of LoRA with Weight Tying "
        "(Renduchintala, Konuk, Kuchaiev, NAACL 2024, arXiv 2311.09578)"
    )
    taxonomy = "rank"
    tags = ("sharing",)
    params_formula = "d_out + r per layer, plus r·(d_in + d_out) once per weight shape"

    def init_pair(self, d_out: int, d_in: int, factory: dict) -> tuple[Tensor, Tensor]:
        return kaiming_(torch.empty(self.cfg.r, d_in, **factory)), torch.zeros(d_out, self.cfg.r, **factory)

    def make_layer(self, base: nn.Module) -> TiedLoRALinear:
        return TiedLoRALinear(base, self.shared, self.cfg.r, self.cfg.alpha / self.cfg.r, self.cfg.dropout)

    def layer_params(self, d_in: int, d_out: int) -> int:
        return d_out + self.cfg.r
