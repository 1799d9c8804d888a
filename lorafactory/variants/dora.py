"""DoRA — "DoRA: Weight-Decomposed Low-Rank Adaptation" (Liu et al., ICML 2024, arXiv 2402.09353).

Update rule: the adapted weight is split into a trainable magnitude m ∈ R^{d_out} and a direction updated by LoRA,

    W' = m ⊙ (W0 + s·B A) / ‖W0 + s·B A‖_row,      y = W' x + b,    s = alpha / r

with the row norm (one per output unit) treated as a constant in the backward pass (paper §4.3), which is what makes
DoRA affordable. Computed as `y = (m / ‖·‖) ⊙ (W0 x + s·B A dropout(x)) + b`, the same as PEFT's `use_dora=True`
when dropout is 0 (with dropout, PEFT also drops the input of the `W0 x` rescaling term; here only the LoRA branch
sees dropout, as in the paper's formula).

Init: LoRA's (A kaiming, B = 0) and m = ‖W0‖_row, so the model equals the base at step 0.
Trainable parameters per layer: r · (d_in + d_out) + d_out.

Computation: as for LoRA (see lora.py), batches with many tokens and no dropout use the merged weight
W' = (m/n) ⊙ (W0 + s·B A), one GEMM, with a custom backward: with c = m/n and g the output gradient,
∂x = g W',  ∂A = s·(g (c ⊙ B))ᵀ x,  ∂B = s·c ⊙ (gᵀ (x Aᵀ)),  ∂m = Σ_tokens g ⊙ (y − b) / m.
Otherwise the two-branch form runs, with the row norm taken from r-sized products only (`DoRALinear.weight_norm`),
never the dense ΔW.

Export to PEFT: LoRA's, plus m as PEFT's `lora_magnitude_vector`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorafactory.variants.base import VARIANTS, AutocastFunction, VariantConfig, peft_layer_state
from lorafactory.variants.lora import LoRA, LoRALinear, merge_pays


class MergedDoRAFunction(AutocastFunction):
    """y = x W'ᵀ + b with W' = (m/n) ⊙ (W + s·B A), n its detached row norm; gradients for x, A, B and m."""

    @staticmethod
    def _weights(weight: Tensor, A: Tensor, B: Tensor, m: Tensor, s: float) -> tuple[Tensor, Tensor]:
        direction = torch.addmm(weight, B, A, alpha=s)
        c = m / direction.norm(dim=1)
        return direction.mul_(c.unsqueeze(1)), c

    @staticmethod
    def forward(
        ctx, x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, m: Tensor, scaling: float
    ) -> Tensor:
        merged, _ = MergedDoRAFunction._weights(weight, A, B, m, scaling)
        y = F.linear(x, merged, bias)
        ctx.save_for_backward(x, weight, bias, A, B, m, y)
        ctx.scaling = scaling
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, bias, A, B, m, y = ctx.saved_tensors
        s = ctx.scaling
        merged, c = MergedDoRAFunction._weights(weight, A, B, m, s)
        g = grad.reshape(-1, grad.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        grad_x = grad_A = grad_B = grad_m = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ merged).view(x.shape)
        if ctx.needs_input_grad[3]:
            grad_A = torch.mm((g @ (B * c.unsqueeze(1))).t(), x2).mul_(s)
        if ctx.needs_input_grad[4]:
            grad_B = torch.mm((x2 @ A.t()).t(), g).t().mul_(c.unsqueeze(1) * s)
        if ctx.needs_input_grad[5]:
            # y − b = m ⊙ (direction x)/n, so (direction x)/n = (y − b)/m: no need to keep direction x alive.
            gy = (g * y.reshape(-1, y.shape[-1])).sum(dim=0)
            if bias is not None:
                gy = gy - bias * g.sum(dim=0)
            grad_m = gy / torch.where(m == 0, torch.ones_like(m), m)
        return grad_x, None, None, grad_A, grad_B, grad_m, None


class DoRALinear(LoRALinear):
    """LoRA plus a magnitude vector `magnitude` (d_out) that rescales each output row of the direction."""

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float = 0.0):
        super().__init__(base, r, scaling, dropout)
        self._merged_norm: Tensor | None = None
        self._w0_sq: tuple[tuple, Tensor] | None = None
        self.magnitude = nn.Parameter(self.weight_norm().to(base.weight.dtype))

    def _base_row_sq(self) -> Tensor:
        # ‖W0_i‖² depends only on the frozen weight: recompute it only when the weight changed (written to in place,
        # or replaced by .to()/.double()/load_state_dict(assign=True)).
        weight = self.base.weight
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device)
        weight = self.weight
        if self._w0_sq is None or self._w0_sq[0] != key:
            dtype = torch.promote_types(weight.dtype, torch.float32)
            self._w0_sq = (key, weight.to(dtype).pow(2).sum(dim=1))
        return self._w0_sq[1]

    @torch.no_grad()
    def weight_norm(self) -> Tensor:
        """‖W0 + s·B A‖ per output row, from r-sized products only:
        ‖W0_i‖² + 2s·Σ_k B_ik (W0 Aᵀ)_ik + s²·Σ_kl B_ik (A Aᵀ)_kl B_il."""
        dtype = torch.promote_types(self.weight.dtype, torch.float32)  # at least fp32, double stays double
        W0, A, B, s = self.weight.to(dtype), self.lora_A.to(dtype), self.lora_B.to(dtype), self.scaling
        cross = (B * (W0 @ A.t())).sum(dim=1)
        quad = ((B @ (A @ A.t())) * B).sum(dim=1)
        return (self._base_row_sq() + 2 * s * cross + s * s * quad).clamp_min(0).sqrt()

    def adapter_forward(self, x: Tensor) -> Tensor:
        if self.dropout is None and merge_pays(self, x):
            return MergedDoRAFunction.apply(
                x, self.weight, self.bias, self.lora_A, self.lora_B, self.magnitude, self.scaling
            )
        direction = self.add_lora(nn.functional.linear(x, self.weight), x)  # W0 x + s·B A x
        scale = self.magnitude / self.weight_norm().to(x.dtype)  # the norm carries no gradient (no_grad)
        if self.bias is None:
            return direction * scale
        return torch.addcmul(self.bias, direction, scale)

    def original_weight(self) -> Tensor:
        """W0, whether or not the update is merged into the base weight (merged: W0 = W'·n/m − s·B A)."""
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        weight = self.weight.to(dtype)
        if not self.merged:
            return weight
        rescale = (self._merged_norm / self.magnitude.to(dtype)).unsqueeze(1)
        return weight * rescale - self.scaling * (self.lora_B.to(dtype) @ self.lora_A.to(dtype))

    def delta_weight(self) -> Tensor:
        W0 = self.original_weight()
        direction = W0 + self.scaling * (self.lora_B.to(W0.dtype) @ self.lora_A.to(W0.dtype))
        return (self.magnitude.to(W0.dtype) / direction.detach().norm(dim=1)).unsqueeze(1) * direction - W0

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        direction = self.weight.to(dtype) + self.scaling * (self.lora_B.to(dtype) @ self.lora_A.to(dtype))
        self._merged_norm = direction.norm(dim=1)
        self.write_weight((self.magnitude.to(dtype) / self._merged_norm).unsqueeze(1) * direction)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.write_weight(self.original_weight())
        self._merged_norm = None
        self.merged = False


@dataclass
class DoRAConfig(VariantConfig):
    pass


@VARIANTS.register("dora", config=DoRAConfig)
class DoRA(LoRA):
    name = "dora"
    paper = "DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al., ICML 2024, arXiv 2402.09353)"
    taxonomy = "rank"
    tags = ("magnitude-direction",)
    params_formula = "r·(d_in + d_out) + d_out"
    peft = "LoraConfig(use_dora=True)"

    peft_options = {"use_dora": True}

    def make_layer(self, base: nn.Module) -> DoRALinear:
        return DoRALinear(base, self.cfg.r, self.scaling, self.cfg.dropout)

    def layer_params(self, d_in: int, d_out: int) -> int:
        return self.cfg.r * (d_in + d_out) + d_out

    def peft_export(
        self, model: nn.Module, base: nn.Module, targets: list[str], head: list[str]
    ) -> tuple[Any, dict[str, Tensor]] | None:
        config, state = super().peft_export(model, base, targets, head)
        return config, state | peft_layer_state(model, lambda layer: {"lora_magnitude_vector": layer.magnitude})
