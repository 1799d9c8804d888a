"""LoLDU — "LoLDU: Low-Rank Adaptation via Lower-Diag-Upper Decomposition for Parameter-Efficient Fine-Tuning"
(Shi, Wei, Wu, Ran, Sun, He, Yang, arXiv 2410.13618).

Update rule: the LU decomposition with partial pivoting of the frozen weight, written as `W0 = P L D U` (P a row
permutation, L unit lower-triangular d_out × k, D = diag(d) the pivots, U unit upper-triangular k × d_in,
k = min(d_in, d_out)), keeps its first r columns of L and rows of U frozen and trains a vector z in place of D_r:

    y = W_res x + b + s · P L_r diag(z) U_r x,     z ∈ R^r trainable,  s = alpha / r

Init: z = d_r (the first r pivots) and W_res = W0 − s · P L_r diag(d_r) U_r, so the model equals the base at step 0.
The base weight is rewritten (saved with the adapter); P L_r (d_out × r, the permutation folded into its rows) and U_r
are persistent buffers. Trainable parameters per layer: r.

Choices, from the official code (SKDDJ/LoLDU, `minloldu/loldu.py`): alpha defaults to 1 (`from_linear`'s
`lora_alpha=1`, so s = 1/r), z starts at the pivots (`init_method="lu"`), and only z trains (the code also builds a
scalar scale parameter, but its trainable-name filter exposes only z). A zero pivot (a rank-deficient column) would
divide by zero when U is normalised; its row of U is kept unnormalised instead, which changes nothing at init
(z = 0 there). The paper's learning rates were not in the material we could read. `lr_mult` = 40, measured: on SST-2
(MiniLM-L6, reports/zoo_init, 1 seed, bracketed on the selection split) LoLDU's best rate is 8e-2, 40× LoRA's 2e-3
(its 96 trained values per model, damped by s = 1/r, need large steps; at 10× it reached 0.58, at 40× 0.67).

Computation: LoRA with factors A = U_r (frozen) and B = P L_r diag(z) (see svfit.py's `FactoredLinear`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorafactory.variants.base import VARIANTS, Variant, VariantConfig
from lorafactory.variants.svfit import CoreLinear


class LoLDULinear(CoreLinear):
    saves_base = True

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float = 0.0):
        super().__init__(base, r, scaling, dropout, diagonal=True)
        W = self.weight.to(torch.promote_types(self.weight.dtype, torch.float32))
        P, L, U = torch.linalg.lu(W)
        pivots = U.diagonal()
        U = U / torch.where(pivots == 0, torch.ones_like(pivots), pivots).unsqueeze(1)
        rows = P.argmax(dim=1)  # (P L)[i] = L[rows[i]]: the permutation as an index, no d_out × d_out product
        self.set_factors(L[rows, :r], pivots[:r], U[:r], residualize=True)


@dataclass
class LoLDUConfig(VariantConfig):
    alpha: float = 1.0  # the official `from_linear` default (s = 1/r)
    lr_mult: float = 40.0  # measured: reports/zoo_init brackets LoLDU's best at 8e-2 (40 × LoRA's 2e-3)


@VARIANTS.register("loldu", config=LoLDUConfig)
class LoLDU(Variant):
    name = "loldu"
    paper = (
        "LoLDU: Low-Rank Adaptation via Lower-Diag-Upper Decomposition for Parameter-Efficient Fine-Tuning "
        "(Shi et al., 2024, arXiv 2410.13618)"
    )
    taxonomy = "initialization"
    tags = ("lu",)
    params_formula = "r"

    def make_layer(self, base: nn.Module) -> LoLDULinear:
        return LoLDULinear(base, self.cfg.r, self.cfg.alpha / self.cfg.r, self.cfg.dropout)

    def layer_params(self, d_in: int, d_out: int) -> int:
        return self.cfg.r
