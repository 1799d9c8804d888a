"""AltLoRA — "AltLoRA: Towards Better Gradient Approximation in Low-Rank Adaptation with Alternating Projections"
(Yu, Wang, Chen, Xue, NeurIPS 2025, arXiv 2505.12455).

Update rule: LoRA's forward, `y = W0 x + b + s · B A x` (s = alpha / r), trained by alternating projected steps: each
optimizer step updates one factor only (B first, as B = 0 at init), with the other held fixed. From ∇_B = s G Aᵀ and
∇_A = s Bᵀ G (G = ∂L/∂W), the least-squares fits of G by the moving factor are

    B-step:  D_B = (1/s²) ∇_B (AAᵀ + εI)⁻¹      so  s · D_B · A = G P_A
    A-step:  D_A = (1/s²) (BᵀB + εI)⁻¹ ∇_A      so  s · B · D_A = P_B G

Momentum lives in rank space (M_B: d_out × r, M_A: r × d_in) and is re-expressed in the new basis whenever the other
factor has moved, so that the weight-space momentum it stands for is kept: after an A-step A_old → A,
M_B ← M_B A_old Aᵀ(AAᵀ + εI)⁻¹ (so M_B A ≈ M_B,old A_old); after a B-step M_A ← (BᵀB + εI)⁻¹ Bᵀ B_old M_A. Then
M ← β1 M + (1 − β1) D and θ ← θ(1 − lr·wd) − lr · M / (1 − β1^k), k the factor's own step count. The task head
trains with plain AdamW. This is the paper's first-moment AltLoRA (Algorithm 1), whose update is invariant to
B → BK, A → K⁻¹A (tested); AltLoRA+ adds a second moment and loses that invariance.

Init: LoRA's (A kaiming, B = 0), so the model equals the base at step 0. Trainable parameters per layer:
r · (d_in + d_out); optimizer state per layer: M_A and M_B, r · (d_in + d_out) (SGD-with-momentum's, half of Adam's).

Computation: per layer and step, one r × r Gram matrix and solve, a re-alignment of the other factor's momentum
(r × r products), and the update: no dense d_out × d_in tensor. The momentum is re-aligned right after the factor
moves, so no copy of the previous factor is kept between steps.

Choices (official code: `optimizer_new.py`, class `altlora`, with the trainer `logtrainer.py`):
- The official optimizer updates both factors in the same step from one gradient (A first, then B preconditioned by
  the new A) and alternates which factor trains, every 10 steps, only behind a trainer flag (`lora_alt`, off by
  default). Here one factor moves per step, each with a fresh gradient taken at the current pair, which is the
  alternating projection the paper's title and analysis describe; `switch_every` sets how many consecutive steps each
  factor gets (1 by default). The paper's algorithm text was not reachable: this follows its title and abstract.
- The official code omits the 1/s² of the least-squares solution (its step is s² times ours at the same learning
  rate) and keeps the previous factor to re-align momentum lazily; here the update is the exact projection (so the
  weight-space step does not depend on alpha) and `lr_mult` = 4 = s² at the default alpha / r = 16 / 8 carries the
  official learning rate over (its scripts train AltLoRA at their AdamW LoRA baseline's rate, 5e-5 on Llama-3-8B).
- ε = 1e-5 (the official `reg`); the official weight decay is applied after the step, here before (torch's AdamW).
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


def ridge_inverse(gram: Tensor, ridge: float) -> Tensor:
    """(M + εI)⁻¹ for a symmetric positive semi-definite r × r matrix, in float64."""
    eye = torch.eye(gram.shape[0], dtype=torch.float64, device=gram.device)
    return torch.linalg.inv(gram.double() + ridge * eye)


class AltLoRAOptimizer(PairAdamW):
    """AltLoRA for the groups `{"params": [A, B], "lora_scaling": s}` (rank-space momenta stored with each factor),
    torch's AdamW for every other group; all read `group["lr"]` at each step."""

    def __init__(self, params: list[dict[str, Any]], ridge: float = 1e-5, switch_every: int = 1, **adamw: Any):
        super().__init__(params, **adamw)
        self.ridge = ridge
        self.switch_every = switch_every

    def moving_factor(self, B: Tensor) -> str:
        """ "B" or "A": which factor the pair's next step updates, from its step count (B first)."""
        steps = int(self.state[B].get("pair_step", 0))
        return "B" if (steps // self.switch_every) % 2 == 0 else "A"

    def pair_step(self, group: dict[str, Any]) -> None:
        A, B = group["params"]
        dtype = torch.promote_types(A.dtype, torch.float32)
        if not self.state[B]:  # every entry exists from the start: AdamW's load_state_dict expects a "step" in each
            for p in (A, B):
                self.state[p].update(step=0, momentum=torch.zeros(p.shape, dtype=dtype, device=p.device))
            self.state[B]["pair_step"] = 0
        moving = self.moving_factor(B)
        param, other = (B, A) if moving == "B" else (A, B)
        self.state[B]["pair_step"] = int(self.state[B]["pair_step"]) + 1
        if param.grad is None:
            return
        s, ridge = group["lora_scaling"], self.ridge
        fixed, grad = other.detach().to(dtype), param.grad.to(dtype)
        if moving == "B":  # D_B = (1/s²) ∇_B (AAᵀ + εI)⁻¹
            direction = grad @ ridge_inverse(fixed @ fixed.t(), ridge).to(dtype)
        else:  # D_A = (1/s²) (BᵀB + εI)⁻¹ ∇_A
            direction = ridge_inverse(fixed.t() @ fixed, ridge).to(dtype) @ grad
        direction.div_(s**2)

        state = self.state[param]
        # AdamW's load_state_dict turns "step" into a float32 tensor: keep counting in Python integers
        state["step"] = count = int(state["step"]) + 1
        beta1 = group["betas"][0]
        momentum = state["momentum"].mul_(beta1).add_(direction.to(state["momentum"].dtype), alpha=1 - beta1)
        old = param.detach().to(dtype, copy=True)
        lr = group["lr"]
        param.mul_(1 - lr * group["weight_decay"]).sub_(momentum.to(param.dtype), alpha=lr / (1 - beta1**count))
        self.realign(other, old, param.detach().to(dtype), moving)

    def realign(self, other: Tensor, old: Tensor, new: Tensor, moved: str) -> None:
        """Re-express the other factor's momentum in the basis of the factor that just moved from `old` to `new`."""
        momentum = self.state[other]["momentum"]
        if moved == "A":  # M_B ← M_B A_old Aᵀ (AAᵀ + εI)⁻¹
            change = (old @ new.t()).double() @ ridge_inverse(new @ new.t(), self.ridge)
            momentum.copy_(momentum @ change.to(momentum.dtype))
        else:  # M_A ← (BᵀB + εI)⁻¹ Bᵀ B_old M_A
            change = ridge_inverse(new.t() @ new, self.ridge) @ (new.t() @ old).double()
            momentum.copy_(change.to(momentum.dtype) @ momentum)


@dataclass
class AltLoRAConfig(VariantConfig):
    lr_mult: float = 4.0
    """See the module docstring: the official learning rate with the exact (1/s²) projection at alpha / r = 2."""
    switch_every: int = 1
    """Consecutive optimizer steps given to one factor before switching to the other (B first)."""
    ridge: float = 1e-5
    """ε added to AAᵀ and BᵀB before inverting them (the official `reg`)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.switch_every >= 1, f"variant.switch_every must be >= 1, got {self.switch_every}")
        check(self.ridge > 0, f"variant.ridge must be > 0, got {self.ridge}")


@VARIANTS.register("altlora", config=AltLoRAConfig)
class AltLoRA(LoRA):
    name = "altlora"
    paper = (
        "AltLoRA: Towards Better Gradient Approximation in Low-Rank Adaptation with Alternating Projections "
        "(Yu et al., NeurIPS 2025, arXiv 2505.12455)"
    )
    taxonomy = "optimization"
    tags = ("alternating", "gradient-alignment")
    peft = None

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        return pair_groups(model, lr, self.scaling)

    def build_optimizer(self, param_groups: list[dict[str, Any]], cfg: Any) -> AltLoRAOptimizer:
        return AltLoRAOptimizer(
            param_groups, ridge=self.cfg.ridge, switch_every=self.cfg.switch_every, **adamw_settings(cfg)
        )
