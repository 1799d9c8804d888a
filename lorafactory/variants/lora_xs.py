"""LoRA-XS — "LoRA-XS: Low-Rank Adaptation with Extremely Small Number of Parameters" (Bałazy, Banaei, Aberer,
Tabor; arXiv 2405.17604).

Update rule: a trainable r × r core R between two frozen factors taken from the truncated SVD of W0 ≈ U_r Σ_r V_rᵀ:

    y = W0 x + b + s · B R A x,    B = U_r ∈ R^{d_out×r},  A = Σ_r V_rᵀ ∈ R^{r×d_in},  s = alpha / r

so ΔW stays in the top-r singular subspaces of W0 (column space in span(U_r), row space in span(V_r)) and only r²
numbers train, whatever the width of the layer.

Init: A and B from the SVD, frozen; R ~ N(0, init_std²) with init_std = 1e-5 (the official `init_module_weights`).
W0 is not residualized, so the model is the base model only up to ΔW = s·B R A of order init_std · σ_1 at step 0
(`zero_init` is False; init_std = 0 starts exactly at the base and R still gets a gradient, s·Bᵀ G Aᵀ).
Trainable parameters per layer: r².

Computation: the layer is LoRA with computed factors A' = R A and B' = B (see vera.py's `FactoredLinear`): one GEMM
with the merged weight when a batch has many tokens, two rank-r branches otherwise, and R's gradient from rank-r
products (∂A' = s·(g B)ᵀ x, then ∂R = ∂A' Aᵀ); no dense d_out × d_in update on the training path.

Choices: the official code runs scikit-learn's randomized TruncatedSVD (10 iterations, seed 42) on W0ᵀ; here the exact
SVD of W0 in fp32 (what the randomized one approximates), or with `niter > 0` torch's randomized SVD with that many
subspace iterations and an oversampled sketch (for large models). The frozen factors are persistent buffers, saved
with the adapter (as the official PEFT checkpoints save them): singular vectors are defined up to sign, and a state
must not depend on the linear algebra library of the machine that loads it. Defaults: alpha = 16 (the official GLUE
script; commonsense runs use alpha = 2r, the same s = 2 at r = 8). The official scripts train at about ten times
LoRA's learning rate (2e-3 on commonsense, 4e-3 on math, against LoRA's 2e-4 in the same setups), hence `lr_mult`.
Kind: "sharing" in the study's rank taxonomy, like VeRA: it does not raise the rank of the update (at most r) but
cuts the trainable parameters by fixing the projections and training a small core between them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lorafactory.errors import ConfigError, check
from lorafactory.variants.base import VARIANTS, Variant, VariantConfig
from lorafactory.variants.vera import FactoredLinear

OVERSAMPLE = 8
"""Extra columns of the randomized SVD's sketch (Halko et al., 2011), so the top r triplets come out near exact."""


def top_singular(W: Tensor, r: int, niter: int) -> tuple[Tensor, Tensor, Tensor]:
    """(U_r, S_r, V_rᵀ) of W: exact SVD, or randomized with `niter` subspace iterations."""
    if niter == 0:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        return U[:, :r], S[:r], Vh[:r]
    U, S, V = torch.svd_lowrank(W, q=min(r + OVERSAMPLE, *W.shape), niter=niter)
    return U[:, :r], S[:r], V[:, :r].t()


class LoRAXSLinear(FactoredLinear):
    """`base(x) + scaling · B R A x` with frozen buffers `lora_A` (Σ_r V_rᵀ), `lora_B` (U_r) and the trainable core
    `lora_R` (r × r)."""

    def __init__(self, base: nn.Module, r: int, scaling: float, init_std: float, niter: int, dropout: float = 0.0):
        super().__init__(base, None, scaling, dropout)
        if r > min(self.in_features, self.out_features):
            raise ConfigError(
                f"variant.r={r} exceeds the rank of a {self.out_features}×{self.in_features} weight; LoRA-XS needs "
                f"r <= {min(self.in_features, self.out_features)}"
            )
        weight = self.weight
        with torch.no_grad():  # decompose in fp32 at least
            U, S, Vh = top_singular(weight.to(torch.promote_types(weight.dtype, torch.float32)), r, niter)
        self.register_buffer("lora_A", (S.unsqueeze(1) * Vh).to(weight.dtype))
        self.register_buffer("lora_B", U.to(weight.dtype).contiguous())
        self.lora_R = nn.Parameter(torch.randn(r, r, dtype=weight.dtype, device=weight.device) * init_std)

    def factor_inputs(self) -> tuple[Tensor, ...]:
        return (self.lora_R,)

    def factors(self, R: Tensor) -> tuple[Tensor, Tensor]:
        return R @ self.lora_A, self.lora_B

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.lora_R.shape[0]}, scaling={self.scaling:g}"


@dataclass
class LoRAXSConfig(VariantConfig):
    lr_mult: float = 10.0  # official scripts: 2e-3 (commonsense), 4e-3 (math) where LoRA runs at 2e-4
    init_std: float = 1e-5
    """Standard deviation of the Gaussian init of R (the official 1e-5; 0 starts exactly at the base model)."""
    niter: int = 0
    """0: exact SVD of W0; k > 0: randomized SVD with k subspace iterations (the official code uses 10)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.init_std >= 0, f"variant.init_std must be >= 0, got {self.init_std}")
        check(self.niter >= 0, f"variant.niter must be >= 0, got {self.niter}")


@VARIANTS.register("lora_xs", config=LoRAXSConfig)
class LoRAXS(Variant):
    name = "lora_xs"
    paper = "LoRA-XS: Low-Rank Adaptation with Extremely Small Number of Parameters (Bałazy et al., arXiv 2405.17604)"
    taxonomy = "rank"
    tags = ("sharing", "svd")
    zero_init = False
    params_formula = "r²"
    memory_note = "frozen SVD factors r·(d_in + d_out) per layer, saved with the adapter"

    def make_layer(self, base: nn.Module) -> LoRAXSLinear:
        cfg = self.cfg
        return LoRAXSLinear(base, cfg.r, cfg.alpha / cfg.r, cfg.init_std, cfg.niter, cfg.dropout)

    def layer_params(self, d_in: int, d_out: int) -> int:
        return self.cfg.r**2
