"""LoRA — "LoRA: Low-Rank Adaptation of Large Language Models" (Hu et al., ICLR 2022, arXiv 2106.09685).

Update rule, for a frozen linear `y = W0 x + b`:

    y = W0 x + b + s · B A dropout(x),    A ∈ R^{r×d_in}, B ∈ R^{d_out×r}, s = alpha / r

Init: A kaiming-uniform (nn.Linear's default), B = 0, so the adapted model equals the base at step 0.
Trainable parameters per layer: r · (d_in + d_out).

Computation: when a batch has many tokens and there is no dropout, the layer multiplies by the merged weight
W0 + s·B A (one GEMM, as cheap as the frozen layer) and a custom backward takes the gradients of A and B from rank-r
products, never the dense ∂L/∂W: ∂A = s·(g B)ᵀ x, ∂B = s·gᵀ (x Aᵀ). This removes the activation-sized passes of the
two-branch form (a second dgrad, its accumulation, the output copy). Few tokens (decoding), dropout or a trainable
base fall back to `W0 x + s·B (A x)`. Both compute the same function and gradients (tests check they agree).

Export to PEFT (`peft_export`, for this file's subclasses too): `lora_A`/`lora_B` as PEFT's, in the config
`peft_config` gives. A subclass that rewrote the base (PiSSA, OLoRA, LoRA-GA: W_res = W0 − s·B0 A0) is exported as
PEFT converts such adapters itself, a plain LoRA of rank 2r on the original W0: W_res + s·B A − W0 = s·(B A − B0 A0),
so A' = [A; A0], B' = [B, −B0] with the same s. The run saved W_res, not B0 and A0: their product is recovered from
the rank-r SVD of W0 − W_res (its other singular values are round-off; a base that is not the run's is refused).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorafactory.errors import UserError
from lorafactory.variants.base import (
    VARIANTS,
    AdapterLayer,
    AutocastFunction,
    Variant,
    VariantConfig,
    kaiming_,
    named_adapter_layers,
    peft_layer_state,
)


class MergedLoRAFunction(AutocastFunction):
    """y = x (W + s·B A)ᵀ + b in one GEMM; gradients for x, A and B only (W and b are frozen)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scaling: float) -> Tensor:
        ctx.save_for_backward(x, weight, A, B)
        ctx.scaling = scaling
        return F.linear(x, torch.addmm(weight, B, A, alpha=scaling), bias)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, A, B = ctx.saved_tensors
        s = ctx.scaling
        g = grad.reshape(-1, grad.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        grad_x = grad_A = grad_B = None
        if ctx.needs_input_grad[0]:  # recomputing W + sBA is cheaper than keeping it alive until backward
            grad_x = (g @ torch.addmm(weight, B, A, alpha=s)).view(x.shape)
        if ctx.needs_input_grad[3]:
            grad_A = torch.mm((g @ B).t(), x2).mul_(s)
        if ctx.needs_input_grad[4]:
            grad_B = torch.mm((x2 @ A.t()).t(), g).t().mul_(s)  # (hᵀg)ᵀ: BLAS is ~4× faster than gᵀh here
        return grad_x, None, None, grad_A, grad_B, None


def merge_pays(layer: AdapterLayer, x: Tensor) -> bool:
    """Whether forming the merged weight (d_out·d_in work, twice per step) costs less than the activation-sized passes
    it saves (about (d_in + d_out) per token); also False whenever the merged form would lose a gradient."""
    if layer.base.weight.requires_grad or (layer.base.bias is not None and layer.base.bias.requires_grad):
        return False
    tokens = x.numel() // layer.in_features
    return (
        tokens * (layer.in_features + layer.out_features) >= MERGE_THRESHOLD * layer.in_features * layer.out_features
    )


MERGE_THRESHOLD = 2.0
"""See `merge_pays`; tests set it to 0 (always merged) or inf (never) to check both paths."""


class LoRALinear(AdapterLayer):
    """`base(x) + scaling · B A dropout(x)`; the parameters are `lora_A` (r × d_in) and `lora_B` (d_out × r)."""

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float = 0.0):
        super().__init__(base)
        self.r = r
        self.scaling = scaling
        factory = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.lora_A = nn.Parameter(kaiming_(torch.empty(r, self.in_features, **factory)))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **factory))
        # No module call at all when there is no dropout: every call costs on a 36-layer model.
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def adapter_forward(self, x: Tensor) -> Tensor:
        if self.dropout is None and merge_pays(self, x):
            return MergedLoRAFunction.apply(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling)
        return self.add_lora(self.base_forward(x), x)

    def add_lora(self, out: Tensor, x: Tensor) -> Tensor:
        """`out + scaling · B A dropout(x)`, with the scale and the sum folded into one GEMM (`addmm`), so neither
        the forward nor the backward makes an extra full-size elementwise pass over the output."""
        if self.dropout is not None:
            x = self.dropout(x)
        h = F.linear(x, self.lora_A).reshape(-1, self.r)
        return torch.addmm(out.reshape(-1, self.out_features), h, self.lora_B.t(), alpha=self.scaling).view(out.shape)

    def delta_weight(self) -> Tensor:
        return self.scaling * (self.lora_B @ self.lora_A)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, scaling={self.scaling:g}"


