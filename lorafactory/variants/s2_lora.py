"""S2-LoRA — "Sparsely Shared LoRA on Whisper for Child Speech Recognition" (Liu, Qin, Peng, Lee; ICASSP 2024,
arXiv 2309.11756).

Update rule: the two low-rank matrices are shared by every adapted weight of the same shape; each weight keeps only
its own rank coefficient vector λ_l ∈ R^r (AdaLoRA's learnable Λ, here without AdaLoRA's budget schedule), trained to
be sparse:

    y = W0 x + b + s · B diag(λ_l) A x,    s = alpha / r

with an L1 penalty l1 · Σ_l ‖λ_l‖₁ applied as its proximal step after every optimizer step,
λ ← sign(λ) · max(|λ| − lr·l1, 0) (soft thresholding at the current learning rate times `l1`), so coefficients that
the task does not keep pushing away from zero become exactly zero and the layer's rank drops.
Trainable parameters: r · (d_in + d_out) once per weight shape, plus r per layer.

Init: as AdaLoRA (the method it builds on): A, B ~ N(0, 0.02²), λ = 0, so the model equals the base at step 0 and
λ gets the first gradient, s·diag(Bᵀ G Aᵀ).

Computation: S2-LoRA is LoRA with computed factors A' = diag(λ) A and B' = B (vera.py's `FactoredLinear`), A and B held
once in the model's `lf_shared` (tied-LoRA's shape groups); no dense update on the training path.

Choices (only the abstract was reachable; the paper's method section and code were not): the sharing granularity is one
pair per weight shape (Whisper's attention and FFN projections have different shapes, so they cannot share one pair);
the sparsity is the L1 penalty in its decoupled proximal form (as AdamW decouples weight decay), which yields exact
zeros, so each layer's learned rank can be read off (the abstract compares these rank distributions with AdaLoRA's),
where an L1 term in the loss would leave Adam oscillating around zero; `l1` = 0.1 lets a coefficient survive while its
Adam steps push it away from zero by more than a tenth of the learning rate on average. We found no learning rate
relative to LoRA's in what we could read: lr_mult 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lorafactory.errors import check
from lorafactory.variants.base import VARIANTS, SharedRef, VariantConfig, named_adapter_layers
from lorafactory.variants.tied_lora import TiedPairVariant, tied_pair
from lorafactory.variants.vera import FactoredLinear

INIT_STD = 0.02
"""AdaLoRA's init of its P and Q."""


class S2LoRALinear(FactoredLinear):
    """The shape group's shared A and B with the layer's own rank coefficients `coef` (λ, r)."""

    def __init__(self, base: nn.Module, shared: SharedRef, r: int, scaling: float, dropout: float = 0.0):
        super().__init__(base, shared, scaling, dropout)
        self.coef = nn.Parameter(torch.zeros(r, dtype=base.weight.dtype, device=base.weight.device))

    def factor_inputs(self) -> tuple[Tensor, ...]:
        return (*tied_pair(self), self.coef)

    def factors(self, A: Tensor, B: Tensor, coef: Tensor) -> tuple[Tensor, Tensor]:
        return coef.unsqueeze(1) * A, B

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.coef.numel()}, scaling={self.scaling:g}"


def s2_layers(model: nn.Module) -> list[tuple[str, S2LoRALinear]]:
    return [(n, m) for n, m in named_adapter_layers(model) if isinstance(m, S2LoRALinear)]


@dataclass
class S2LoRAConfig(VariantConfig):
    l1: float = 0.1
    """Weight of the L1 penalty on the rank coefficients, relative to the learning rate: each step soft-thresholds
    them at lr·l1 (0 switches sparsity off)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.l1 >= 0, f"variant.l1 must be >= 0, got {self.l1}")


@VARIANTS.register("s2_lora", config=S2LoRAConfig)
class S2LoRA(TiedPairVariant):
    name = "s2_lora"
    paper = "Sparsely Shared LoRA on Whisper for Child Speech Recognition (Liu et al., ICASSP 2024, arXiv 2309.11756)"
    taxonomy = "rank"
    tags = ("sharing", "sparsity")
    params_formula = "r per layer, plus r·(d_in + d_out) once per weight shape"

    def __init__(self, cfg: S2LoRAConfig):
        super().__init__(cfg)
        self.lr: float | None = None  # the coefficients' learning rate at the coming step, for the threshold

    def init_pair(self, d_out: int, d_in: int, factory: dict) -> tuple[Tensor, Tensor]:
        A = torch.empty(self.cfg.r, d_in, **factory).normal_(0.0, INIT_STD)
        return A, torch.empty(d_out, self.cfg.r, **factory).normal_(0.0, INIT_STD)

    def make_layer(self, base: nn.Module) -> S2LoRALinear:
        return S2LoRALinear(base, self.shared, self.cfg.r, self.cfg.alpha / self.cfg.r, self.cfg.dropout)

    def layer_params(self, d_in: int, d_out: int) -> int:
        return self.cfg.r

    def on_before_optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        coefs = {id(layer.coef) for _, layer in s2_layers(model)}
        self.lr = next((g["lr"] for g in optimizer.param_groups if any(id(p) in coefs for p in g["params"])), None)

    def on_train_batch_end(self, model: nn.Module, step: int) -> bool | None:
        if self.lr is None or self.cfg.l1 == 0:
            return None
        threshold = self.lr * self.cfg.l1
        with torch.no_grad():
            for _, layer in s2_layers(model):
                layer.coef.copy_(layer.coef.sign() * (layer.coef.abs() - threshold).clamp_min(0))
        return None

    def summary(self, model: nn.Module) -> dict[str, Any]:
        return {"ranks": {name: int(torch.count_nonzero(layer.coef)) for name, layer in s2_layers(model)}}
