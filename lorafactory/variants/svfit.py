"""SVFit — "SVFit: Parameter-Efficient Fine-Tuning of Large Pre-Trained Models Using Singular Values"
(Sun, Wei, Wu, Shi, He, Ma, Xie, Yang, arXiv 2409.05926).

Update rule: split the frozen weight by its SVD `W0 = U S Vᵀ` into the best rank-r part and the rest,
`W0 = U_r diag(S_r) V_rᵀ + W_e`, and train only the r singular values of the first part:

    y = W_e x + b + U_r diag(σ) V_rᵀ x,     σ ∈ R^r trainable;  U_r, V_r and W_e frozen

Init: σ = S_r (the top-r singular values), so the model equals the base at step 0. The base weight is rewritten to
the residual W_e (saved with the adapter); U_r and V_r are persistent buffers. Trainable parameters per layer: r.

Choices: the paper trains no scale, so `alpha` is unused (as VeRA's is). It picks r so that the top-r values carry most
(> 99 %) of the spectrum's energy; the budget it ran with per model was not in the material we could read, so the
default is the zoo's r = 8 (set `variant.r` up to min(d_in, d_out) to train more of the spectrum). The paper's learning
rates were not reachable either. `lr_mult` = 24, measured: on SST-2 (MiniLM-L6, reports/zoo_init, 1 seed) SVFit's score
rose with the rate up to the largest tried, 24× LoRA's (0.546 at 3×, 0.664 at 24×), so 24 is a lower bound of its
optimum; with r = 8 it trains 96 values per model, and stays far below LoRA at this budget.

Computation: SVFit is LoRA with factors A = V_rᵀ (frozen) and B = U_r diag(σ), so `FactoredLinear` below runs it as
LoRA runs (lora.py): the merged weight W_e + B A in one GEMM when a batch has many tokens, the two-branch form
otherwise; σ's gradient is carried from B's rank-r gradient by autograd (a d_out × r product). The layer classes here
are shared by the other frozen-basis variants (LoLDU, LoRA-SB) and by Comp-LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorafactory.errors import ConfigError
from lorafactory.variants.base import VARIANTS, AdapterLayer, Variant, VariantConfig
from lorafactory.variants.lora import MergedLoRAFunction, merge_pays


class FactoredLinear(AdapterLayer):
    """`base(x) + scaling · B A dropout(x)` for factors A (r × d_in) and B (d_out × r) that a subclass computes from
    its own tensors in `factors()`; forward, merge and ΔW follow from them."""

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float = 0.0):
        super().__init__(base)
        self.r = r
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def factors(self) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def adapter_forward(self, x: Tensor) -> Tensor:
        A, B = self.factors()
        if self.dropout is None and merge_pays(self, x):
            return MergedLoRAFunction.apply(x, self.weight, self.bias, A, B, self.scaling)
        out = self.base_forward(x)
        if self.dropout is not None:
            x = self.dropout(x)
        h = F.linear(x, A).reshape(-1, A.shape[0])
        return torch.addmm(out.reshape(-1, self.out_features), h, B.t(), alpha=self.scaling).view(out.shape)

    def delta_weight(self) -> Tensor:
        A, B = self.factors()
        return self.scaling * (B @ A)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, scaling={self.scaling:g}"


class CoreLinear(FactoredLinear):
    """ΔW = s · basis_out · core · basis_in with frozen bases (persistent buffers, saved with the adapter) and a
    trainable `core`: r values (a diagonal core) or an r × r matrix."""

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float = 0.0, diagonal: bool = True):
        super().__init__(base, r, scaling, dropout)
        if r > min(self.in_features, self.out_features):
            raise ConfigError(
                f"variant.r={r} exceeds the rank of a {self.out_features}×{self.in_features} weight; this variant "
                f"needs r <= {min(self.in_features, self.out_features)}"
            )
        factory = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.register_buffer("basis_out", torch.zeros(self.out_features, r, **factory))
        self.register_buffer("basis_in", torch.zeros(r, self.in_features, **factory))
        self.core = nn.Parameter(torch.zeros((r,) if diagonal else (r, r), **factory))

    def factors(self) -> tuple[Tensor, Tensor]:
        core = self.core
        B = self.basis_out * core if core.dim() == 1 else self.basis_out @ core
        return self.basis_in, B

    @torch.no_grad()
    def set_factors(self, basis_out: Tensor, core: Tensor, basis_in: Tensor, residualize: bool) -> None:
        """Store the factors (in the weight's dtype); with `residualize`, rewrite the base weight to W0 − ΔW (computed
        from the stored, rounded factors, so that W_res + ΔW reproduces W0 as closely as the dtype allows)."""
        self.basis_out.copy_(basis_out)
        self.core.copy_(core)
        self.basis_in.copy_(basis_in)
        if residualize:
            weight = self.weight
            dtype = torch.promote_types(weight.dtype, torch.float32)
            self.write_weight(weight.to(dtype) - self.delta_weight().to(dtype))


class SVFitLinear(CoreLinear):
    saves_base = True

    def __init__(self, base: nn.Module, r: int, dropout: float = 0.0):
        super().__init__(base, r, 1.0, dropout, diagonal=True)
        W = self.weight.to(torch.promote_types(self.weight.dtype, torch.float32))
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        self.set_factors(U[:, :r], S[:r], Vh[:r], residualize=True)


@dataclass
class SVFitConfig(VariantConfig):
    lr_mult: float = 24.0  # measured: reports/zoo_init's best at 4.8e-2, the largest tried; see the docstring


@VARIANTS.register("svfit", config=SVFitConfig)
class SVFit(Variant):
    name = "svfit"
    paper = (
        "SVFit: Parameter-Efficient Fine-Tuning of Large Pre-Trained Models Using Singular Values "
        "(Sun et al., 2024, arXiv 2409.05926)"
    )
    taxonomy = "initialization"
    tags = ("svd",)
    params_formula = "r"

    def make_layer(self, base: nn.Module) -> SVFitLinear:
        return SVFitLinear(base, self.cfg.r, self.cfg.dropout)

    def layer_params(self, d_in: int, d_out: int) -> int:
        return self.cfg.r