@dataclass
class LoRAConfig(VariantConfig):
    pass


@VARIANTS.register("lora", config=LoRAConfig)
class LoRA(Variant):
    name = "lora"
    paper = "LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., ICLR 2022, arXiv 2106.09685)"
    taxonomy = "rank"
    tags = ("baseline",)
    params_formula = "r·(d_in + d_out)"
    peft = "LoraConfig()"

    @property
    def scaling(self) -> float:
        return self.cfg.alpha / self.cfg.r

    def make_layer(self, base: nn.Module) -> LoRALinear:
        return LoRALinear(base, self.cfg.r, self.scaling, self.cfg.dropout)

    def layer_params(self, d_in: int, d_out: int) -> int:
        return self.cfg.r * (d_in + d_out)

    def peft_config(self, targets: list[str], head: list[str]) -> Any | None:
        if self.peft is None:  # a LoRA-layer method PEFT does not have (its optimizer or training is the method)
            return None
        from peft import LoraConfig

        return LoraConfig(
            r=self.cfg.r,
            lora_alpha=self.cfg.alpha,
            lora_dropout=self.cfg.dropout,
            target_modules=targets,
            modules_to_save=head,
            **self.peft_options,
        )

    peft_options: ClassVar[dict[str, Any]] = {}
    """`LoraConfig` keywords that make PEFT's LoRA this variant (`use_dora=True`, ...)."""

    def peft_export(
        self, model: nn.Module, base: nn.Module, targets: list[str], head: list[str]
    ) -> tuple[Any, dict[str, Tensor]] | None:
        config = self.peft_config(targets, head)
        if config is None:
            return None
        layers = named_adapter_layers(model)
        if not any(layer.saves_base for _, layer in layers):
            return config, peft_layer_state(
                model, lambda layer: {"lora_A.weight": layer.lora_A, "lora_B.weight": layer.lora_B}
            )
        from peft import LoraConfig

        state = {}
        for name, layer in layers:
            A0, B0 = self._initial_factors(name, layer, base.get_submodule(name))
            state[f"base_model.model.{name}.lora_A.weight"] = torch.cat([layer.lora_A.detach(), A0])
            state[f"base_model.model.{name}.lora_B.weight"] = torch.cat([layer.lora_B.detach(), -B0], dim=1)
        rank = 2 * self.cfg.r
        converted = LoraConfig(
            r=rank,
            lora_alpha=self.scaling * rank,  # PEFT's s = lora_alpha / r: the run's s at rank 2r
            lora_dropout=self.cfg.dropout,
            target_modules=targets,
            modules_to_save=head,
        )
        return converted, state

    @torch.no_grad()
    def _initial_factors(self, name: str, layer: LoRALinear, original: nn.Module) -> tuple[Tensor, Tensor]:
        """(A0, B0) with s·B0 A0 = W0 − W_res, from the original module's W0 and the layer's rewritten W_res."""
        W0 = original.weight.reshape(original.weight.shape[0], -1).double()
        U, S, Vh = torch.linalg.svd(W0 - layer.original_weight().double(), full_matrices=False)
        r = layer.r
        if S[r:].norm() > 10 * torch.finfo(layer.lora_A.dtype).eps * W0.norm():  # more than the residual's round-off
            raise UserError(
                f"variant={self.name}: the base weight of '{name}' is not the one the run rewrote (W0 − W_res is "
                f"not of rank {r}), so no PEFT adapter on this base reproduces the run; use --merged"
            )
        root = (S[:r] / layer.scaling).sqrt()
        dtype = layer.lora_A.dtype
        return (root.unsqueeze(1) * Vh[:r]).to(dtype), (U[:, :r] * root).to(dtype)
