"""HiRA — "HiRA: Parameter-Efficient Hadamard High-Rank Adaptation for Large Language Models" (Huang, Ko, Zhuang,
Tang, Zhang, ICLR 2025; no arXiv version: OpenReview TwJrTz9cRS, code hqsiswiliam/hira).

Update rule: the low-rank product modulates the frozen weight entry by entry (Hadamard product ⊙),

    ΔW = W0 ⊙ (B A),   y = (W0 + ΔW) x + b = (W0 ⊙ (1 + B A)) x + b,    A ∈ R^{r×d_in}, B ∈ R^{d_out×r}

so rank(ΔW) ≤ rank(W0) · r: a high-rank update from LoRA's parameters. There is no scale (neither the official code
nor PEFT has one): `variant.alpha` is not used.
Init: A kaiming-uniform, B = 0 (the official code's `init_a='kaiming'`, `init_b='zero'`, and PEFT's), so ΔW = 0 at
step 0. (The paper's text swaps the letters: its A, the output side, starts at zero.)
Trainable parameters per layer: r · (d_in + d_out).

Choices where the paper and the code leave room:
- Learning rate: the paper trains at 1e-3 "following DoRA's setup except learning rate adjustments", where that
  setup trains LoRA at 2e-4–3e-4 (its appendix table says 1e-4–2e-4; the released scripts use 1e-3): `lr_mult` = 4.
- Dropout (`variant.dropout`, PEFT's `hira_dropout`) drops the input of the update only: y = W0 x + b + ΔW drop(x).
- Merging writes W0 ⊙ (1 + B A) and keeps W0 aside to unmerge exactly (W0 = W'/(1 + B A) would divide by entries
  that can reach 0); PEFT does the same.

Computation: the method needs the dense d_out × d_in matrix W0 ⊙ (1 + B A) (a Hadamard product has no factorised
form: a per-rank route W0 (a_k ⊙ x) costs r GEMMs with W0), and its gradients need the dense ∂L/∂W = gᵀx, since
∂L/∂(BA) = W0 ⊙ gᵀx, ∂B = (W0 ⊙ gᵀx) Aᵀ, ∂A = Bᵀ (W0 ⊙ gᵀx). A custom autograd function runs the whole layer as one
GEMM with the modulated weight, keeps nothing dense between forward and backward (it recomputes W0 ⊙ (1 + B A), an
r-sized product, in backward), and writes ∂L/∂W into that same buffer after the input gradient: one d_out × d_in
tensor alive at a time. PEFT runs the base layer and the update as two GEMMs, keeps W0 ⊙ B A alive for the backward,
and allocates ∂L/∂W and W0 ⊙ ∂L/∂W besides. With dropout the layer runs W0 x and the update as two GEMMs, as PEFT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorafactory.variants.base import (
    VARIANTS,
    AdapterLayer,
    AutocastFunction,
    Variant,
    VariantConfig,
    kaiming_,
    peft_layer_state,
)


def modulated(weight: Tensor, A: Tensor, B: Tensor, with_base: bool) -> Tensor:
    """W ⊙ (1 + B A) (`with_base`) or W ⊙ B A, as one new d_out × d_in tensor."""
    product = B @ A
    if with_base:
        product.add_(1)
    return product.mul_(weight)


class HadamardFunction(AutocastFunction):
    """y = x (W ⊙ (c + B A))ᵀ + b with c = 1 (`with_base`) or 0; gradients for x, A and B only (W, b frozen)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, with_base: bool) -> Tensor:
        ctx.save_for_backward(x, weight, A, B)
        ctx.with_base = with_base
        return F.linear(x, modulated(weight, A, B, with_base), bias)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, A, B = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_A = grad_B = buffer = None
        if ctx.needs_input_grad[0]:
            buffer = modulated(weight, A, B, ctx.with_base)
            grad_x = (g @ buffer).view(x.shape)
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            # ∂L/∂(BA) = W ⊙ gᵀx, written over the buffer the input gradient no longer needs.
            # (autocast leaves out= products alone: under bf16-mixed, x is cast to the gradient's dtype by hand)
            dense = torch.mm(g.t(), x.reshape(-1, x.shape[-1]).to(g.dtype), out=buffer).mul_(weight)
            if ctx.needs_input_grad[3]:
                grad_A = B.t() @ dense
            if ctx.needs_input_grad[4]:
                grad_B = dense @ A.t()
        return grad_x, None, None, grad_A, grad_B, None


class HiRALinear(AdapterLayer):
    """`(W0 ⊙ (1 + B A)) x + b`; the parameters are `hira_A` (r × d_in) and `hira_B` (d_out × r)."""

    def __init__(self, base: nn.Module, r: int, dropout: float = 0.0):
        super().__init__(base)
        self.r = r
        factory = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.hira_A = nn.Parameter(kaiming_(torch.empty(r, self.in_features, **factory)))
        self.hira_B = nn.Parameter(torch.zeros(self.out_features, r, **factory))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        # W0 while the update is merged into the base weight (not saved: a saved state is always unmerged).
        self.register_buffer("unmerged_weight", None, persistent=False)

    def adapter_forward(self, x: Tensor) -> Tensor:
        if self.dropout is None:
            return HadamardFunction.apply(x, self.weight, self.bias, self.hira_A, self.hira_B, True)
        update = HadamardFunction.apply(self.dropout(x), self.weight, None, self.hira_A, self.hira_B, False)
        return self.base_forward(x) + update

    def original_weight(self) -> Tensor:
        return self.unmerged_weight if self.merged else self.weight

    def delta_weight(self) -> Tensor:
        return modulated(self.original_weight(), self.hira_A, self.hira_B, with_base=False)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        self.unmerged_weight = self.weight.detach().clone()
        super().merge()

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.write_weight(self.unmerged_weight)
        self.unmerged_weight = None
        self.merged = False

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}"


@dataclass
class HiRAConfig(VariantConfig):
    # The paper trains HiRA at 1e-3 in DoRA's LLaMA commonsense recipe, where LoRA trains at 2e-4–3e-4.
    lr_mult: float = 4.0


@VARIANTS.register("hira", config=HiRAConfig)
class HiRA(Variant):
    name = "hira"
    paper = (
        "HiRA: Parameter-Efficient Hadamard High-Rank Adaptation for Large Language Models "
        "(Huang et al., ICLR 2025; no arXiv version, OpenReview TwJrTz9cRS)"
    )
    taxonomy = "rank"
    tags = ("expansion",)
    params_formula = "r·(d_in + d_out)"
    peft = "HiraConfig(r=r)"
    memory_note = (
        "forms the dense W0 ⊙ (1 + BA) and ∂L/∂W (d_out × d_in) of each adapted layer in each step, one at a time "
        "(recomputed in backward, not kept)"
    )

    def make_layer(self, base: nn.Module) -> HiRALinear:
        return HiRALinear(base, self.cfg.r, self.cfg.dropout)

    def layer_params(self, d_in: int, d_out: int) -> int:
        return self.cfg.r * (d_in + d_out)

    def peft_config(self, targets: list[str], head: list[str]) -> Any:
        from peft import HiraConfig

        return HiraConfig(r=self.cfg.r, hira_dropout=self.cfg.dropout, target_modules=targets, modules_to_save=head)

    def peft_export(
        self, model: nn.Module, base: nn.Module, targets: list[str], head: list[str]
    ) -> tuple[Any, dict[str, Tensor]] | None:
        state = peft_layer_state(model, lambda layer: {"hira_A": layer.hira_A, "hira_B": layer.hira_B})
        return self.peft_config(targets, head), state
