"""DeLoRA — "Decoupling Angles and Strength in Low-rank Adaptation" (Bini, Girrbach, Akata, ICLR 2025,
arXiv 2503.18225).

Update rule: LoRA's rank-one terms are normalised to unit norm and their sum scaled by a learnable bound λ,

    ΔW = (λ / r) · B Ξ A · diag(w),   Ξ = diag(1 / (‖b_k‖ ‖a_k‖)),   w_j = ‖W0[:, j]‖,   y = W0 x + b + ΔW drop(x)

with b_k the k-th column of B (d_out × r), a_k the k-th row of A (r × d_in), both norms clamped at 1e-4 (as PEFT), and
w the column norms of the pretrained weight, fixed at init (a buffer, saved with the adapter). Each term b_k a_kᵀ Ξ_kk
has unit Frobenius norm, so ‖B Ξ A‖_F ≤ r and ‖ΔW‖_F ≤ λ · max_j w_j: the angle (B, A) is decoupled from the strength
(λ), and the update cannot stray further from W0 than λ allows.
Init (PEFT's): A kaiming-uniform, B = 0 (so ΔW = 0), λ = `delora_lambda`. The official code instead starts A and B
both kaiming and subtracts frozen copies of their initial normalised product, ΔW = (λ/r)(B Ξ A − D Ξ' C) diag(w),
which doubles the adapter's storage and compute; its README points to PEFT's version as the improved zero init, and
that is what we implement (parity with PEFT is tested).
Trainable parameters per layer: r · (d_in + d_out) + 1 (λ is one scalar per layer).

Choices where the paper and the code leave room:
- λ starts at 15, PEFT's default; the official GLUE scripts use 4–12 on RoBERTa-base, PEFT's docs advise 10–15.
- Learning rate: the official GLUE runs train at 1e-3–1e-2 where LoRA trains at ~5e-4, PEFT's docs say 10–100× a
  LoRA rate: `lr_mult` = 10. λ trains at the same rate (the official scripts give it its own, equal in 5 of 7 tasks).
- Dropout (PEFT's `module_dropout`) drops the input of the update only.

Kind (`tags`): none of the study's three rank kinds fits. DeLoRA neither raises the rank beyond r (expansion), shares
factors across layers (sharing), nor allocates rank (budgeting); it reparametrises a rank-r update so that its
direction and its size are learned separately. Tagged `normalised`.

Computation: the normalisation and the column scaling are folded into the rank-r factors, A' = A diag(w) and
B' = B (λ/r) Ξ, so the layer is LoRA on (A', B') with scale 1: many tokens and no dropout multiply by the merged weight
W0 + B'A' in one GEMM (LoRA's `MergedLoRAFunction`), otherwise W0 x + B'(A' x). The gradients of A, B and λ flow back
through the two r-sized products. PEFT multiplies the input by w (an activation-sized pass) and runs two branches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorafactory.errors import check
from lorafactory.variants.base import VARIANTS, AdapterLayer, Variant, VariantConfig, kaiming_, peft_layer_state
from lorafactory.variants.lora import MergedLoRAFunction, merge_pays

NORM_FLOOR = 1e-4
"""Smallest norm of a column of B or a row of A in Ξ (PEFT's clamp): B starts at 0."""


class DeLoRALinear(AdapterLayer):
    """`base(x) + (λ/r) B Ξ A diag(w) drop(x)`; parameters `delora_A` (r × d_in), `delora_B` (d_out × r) and
    `delora_lambda` (1), buffer `w_norm` (d_in, the column norms of W0)."""

    def __init__(self, base: nn.Module, r: int, delora_lambda: float, dropout: float = 0.0):
        super().__init__(base)
        self.r = r
        factory = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.delora_A = nn.Parameter(kaiming_(torch.empty(r, self.in_features, **factory)))
        self.delora_B = nn.Parameter(torch.zeros(self.out_features, r, **factory))
        self.delora_lambda = nn.Parameter(torch.full((1,), float(delora_lambda), **factory))
        with torch.no_grad():
            w_norm = self.weight.to(torch.promote_types(self.weight.dtype, torch.float32)).norm(dim=0)
        self.register_buffer("w_norm", w_norm.to(base.weight.dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def factors(self) -> tuple[Tensor, Tensor]:
        """(A', B') with ΔW = B' A': A' = A diag(w), B' = B (λ/r) Ξ."""
        A, B = self.delora_A, self.delora_B
        norms = A.norm(dim=1).clamp_min(NORM_FLOOR) * B.norm(dim=0).clamp_min(NORM_FLOOR)
        return A * self.w_norm, B * (self.delora_lambda / self.r / norms)

    def adapter_forward(self, x: Tensor) -> Tensor:
        A, B = self.factors()
        if self.dropout is None and merge_pays(self, x):
            return MergedLoRAFunction.apply(x, self.weight, self.bias, A, B, 1.0)
        out = self.base_forward(x)
        if self.dropout is not None:
            x = self.dropout(x)
        h = F.linear(x, A).reshape(-1, self.r)
        return torch.addmm(out.reshape(-1, self.out_features), h, B.t()).view(out.shape)

    def delta_weight(self) -> Tensor:
        A, B = self.factors()
        return B @ A

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}"


@dataclass
class DeLoRAConfig(VariantConfig):
    # Official GLUE runs (RoBERTa-base): 1e-3–1e-2 where LoRA trains at ~5e-4; PEFT's docs: 10–100× LoRA's rate.
    lr_mult: float = 10.0
    delora_lambda: float = 15.0
    """Initial λ, the bound on ‖ΔW‖_F / max_j ‖W0[:, j]‖ (learnable, one per layer; PEFT's default)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.delora_lambda > 0, f"variant.delora_lambda must be > 0, got {self.delora_lambda}")


@VARIANTS.register("delora", config=DeLoRAConfig)
class DeLoRA(Variant):
    name = "delora"
    paper = "Decoupling Angles and Strength in Low-rank Adaptation (Bini et al., ICLR 2025, arXiv 2503.18225)"
    taxonomy = "rank"
    tags = ("normalised",)
    params_formula = "r·(d_in + d_out) + 1"
    peft = "DeloraConfig(r=r, delora_lambda=λ)"

    def make_layer(self, base: nn.Module) -> DeLoRALinear:
        return DeLoRALinear(base, self.cfg.r, self.cfg.delora_lambda, self.cfg.dropout)

    def layer_params(self, d_in: int, d_out: int) -> int:
        return self.cfg.r * (d_in + d_out) + 1

    def peft_config(self, targets: list[str], head: list[str]) -> Any:
        from peft import DeloraConfig

        return DeloraConfig(
            r=self.cfg.r,
            delora_lambda=self.cfg.delora_lambda,
            module_dropout=self.cfg.dropout,
            target_modules=targets,
            modules_to_save=head,
        )

    def peft_export(
        self, model: nn.Module, base: nn.Module, targets: list[str], head: list[str]
    ) -> tuple[Any, dict[str, Tensor]] | None:
        names = ("delora_A", "delora_B", "delora_lambda")
        state = peft_layer_state(
            model, lambda layer: {**{n: getattr(layer, n) for n in names}, "delora_w_norm": layer.w_norm}
        )
        return self.peft_config(targets, head), state
