"""RandLoRA — "RandLoRA: Full-rank parameter-efficient fine-tuning of large models" (Albert, Zhang, Saratchandran,
Rodriguez-Opazo, van den Hengel, Abbasnejad, ICLR 2025, arXiv 2502.00987).

Update rule: with m = min(d_in, d_out), M = max(d_in, d_out) and N = ⌈m / r⌉ rank-r terms (enough for full rank),

    ΔW = s · Σ_{i=1..N} B_i Λ_i A Γ_i   (an M × m matrix, transposed when d_out < d_in),   y = W0 x + b + ΔW x

B_i ∈ R^{M×r} and A ∈ R^{r×m} are frozen random matrices shared by every layer (the paper's and PEFT's form: one A
for all terms, N different B_i), allocated once per model at the largest M, m and N (`lf_shared.randlora_B` of shape
(M, N, r), `lf_shared.randlora_A` (r, m)) and sliced per layer. Λ_i = diag(λ_i), λ_i ∈ R^r, and Γ_i = diag(γ_i),
γ_i ∈ R^m, train: Γ sits on the smaller side, which keeps the count low. s = alpha / r.

Init: the bases are drawn from a CPU generator seeded with `basis_seed`, uniform with unit variance (PEFT and the
official code divide Kaiming draws by their empirical standard deviation: the same distribution up to sampling
noise); λ = 0 and γ = 1/m as in PEFT (the official vision-language code does the reverse, γ = 0 and λ ≠ 0: either
makes ΔW = 0 at step 0). The bases are persistent buffers, saved once with the adapter (PEFT's `save_projection`).
Trainable parameters per layer: N · (r + m); a smaller r means more parameters, not fewer.

Choices: r = 32 as in PEFT, and s = 20 at any rank unless `alpha` is given: PEFT's default alpha = 640 at r = 32, and
the official GLUE and commonsense runs' alpha = 2r times the official code's extra factor of 10. (A fixed alpha would
make s grow as r shrinks: s = 160 at r = 4 does not train on the tiny test models.) The official scripts train
RandLoRA at LoRA's own learning rate (1e-4 for both, on GLUE and commonsense reasoning), so `lr_mult` = 1.

Computation: the update is full rank, so the layer needs a dense d_out × d_in product, as full fine-tuning does: with
many tokens it multiplies by the merged weight W0 + ΔW and takes the trainable scalings' gradients from the dense
weight gradient G = gᵀx (∂A' = s·B'ᵀG), through the factored-layer functions of vera.py, which save only x, λ and γ
and rebuild the scaled bases in backward: no per-layer copy of the bases lives from forward to backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lorafactory.errors import UserError
from lorafactory.variants.base import VARIANTS, SharedRef, VariantConfig, named_adapter_layers, peft_layer_state
from lorafactory.variants.vera import FactoredLinear, SharedStateVariant, weight_dims


def num_bases(d_in: int, d_out: int, r: int) -> int:
    """N = ⌈min(d_in, d_out) / r⌉, the number of rank-r terms a full-rank update needs."""
    return math.ceil(min(d_in, d_out) / r)


class RandLoRALinear(FactoredLinear):
    """N rank-r terms of shared random bases, scaled by `randlora_lambda` (N × r) and `randlora_gamma` (N × m)."""

    def __init__(self, base: nn.Module, shared: SharedRef, r: int, scaling: float, dropout: float = 0.0):
        super().__init__(base, shared, scaling, dropout)
        self.r = r
        self.small, self.large = sorted((self.in_features, self.out_features))
        n = num_bases(self.in_features, self.out_features, r)
        factory = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.randlora_lambda = nn.Parameter(torch.zeros(n, r, **factory))
        self.randlora_gamma = nn.Parameter(torch.full((n, self.small), 1 / self.small, **factory))

    def factor_inputs(self) -> tuple[Tensor, ...]:
        return self.randlora_lambda, self.randlora_gamma

    def factors(self, lam: Tensor, gamma: Tensor) -> tuple[Tensor, Tensor]:
        shared = self.shared()
        n = lam.shape[0]
        A = shared.randlora_A[:, : self.small]  # (r, m), the same A in every term
        scaled = (lam.unsqueeze(2) * A).mul(gamma.unsqueeze(1)).reshape(n * self.r, self.small)  # rows (i, k)
        B = shared.randlora_B[: self.large, :n].reshape(self.large, n * self.r)  # columns (i, k)
        if self.in_features == self.small:
            return scaled, B
        return B.t(), scaled.t()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, bases={self.randlora_lambda.shape[0]}, scaling={self.scaling:g}"


SCALE = 20.0
"""The default s (alpha = None)."""


@dataclass
class RandLoRAConfig(VariantConfig):
    r: int = 32
    alpha: float | None = None
    """Scale numerator, s = alpha / r; None means SCALE·r: s = 20 at any rank (see the module docstring)."""
    basis_seed: int = 0
    """Seed of the CPU generator that draws the shared bases."""

    def __post_init__(self) -> None:
        alpha, self.alpha = self.alpha, SCALE * self.r if self.alpha is None else self.alpha
        super().__post_init__()  # validates the resolved alpha; None is put back so that Hydra's stored default
        self.alpha = alpha  # still follows a `variant.r=...` override

    @property
    def scaling(self) -> float:
        return SCALE if self.alpha is None else self.alpha / self.r


@VARIANTS.register("randlora", config=RandLoRAConfig)
class RandLoRA(SharedStateVariant):
    name = "randlora"
    paper = (
        "RandLoRA: Full-rank parameter-efficient fine-tuning of large models "
        "(Albert et al., ICLR 2025, arXiv 2502.00987)"
    )
    taxonomy = "rank"
    tags = ("expansion", "sharing", "random-basis")
    params_formula = "⌈m/r⌉·(r + m), m = min(d_in, d_out)"
    peft = "RandLoraConfig()"
    memory_note = "frozen random bases r·(max m + ⌈max m / r⌉·max M), once per model; a dense weight gradient per step"

    def init_shared(self, shared: nn.Module, targets: list[nn.Module]) -> None:
        r = self.cfg.r
        small = max(min(weight_dims(m)) for m in targets)
        large = max(max(weight_dims(m)) for m in targets)
        generator = torch.Generator().manual_seed(self.cfg.basis_seed)
        bound = math.sqrt(3)  # U(-√3, √3) has unit variance
        A = torch.empty(r, small).uniform_(-bound, bound, generator=generator)
        B = torch.empty(large, math.ceil(small / r), r).uniform_(-bound, bound, generator=generator)
        factory = {"dtype": targets[0].weight.dtype, "device": targets[0].weight.device}
        shared.register_buffer("randlora_A", A.to(**factory))
        shared.register_buffer("randlora_B", B.to(**factory))

    def make_layer(self, base: nn.Module) -> RandLoRALinear:
        return RandLoRALinear(base, self.shared, self.cfg.r, self.cfg.scaling, self.cfg.dropout)

    def layer_params(self, d_in: int, d_out: int) -> int:
        return num_bases(d_in, d_out, self.cfg.r) * (self.cfg.r + min(d_in, d_out))

    def peft_config(self, targets: list[str], head: list[str]) -> Any:
        from peft import RandLoraConfig

        return RandLoraConfig(
            r=self.cfg.r,
            randlora_alpha=self.cfg.scaling * self.cfg.r,
            target_modules=targets,
            modules_to_save=head,
            projection_prng_key=self.cfg.basis_seed,
            randlora_dropout=self.cfg.dropout,
        )

    def peft_export(
        self, model: nn.Module, base: nn.Module, targets: list[str], head: list[str]
    ) -> tuple[Any, dict[str, Tensor]] | None:
        layers = [layer for _, layer in named_adapter_layers(model)]
        counts = sorted({layer.randlora_lambda.shape[0] for layer in layers})
        if len(counts) > 1:
            raise UserError(
                f"variant=randlora: its layers have different numbers of bases ({counts}), and PEFT pairs the shared "
                "B's columns with the terms in an order that depends on that number, so no one B serves them all; "
                "use --merged"
            )
        n, r = counts[0], self.cfg.r
        ours_A, ours_B = model.lf_shared.randlora_A, model.lf_shared.randlora_B
        # PEFT sizes its bases from the largest d_out and the largest d_in apart (ours from the largest smaller and
        # larger sides), so its may be bigger: the entries beyond ours are read by no layer.
        small, large = sorted(
            (max(layer.out_features for layer in layers), max(layer.in_features for layer in layers))
        )
        A = ours_A.new_zeros(r, 1, small)  # PEFT's (r, 1, m): one A for every basis
        A[:, 0, : ours_A.shape[1]] = ours_A
        # PEFT's term c of a layer with n bases multiplies its B column c (as (basis, rank) = divmod(c, r)) with its
        # scaled A row c (as (rank, basis) = divmod(c, n)); ours pairs B[:, b, k] with row (k, b): reorder B's first n
        # bases so that column c = k·n + b holds our B[:, b, k].
        B = ours_B.new_zeros(large, math.ceil(small / r), r)
        B[: ours_B.shape[0], :n] = ours_B[:, :n].transpose(1, 2).reshape(ours_B.shape[0], n, r)
        config = self.peft_config(targets, head)
        config.save_projection = True  # the bases themselves travel with the adapter, not only their seed
        state = peft_layer_state(
            model,  # every PEFT layer also saves a reference to the shared bases
            lambda layer: {
                "randlora_lambda": layer.randlora_lambda.t(),
                "randlora_gamma": layer.randlora_gamma,
                "randlora_A": A,
                "randlora_B": B,
            },
        )
        return config, state | {"base_model.randlora_A": A, "base_model.randlora_B": B}
