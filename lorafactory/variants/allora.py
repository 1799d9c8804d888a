"""ALLoRA — "ALLoRA: Adaptive Learning Rate Mitigates LoRA Fatal Flaws" (Huang, Balestriero, arXiv 2410.09692).

Update rule: a dropout-free, scaling-free LoRA, `y = W0 x + b + B A x`, trained with a per-row learning rate
inversely proportional to the row's ℓ2 norm: every row θ_i of A (r × d_in) and of B (d_out × r) steps with

    lr_i = lr · c_i,    c_i = 1 / √(‖θ_i‖² + 1/η²)

taken at the parameters before the step: ≈ lr / ‖θ_i‖ for large rows, bounded by η · lr at zero (B's rows at init
get η times the base rate, which is how ALLoRA gets B away from 0 quickly). The optimizer is AdamW with that per-row
rate (on the Adam step and the decoupled weight decay alike); the task head trains with plain AdamW.

Init: LoRA's (A kaiming, B = 0), so the model equals the base at step 0. Trainable parameters per layer:
r · (d_in + d_out). `variant.alpha` is not used (there is no scale) and `variant.dropout` must be 0.

Computation: the per-row rate is applied to AdamW's own step: the optimizer keeps the adapter factors' values before
torch's AdamW step and rescales each row's change by c_i afterwards (r · (d_in + d_out) numbers per layer), so the
state and the update are exactly torch's AdamW with a per-row learning rate.

Choices: only the abstract was reachable, not the paper's method section nor any official code. The abstract fixes
no dropout, no α/r scale, and "scaling the per sample and per parameter gradients with a coefficient inversely
proportional to parameters' ℓ2 norm". The exact coefficient (the η regularisation at zero norm), the granularity
(rows of the PyTorch weight here) and the η default are the reconstruction recorded in VARIANTS.md §12, consistent
with a third-party optimizer that cites the paper (`1/√(‖row‖ + 1/η²)` there, unsquared, computed once at init,
η = 2); UNCONFIRMED. Scaling the gradient instead of the step would be undone by Adam's normalisation, hence a rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lorafactory.errors import check
from lorafactory.variants.base import VARIANTS, Variant, VariantConfig
from lorafactory.variants.lora import LoRALinear
from lorafactory.variants.lora_fa import PairAdamW, adamw_settings, pair_groups


def row_rate(param: Tensor, eta: float) -> Tensor:
    """c_i = 1 / √(‖θ_i‖² + 1/η²) per row, as a column to broadcast over the row."""
    return param.detach().float().square().sum(dim=1, keepdim=True).add_(1 / eta**2).rsqrt_()


class ALLoRAAdamW(PairAdamW):
    """AdamW whose step, for the adapter groups `{"params": [A, B], ...}`, moves each row by c_i times AdamW's step."""

    def __init__(self, params: list[dict[str, Any]], eta: float = 2.0, **adamw: Any):
        super().__init__(params, **adamw)
        self.eta = eta

    def adapter_step(self) -> None:
        factors = [p for g in self.param_groups if "lora_scaling" in g for p in g["params"] if p.grad is not None]
        before = [(p.detach().clone(), row_rate(p, self.eta)) for p in factors]
        torch.optim.AdamW.step(self)  # every group, then the factors' rows scaled back by c_i
        for p, (old, rate) in zip(factors, before, strict=True):
            p.copy_(torch.addcmul(old, p - old, rate.to(p.dtype)))


@dataclass
class ALLoRAConfig(VariantConfig):
    # No learning rate relative to LoRA's is given in what was reachable of the paper: LoRA's.
    eta: float = 2.0
    """η: the largest per-row rate multiplier (reached at zero row norm)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.eta > 0, f"variant.eta must be > 0, got {self.eta}")
        check(self.dropout == 0, f"variant.dropout must be 0 (ALLoRA is dropout-free), got {self.dropout}")


@VARIANTS.register("allora", config=ALLoRAConfig)
class ALLoRA(Variant):
    name = "allora"
    paper = "ALLoRA: Adaptive Learning Rate Mitigates LoRA Fatal Flaws (Huang & Balestriero, arXiv 2410.09692)"
    taxonomy = "optimization"
    tags = ("learning-rate",)
    params_formula = "r·(d_in + d_out)"

    def make_layer(self, base: nn.Module) -> LoRALinear:
        return LoRALinear(base, self.cfg.r, scaling=1.0)

    def layer_params(self, d_in: int, d_out: int) -> int:
        return self.cfg.r * (d_in + d_out)

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        return pair_groups(model, lr, scaling=1.0)

    def build_optimizer(self, param_groups: list[dict[str, Any]], cfg: Any) -> ALLoRAAdamW:
        return ALLoRAAdamW(param_groups, eta=self.cfg.eta, **adamw_settings(cfg))
