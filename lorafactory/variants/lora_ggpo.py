"""LoRA-GGPO — "LoRA-GGPO: Mitigating Double Descent in LoRA Fine-Tuning via Gradient-Guided Perturbation Optimization"
(Chang, Guo, Chang, Wu, arXiv 2502.14538 v1; v2 of the paper replaced the method by LoRA-MGPO).

Update rule: LoRA's function, `y = W0 x + b + s · B A x` (s = alpha / r), trained with a random perturbation of the
whole weight in the training forward only:

    y = (W' + E) x + b,   W' = W0 + s·B A,   E_ij = c_i · ξ_ij / √d_out,  ξ ~ N(0, 1) drawn anew at every forward
    c_i = σ · ‖W'_i‖ + β · ‖∇W'_i‖²,    ∇W' = s (B ∇_A + ∇_B A)  (the LoRA equivalent gradient of the last step)

so rows with large weights or large recent gradients are perturbed more, a one-pass stand-in for sharpness-aware
minimisation (no second forward/backward). Evaluation computes plain LoRA; so does training until the first gradient
has been seen (there is no gradient norm before), as in the reference implementation. Gradients of A and B are
LoRA's at the perturbed point. The task head and the optimizer are the configured ones.

Init: LoRA's (A kaiming, B = 0), so the model equals the base at step 0. Trainable parameters per layer:
r · (d_in + d_out). Per layer it keeps the previous step's gradient row norms (d_out numbers, a buffer saved with the
adapter so that a resumed run perturbs as the uninterrupted one).

Computation: the perturbed forward needs a dense E, so it runs on the merged weight W0 + s·BA + E (one GEMM, as
LoRA's merged path) in a custom autograd function that keeps the noise's seed rather than E and draws E again in the
backward: no d_out × d_in tensor is kept between forward and backward. ‖W'_i‖ is taken from that merged weight;
‖∇W'_i‖² from r-sized products, `on_before_optimizer_step` (once per optimizer step, after gradient accumulation).

Choices: the official repository (llm172/LoRA-GGPO) now holds LoRA-MGPO only and the v1 paper body was not
reachable; the rule above is the reference implementation's (kohya-ss sd-scripts `networks/lora_flux.py`, defaults
σ = 0.03, β = 0.01, noise scaled by 1/√d_out). That implementation estimates ‖W0_i‖ by one mean norm of up to 1000
sampled rows, combines it with ‖ΔW_i‖ as √(‖W0‖² + ‖ΔW_i‖²) (and, through a non-in-place `mul`, drops s from ΔW),
refreshes the weight norms once per step and takes gradient norms after clipping; here ‖W0_i + s·B_iA‖ is exact
and current, and gradient norms are taken before Lightning's clipping (which runs after `on_before_optimizer_step`).
With `dropout` > 0 the perturbed forward runs LoRA's two branches plus x Eᵀ (E then kept by autograd).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorafactory.errors import check
from lorafactory.variants.base import VARIANTS, AutocastFunction, VariantConfig, adapter_layers
from lorafactory.variants.lora import LoRA, LoRALinear


def noise(seed: int, shape: tuple[int, int], like: Tensor) -> Tensor:
    """ξ ~ N(0, 1) of `shape`, the same for the same seed (forward and backward draw it alike)."""
    generator = torch.Generator(device=like.device).manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=like.dtype, device=like.device)


class PerturbedLoRAFunction(AutocastFunction):
    """y = x (W + s·BA + E)ᵀ + b, E = (c / √d_out) ⊙ ξ(seed), c = σ‖W + s·BA‖_row + β·g²; gradients for x, A, B."""

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        A: Tensor,
        B: Tensor,
        scaling: float,
        grad_norm: Tensor,
        sigma: float,
        beta: float,
        seed: int,
    ) -> Tensor:
        merged = torch.addmm(weight, B, A, alpha=scaling)
        scale = (sigma * merged.norm(dim=1) + beta * grad_norm.square()).div_(math.sqrt(merged.shape[0]))
        merged.addcmul_(scale.unsqueeze(1), noise(seed, merged.shape, merged))
        ctx.save_for_backward(x, weight, A, B, scale)
        ctx.scaling, ctx.seed = scaling, seed
        return F.linear(x, merged, bias)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, A, B, scale = ctx.saved_tensors
        s = ctx.scaling
        g = grad.reshape(-1, grad.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        grad_x = grad_A = grad_B = None
        if ctx.needs_input_grad[0]:
            perturbed = torch.addmm(weight, B, A, alpha=s)
            perturbed.addcmul_(scale.unsqueeze(1), noise(ctx.seed, perturbed.shape, perturbed))
            grad_x = (g @ perturbed).view(x.shape)
        if ctx.needs_input_grad[3]:
            grad_A = torch.mm((g @ B).t(), x2).mul_(s)
        if ctx.needs_input_grad[4]:
            grad_B = torch.mm((x2 @ A.t()).t(), g).t().mul_(s)
        return grad_x, None, None, grad_A, grad_B, None, None, None, None, None


class GGPOLinear(LoRALinear):
    """LoRA whose training forward perturbs the merged weight (see the module docstring)."""

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float, sigma: float, beta: float):
        super().__init__(base, r, scaling, dropout)
        self.sigma, self.beta = sigma, beta
        factory = {"dtype": base.weight.dtype, "device": base.weight.device}
        # ‖∇W'_i‖ of the last optimizer step, and whether there was one: saved, so a resumed run perturbs alike
        self.register_buffer("grad_norm", torch.zeros(self.out_features, **factory))
        self.register_buffer("has_grad_norm", torch.zeros((), dtype=torch.bool, device=factory["device"]))
        self._has_grad_norm = False  # the buffer's value on the host: no device sync in every forward

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        self._has_grad_norm = bool(self.has_grad_norm)

    def perturbing(self) -> bool:
        return self.training and self._has_grad_norm and (self.sigma > 0 or self.beta > 0)

    def perturbation(self) -> Tensor:
        """E for the current weights, drawn from the global random stream (the k×k convolution's path)."""
        merged = self.weight + self.delta_weight().to(self.weight.dtype)
        scale = (self.sigma * merged.norm(dim=1) + self.beta * self.grad_norm.square()) / math.sqrt(merged.shape[0])
        return scale.unsqueeze(1) * torch.randn_like(merged)

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "conv" and self.perturbing():
            weight = self.weight + self.delta_weight().to(self.weight.dtype) + self.perturbation().detach()
            return torch.func.functional_call(self.base, {"weight": weight.view(self.base.weight.shape)}, (x,))
        return super().forward(x)

    def adapter_forward(self, x: Tensor) -> Tensor:
        if not self.perturbing():
            return super().adapter_forward(x)
        if self.dropout is not None:
            return self.add_lora(self.base_forward(x), x) + F.linear(x, self.perturbation().detach())
        seed = int(torch.randint(0, 2**62, (1,)))  # from the global stream: runs are reproducible from their seed
        return PerturbedLoRAFunction.apply(
            x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling,
            self.grad_norm, self.sigma, self.beta, seed,
        )  # fmt: skip

    @torch.no_grad()
    def update_grad_norm(self) -> None:
        """‖s (B ∇_A + ∇_B A)_i‖ per row from r-sized products:
        s² (b_i (∇_A∇_Aᵀ) b_iᵀ + 2 b_i (∇_A Aᵀ) ∇_B,iᵀ + ∇_B,i (AAᵀ) ∇_B,iᵀ)."""
        grad_A, grad_B = self.lora_A.grad, self.lora_B.grad
        if grad_A is None or grad_B is None:
            return
        dtype = torch.promote_types(self.grad_norm.dtype, torch.float32)
        A, B, gA, gB = (t.to(dtype) for t in (self.lora_A, self.lora_B, grad_A, grad_B))
        squared = (
            ((B @ (gA @ gA.t())) * B).sum(dim=1)
            + 2 * ((B @ (gA @ A.t())) * gB).sum(dim=1)
            + ((gB @ (A @ A.t())) * gB).sum(dim=1)
        )
        self.grad_norm.copy_(squared.clamp_min(0).sqrt().mul(self.scaling))
        self.has_grad_norm.fill_(True)
        self._has_grad_norm = True


@dataclass
class LoRAGGPOConfig(VariantConfig):
    # LoRA's rate: what was reachable of the paper gives none of its own, the reference implementation the run's.
    sigma: float = 0.03
    """σ: perturbation per unit of weight row norm (the reference implementation's default)."""
    beta: float = 0.01
    """β: perturbation per unit of squared gradient row norm (the reference implementation's default)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.sigma >= 0, f"variant.sigma must be >= 0, got {self.sigma}")
        check(self.beta >= 0, f"variant.beta must be >= 0, got {self.beta}")


@VARIANTS.register("lora_ggpo", config=LoRAGGPOConfig)
class LoRAGGPO(LoRA):
    name = "lora_ggpo"
    paper = (
        "LoRA-GGPO: Mitigating Double Descent in LoRA Fine-Tuning via Gradient-Guided Perturbation Optimization "
        "(Chang et al., arXiv 2502.14538)"
    )
    taxonomy = "optimization"
    tags = ("perturbation",)
    peft = None
    noisy_training = True

    def make_layer(self, base: nn.Module) -> GGPOLinear:
        return GGPOLinear(base, self.cfg.r, self.scaling, self.cfg.dropout, self.cfg.sigma, self.cfg.beta)

    def on_before_optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        for layer in adapter_layers(model):
            if isinstance(layer, GGPOLinear):
                layer.update_grad_norm()
