"""LoRA-FA — "LoRA-FA: Memory-efficient Low-rank Adaptation for Large Language Models Fine-tuning"
(Zhang, Zhang, Shi, Chu, Li, arXiv 2308.03303).

Update rule: LoRA's forward, `y = W0 x + b + s · B A x` (s = alpha / r), with A frozen at its random init and only B
trained, on the projected gradient (the updated paper, as PEFT's `create_lorafa_optimizer`):

    g_B = (1/s²) · ∇_B (A Aᵀ + δI)⁻¹,     so that   s · g_B · A = G Aᵀ(AAᵀ)⁻¹A = G · P_A

with G = ∂L/∂W: the weight moves along the projection of the full fine-tuning gradient onto A's row space, the best
approximation of G that an update of B alone can make. AdamW then runs on g_B with the configured betas, eps, weight
decay and (scheduled) learning rate; the task head trains with plain AdamW.

Init: A kaiming-uniform (frozen), B = 0, so the model equals the base at step 0.
Trainable parameters per layer: r · d_out.

Computation: A never needs a gradient, so the layer keeps `x Aᵀ` (r numbers per token) for B's gradient instead of
the input x, which is the activation-memory saving of the paper. With many tokens and no dropout the layer multiplies
by the merged weight W0 + s·B A (one GEMM) in a custom autograd function that saves `x Aᵀ`; otherwise it runs LoRA's
two branches, where autograd keeps only `x Aᵀ` for B as well, A being frozen.

Choices: PEFT's optimizer is Hugging Face's AdamW (eps added before the bias correction, weight decay applied after the
update) and computes the projection under bf16 autocast whenever bf16 is available, on CPU too; here the optimizer is
torch's AdamW (the project's default) and the projection runs in fp32 at least. The projection itself is PEFT's
(`pinv` there, a linear solve here: the same for full-rank A); the parity test pins it with PEFT's autocast off and
eps → 0, where the two optimizers coincide.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorafactory.errors import check
from lorafactory.variants.base import VARIANTS, AutocastFunction, VariantConfig, adapter_layers
from lorafactory.variants.lora import LoRA, LoRALinear, merge_pays


class FrozenAMergedFunction(AutocastFunction):
    """y = x (W + s·B A)ᵀ + b in one GEMM with A frozen: saves `x Aᵀ` rather than x; gradients for x and B."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scaling: float) -> Tensor:
        h = F.linear(x, A)
        ctx.save_for_backward(h, weight, A, B)
        ctx.scaling = scaling
        return F.linear(x, torch.addmm(weight, B, A, alpha=scaling), bias)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        h, weight, A, B = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_B = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ torch.addmm(weight, B, A, alpha=ctx.scaling)).view(*grad.shape[:-1], A.shape[1])
        if ctx.needs_input_grad[4]:
            grad_B = torch.mm(h.reshape(-1, h.shape[-1]).t(), g).t().mul_(ctx.scaling)
        return grad_x, None, None, None, grad_B, None


class LoRAFALinear(LoRALinear):
    """LoRA with `lora_A` frozen (a parameter without gradient, saved with the adapter: it is random)."""

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float = 0.0):
        super().__init__(base, r, scaling, dropout)
        self.lora_A.requires_grad_(False)

    def adapter_forward(self, x: Tensor) -> Tensor:
        if self.dropout is None and merge_pays(self, x) and not self.lora_A.requires_grad:
            return FrozenAMergedFunction.apply(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling)
        return self.add_lora(self.base_forward(x), x)


class PairAdamW(torch.optim.AdamW):
    """AdamW over the groups of `pair_groups`: each adapted layer's `{"params": [A, B], "lora_scaling": s}` takes the
    method's own step (`pair_step`), every other group AdamW's. The optimizer-level methods (LoRA-FA, LoRA-Pro,
    AltLoRA, ALLoRA) differ only in `pair_step` and in what runs around it (`adapter_step`)."""

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:  # Lightning computes the gradients in the closure
            with torch.enable_grad():
                loss = closure()
        self.adapter_step()
        return loss

    def adapter_step(self) -> None:
        """The pairs' own steps, then AdamW on the other groups (the pairs hidden from it)."""
        for group in self.param_groups:
            if "lora_scaling" in group:
                self.pair_step(group)
        groups, self.param_groups = self.param_groups, [g for g in self.param_groups if "lora_scaling" not in g]
        try:
            super().step()
        finally:
            self.param_groups = groups

    def pair_step(self, group: dict[str, Any]) -> None:
        raise NotImplementedError


