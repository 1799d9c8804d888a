"""Comp-LoRA — "Complementary Subspace Low-Rank Adaptation of Vision-Language Models for Few-Shot Classification"
(Wang, Dai, Li, Li, Guo, Xiang, arXiv 2501.15040).

Update rule: LoRA restricted to the complement of W0's k most informative directions, on both sides. With the SVD
`W0 = U S Vᵀ` and its top-k singular vectors U_k (d_out × k) and V_k (d_in × k):

    y = W0 x + b + s · P_out B A P_in x,    P_out = I − U_k U_kᵀ,   P_in = I − V_k V_kᵀ,   s = alpha / r

so the update never reads the input along W0's top right-singular directions nor writes along its top left-singular
ones: U_kᵀ ΔW = 0, ΔW V_k = 0, and W0 + ΔW keeps W0's top-k singular triplets (W0 + ΔW maps V_k to U_k S_k). This is
the paper's mechanism against forgetting: the pretrained weight's principal directions stay as they were.
Init: LoRA's (A kaiming, B = 0), so the model equals the base at step 0. Trainable parameters per layer:
r · (d_in + d_out), as LoRA's.

Choices: the paper's method text was not reachable, only its abstract and its architecture figure's caption, which
describes a precomputed projection of the input into the complementary subspace and another of the output back, so the
projection is two-sided; we project with P_out and P_in in the full spaces, so A and B keep LoRA's shapes (the paper
claims no parameters beyond LoRA's). k, the number of protected directions, is not known from what we could read: `k`
defaults to 8 and is cut per layer to min(d_in, d_out) − r, so that the complement always has room for a rank-r update
(on tiny layers). U_k and V_k are persistent buffers (k · (d_in + d_out) numbers per layer, saved with the adapter):
recomputing them would give a different subspace wherever σ_k ≈ σ_{k+1} and the arithmetic differs. The paper's
learning rate was not reachable; as a constrained LoRA it keeps LoRA's (`lr_mult` = 1).

Computation: the projections are folded into the factors each step, A' = A − (A V_k) V_kᵀ and B' = B − U_k (U_kᵀ B)
(r·k·(d_in + d_out) work, no d × d projector), and the layer runs as LoRA with A', B' (see svfit.py's
`FactoredLinear`); autograd projects the factors' gradients back the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lorafactory.errors import check
from lorafactory.variants.base import VARIANTS, VariantConfig, kaiming_
from lorafactory.variants.lora import LoRA
from lorafactory.variants.svfit import FactoredLinear


class CompLoRALinear(FactoredLinear):
    """LoRA (`lora_A`, `lora_B`) whose update is projected off the top-k singular directions of the base weight,
    stored as `protect_out` (U_k) and `protect_in` (V_k)."""

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float, k: int):
        super().__init__(base, r, scaling, dropout)
        factory = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.lora_A = nn.Parameter(kaiming_(torch.empty(r, self.in_features, **factory)))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **factory))
        self.k = max(0, min(k, min(self.in_features, self.out_features) - r))
        with torch.no_grad():
            W = self.weight.to(torch.promote_types(self.weight.dtype, torch.float32))
            U, _, Vh = torch.linalg.svd(W, full_matrices=False)
        self.register_buffer("protect_out", U[:, : self.k].to(**factory).contiguous())
        self.register_buffer("protect_in", Vh[: self.k].t().to(**factory).contiguous())

    def factors(self) -> tuple[Tensor, Tensor]:
        A, B, U, V = self.lora_A, self.lora_B, self.protect_out, self.protect_in
        return A - (A @ V) @ V.t(), B - U @ (U.t() @ B)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.k}"


@dataclass
class CompLoRAConfig(VariantConfig):
    k: int = 8
    """Number of top singular directions of W0 kept out of the update (per layer at most min(d_in, d_out) − r)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.k >= 0, f"variant.k must be >= 0, got {self.k}")


@VARIANTS.register("comp_lora", config=CompLoRAConfig)
class CompLoRA(LoRA):
    name = "comp_lora"
    paper = (
        "Complementary Subspace Low-Rank Adaptation of Vision-Language Models for Few-Shot Classification "
        "(Wang et al., 2025, arXiv 2501.15040)"
    )
    taxonomy = "initialization"
    tags = ("svd",)
    peft = None

    def make_layer(self, base: nn.Module) -> CompLoRALinear:
        return CompLoRALinear(base, self.cfg.r, self.scaling, self.cfg.dropout, self.cfg.k)

    def peft_config(self, targets: list[str], head: list[str]) -> None:
        return None  # PEFT has no complementary-subspace LoRA
