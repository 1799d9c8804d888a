"""LoRA-Pro — "LoRA-Pro: Are Low-Rank Adapters Properly Optimized?" (Wang, Liang, He, Wang, Tan, ICLR 2025,
arXiv 2407.18242).

Update rule: LoRA's forward, `y = W0 x + b + s · B A x` (s = alpha / r). A LoRA step moves W by the "equivalent
gradient" g̃ = s (B g_A + g_B A); LoRA-Pro chooses g_A, g_B so that g̃ is the best approximation of the full
fine-tuning gradient G = ∂L/∂W (from ∇_A = s Bᵀ G, ∇_B = s G Aᵀ):

    g_A = (1/s²) (BᵀB)⁻¹ ∇_A + X A
    g_B = (1/s²) [I − B(BᵀB)⁻¹Bᵀ] ∇_B (AAᵀ)⁻¹ − B X          ⇒   g̃ = P_B G + G P_A − P_B G P_A

(P_B, P_A the projections onto B's columns and A's rows: g̃ is the orthogonal projection of G onto the LoRA tangent
space {B Y + Z A}). X cancels in g̃; among all X the paper takes the one that keeps (g_A, g_B) closest to LoRA's own
gradients, the solution of the Sylvester equation BᵀB X + X AAᵀ = −(1/s²)(BᵀB)⁻¹ ∇_A Aᵀ. With Adam, the paper keeps
full-size moments of g̃ (d_out × d_in, bias-corrected), maps the Adam direction D back to LoRA gradients
(∇_A' = s Bᵀ D, ∇_B' = s D Aᵀ), adjusts those with the formulas above (a new X) and steps A and B by −lr·(g_A, g_B)
with decoupled weight decay. The task head trains with plain AdamW.

Init: LoRA's (A kaiming, B = 0), so the model equals the base at step 0. At B = 0 the formulas reduce exactly to the
official first-step rule (g_A = ∇_A = 0, g_B = (1/s²) ∇_B (AAᵀ)⁻¹), so no special case is needed (tested).
Trainable parameters per layer: r · (d_in + d_out); optimizer state per layer: 2 · d_out · d_in (see `memory_note`).

Computation: the r × r algebra (two symmetric eigendecompositions per layer and step, giving both inverses and the
Sylvester solution X = U[(UᵀCV) / (λ_i + μ_j)]Vᵀ) runs in float64. The dense work is the method's own: g̃ is formed
with one GEMM of inner size 2r, the moments are updated in place, and the Adam direction is reduced back to r-sized
gradients at once. The forward and backward are LoRA's.

Choices: the official code (a patched DeepSpeed ZeRO-2 optimizer, `lorapro_full_adjustment`) uses δ = 1e-8 ridges
in pseudo-inverses and the unridged matrices in the Sylvester equation, hard-codes β = (0.9, 0.999), eps = 1e-8 and
weight decay 0, and special-cases its first global step; here the same δ regularises both inverses and the Sylvester
equation (one eigendecomposition each), betas, eps and weight decay come from the `optim` config, and the first-step
rule comes out of the general formulas. Its scaling factor is hard-coded to 16/8; here s = alpha / r.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lorafactory.errors import check
from lorafactory.variants.base import VARIANTS, VariantConfig
from lorafactory.variants.lora import LoRA
from lorafactory.variants.lora_fa import PairAdamW, adamw_settings, pair_groups


class SymmetricFactor:
    """The eigendecomposition of a symmetric positive definite r × r matrix M + δI, in float64."""

    def __init__(self, gram: Tensor, delta: float):
        eye = torch.eye(gram.shape[0], dtype=torch.float64, device=gram.device)
        self.values, self.vectors = torch.linalg.eigh(gram.double() + delta * eye)

    def inverse(self) -> Tensor:
        return (self.vectors / self.values) @ self.vectors.t()


def solve_sylvester(left: SymmetricFactor, right: SymmetricFactor, rhs: Tensor) -> Tensor:
    """X with L X + X R = C for symmetric positive definite L = UΛUᵀ, R = VMVᵀ: X = U[(UᵀCV) / (λ_i + μ_j)]Vᵀ."""
    U, V = left.vectors, right.vectors
    core = (U.t() @ rhs @ V) / (left.values.unsqueeze(1) + right.values.unsqueeze(0))
    return U @ core @ V.t()


class LoRAProAdjustment:
    """The closed-form adjustment of LoRA gradients for one layer at its current (A, B)."""

    def __init__(self, A: Tensor, B: Tensor, scaling: float, delta: float):
        self.A, self.B, self.s = A, B, scaling
        self.bb = SymmetricFactor(B.t() @ B, delta)
        self.aa = SymmetricFactor(A @ A.t(), delta)
        self.bb_inv = self.bb.inverse().to(A.dtype)
        self.aa_inv = self.aa.inverse().to(A.dtype)

    def closed_form(self, grad_A: Tensor, grad_B: Tensor) -> tuple[Tensor, Tensor]:
        """(1/s²)(BᵀB)⁻¹∇_A and (1/s²)[I − P_B]∇_B(AAᵀ)⁻¹: the adjusted gradients with X = 0."""
        B, s2 = self.B, self.s**2
        g_A = (self.bb_inv @ grad_A).div_(s2)
        residual = grad_B - B @ (self.bb_inv @ (B.t() @ grad_B))
        return g_A, (residual @ self.aa_inv).div_(s2)

    def sylvester_x(self, grad_A: Tensor) -> Tensor:
        """The X of the Sylvester equation BᵀB X + X AAᵀ = −(1/s²)(BᵀB)⁻¹ ∇_A Aᵀ."""
        rhs = -(self.bb_inv.double() @ (grad_A @ self.A.t()).double()) / self.s**2
        return solve_sylvester(self.bb, self.aa, rhs).to(self.A.dtype)

    def adjusted(self, grad_A: Tensor, grad_B: Tensor) -> tuple[Tensor, Tensor]:
        g_A, g_B = self.closed_form(grad_A, grad_B)
        X = self.sylvester_x(grad_A)
        return g_A.addmm_(X, self.A), g_B.addmm_(self.B, X, alpha=-1)

    def equivalent(self, g_A: Tensor, g_B: Tensor) -> Tensor:
        """s (B g_A + g_B A), the full-weight change a LoRA step with (g_A, g_B) makes, as one GEMM."""
        return torch.mm(torch.cat([self.B, g_B], dim=1), torch.cat([g_A, self.A], dim=0)).mul_(self.s)


class LoRAProAdamW(PairAdamW):
    """LoRA-Pro for the groups `{"params": [A, B], "lora_scaling": s}` (full-size Adam moments of the equivalent
    gradient, stored with B), torch's AdamW for every other group; all read `group["lr"]` at each step."""

    def __init__(self, params: list[dict[str, Any]], delta: float = 1e-8, **adamw: Any):
        super().__init__(params, **adamw)
        self.delta = delta

    def pair_step(self, group: dict[str, Any]) -> None:
        A, B = group["params"]
        if A.grad is None and B.grad is None:
            return
        dtype = torch.promote_types(A.dtype, torch.float32)
        a, b = A.detach().to(dtype), B.detach().to(dtype)
        grad_A = torch.zeros_like(a) if A.grad is None else A.grad.to(dtype)
        grad_B = torch.zeros_like(b) if B.grad is None else B.grad.to(dtype)
        state = self.state[B]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros(b.shape[0], a.shape[1], dtype=dtype, device=B.device)
            state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
        # AdamW's load_state_dict turns "step" into a float32 tensor: keep counting in Python integers
        state["step"] = step = int(state["step"]) + 1
        beta1, beta2 = group["betas"]
        adjust = LoRAProAdjustment(a, b, group["lora_scaling"], self.delta)

        equivalent = adjust.equivalent(*adjust.closed_form(grad_A, grad_B))
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(equivalent, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(equivalent, equivalent, value=1 - beta2)
        bias1, bias2 = 1 - beta1**step, 1 - beta2**step
        direction = torch.div(exp_avg_sq, bias2, out=equivalent).sqrt_().add_(group["eps"])
        direction = torch.div(exp_avg, direction, out=direction).div_(bias1)  # the Adam direction D (d_out × d_in)

        s = group["lora_scaling"]
        g_A, g_B = adjust.adjusted(b.t() @ direction * s, direction @ a.t() * s)
        lr, decay = group["lr"], 1 - group["lr"] * group["weight_decay"]
        A.mul_(decay).sub_(g_A.to(A.dtype), alpha=lr)
        B.mul_(decay).sub_(g_B.to(B.dtype), alpha=lr)


@dataclass
class LoRAProConfig(VariantConfig):
    # LoRA's rate: the official scripts train LoRA-Pro at 2e-5 on Llama-2-7B, a usual LoRA rate there.
    delta: float = 1e-8
    """Ridge δ added to BᵀB and AAᵀ before inverting them (the official value)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.delta > 0, f"variant.delta must be > 0, got {self.delta}")


@VARIANTS.register("lora_pro", config=LoRAProConfig)
class LoRAPro(LoRA):
    name = "lora_pro"
    paper = "LoRA-Pro: Are Low-Rank Adapters Properly Optimized? (Wang et al., ICLR 2025, arXiv 2407.18242)"
    taxonomy = "optimization"
    tags = ("gradient-alignment",)
    peft = None
    memory_note = "optimizer keeps full-size Adam moments of the equivalent gradient: 2·d_out·d_in floats per layer"

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        return pair_groups(model, lr, self.scaling)

    def build_optimizer(self, param_groups: list[dict[str, Any]], cfg: Any) -> LoRAProAdamW:
        return LoRAProAdamW(param_groups, delta=self.cfg.delta, **adamw_settings(cfg))