class LoRAFAAdamW(PairAdamW):
    """AdamW whose step first replaces B's gradient by its projection (1/s²) ∇_B (AAᵀ + δI)⁻¹.

    Each adapted layer is one parameter group `{"params": [A, B], "lora_scaling": s}` (A frozen, so AdamW skips it):
    the pair travels with the group through `state_dict()`/`load_state_dict()`, and the state is AdamW's own."""

    def __init__(self, params: list[dict[str, Any]], delta: float = 1e-8, **adamw: Any):
        super().__init__(params, **adamw)
        self.delta = delta

    def adapter_step(self) -> None:
        for group in self.param_groups:
            if "lora_scaling" not in group:
                continue
            A, B = group["params"]
            if B.grad is not None:
                B.grad.copy_(project_b_grad(B.grad, A, group["lora_scaling"], self.delta))
        torch.optim.AdamW.step(self)  # the projected gradient then takes AdamW's own step, A frozen


def project_b_grad(grad_B: Tensor, A: Tensor, scaling: float, delta: float) -> Tensor:
    """(1/s²) ∇_B (A Aᵀ + δI)⁻¹, computed in fp32 at least."""
    dtype = torch.promote_types(A.dtype, torch.float32)
    A = A.to(dtype)
    gram = torch.addmm(torch.eye(A.shape[0], dtype=dtype, device=A.device), A, A.t(), beta=delta)
    # (∇_B M⁻¹)ᵀ = M⁻¹ ∇_Bᵀ for the symmetric M = AAᵀ + δI
    return torch.linalg.solve(gram, grad_B.to(dtype).t()).t().div_(scaling**2)


def adamw_settings(cfg: Any) -> dict[str, Any]:
    """The `optim` config's AdamW settings; an optimizer config without betas/eps (SGD) gets AdamW's defaults."""
    optimizer = cfg.optimizer
    return {
        "lr": float(cfg.lr),
        "betas": tuple(float(b) for b in optimizer.get("betas", (0.9, 0.999))),
        "eps": float(optimizer.get("eps", 1e-8)),
        "weight_decay": float(cfg.weight_decay),
    }


def pair_groups(model: nn.Module, lr: float, scaling: float) -> list[dict[str, Any]]:
    """One optimizer group per adapted layer (`[A, B]` and its scale), then one group of every other trainable."""
    layers = adapter_layers(model)
    paired = {id(p) for layer in layers for p in (layer.lora_A, layer.lora_B)}
    groups = [{"params": [layer.lora_A, layer.lora_B], "lr": lr, "lora_scaling": scaling} for layer in layers]
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in paired]
    if rest:
        groups.append({"params": rest, "lr": lr})
    return groups


@dataclass
class LoRAFAConfig(VariantConfig):
    # LoRA's rate: PEFT's `create_lorafa_optimizer` documents LoRA-FA as taking AdamW's LoRA hyper-parameters.
    delta: float = 1e-8
    """Ridge δ in (AAᵀ + δI)⁻¹ (PEFT's value)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.delta >= 0, f"variant.delta must be >= 0, got {self.delta}")


@VARIANTS.register("lora_fa", config=LoRAFAConfig)
class LoRAFA(LoRA):
    name = "lora_fa"
    paper = (
        "LoRA-FA: Memory-efficient Low-rank Adaptation for Large Language Models Fine-tuning "
        "(Zhang et al., arXiv 2308.03303)"
    )
    taxonomy = "optimization"
    tags = ("frozen-a",)
    params_formula = "r·d_out"
    peft = "create_lorafa_optimizer(...)"

    def make_layer(self, base: nn.Module) -> LoRAFALinear:
        return LoRAFALinear(base, self.cfg.r, self.scaling, self.cfg.dropout)

    def layer_params(self, d_in: int, d_out: int) -> int:
        return self.cfg.r * d_out

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        return pair_groups(model, lr, self.scaling)

    def build_optimizer(self, param_groups: list[dict[str, Any]], cfg: Any) -> LoRAFAAdamW:
        return LoRAFAAdamW(param_groups, delta=self.cfg.delta, **adamw_settings(cfg))
