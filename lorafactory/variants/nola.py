"""NOLA — "NOLA: Compressing LoRA using Linear Combination of Random Basis" (Koohpayegani, Navaneet, Nooralinejad,
Kolouri, Pirsiavash, ICLR 2024, arXiv 2310.02556).

Update rule: LoRA's `y = W0 x + b + s · B A dropout(x)`, s = alpha / r, with both factors mixtures of frozen random
matrices whose coefficients are the only trainable parameters:

    A = A_0 + Σ_{i=1..k_A} α_i Â_i,    B = Σ_{j=1..k_B} β_j B̂_j,    Â_i ∈ R^{r×d_in},  B̂_j ∈ R^{d_out×r}

Init: α = β = 0, and the official GPT-2 code's anchor A_0 (a frozen Kaiming-uniform matrix, LoRA's init for A, so that
B's coefficients get a gradient at step 0; its B_0 is zero and is left out), so ΔW = 0 at step 0. The bases' entries
are uniform on [-1, 1] / √k, as in the official code. Trainable parameters per layer: k_A + k_B, independent of d_in,
d_out and r.

Choices: the official GPT-2 code draws every layer's bases from its own random seed and regenerates them in each
forward and backward pass; its ViT code reseeds with the same seed before each layer, so that all layers of a shape
share their bases. Here one set of bases serves the whole model (the ViT code's sharing), drawn at the largest d_in
and d_out among the adapted layers and sliced per layer (`lf_shared.nola_A` of shape (d_in, r, k_A),
`lf_shared.nola_B` (d_out, r, k_B)): they are generated once, from `basis_seed` on a CPU generator, and are not saved
(non-persistent buffers: a fresh process regenerates the same ones); each layer's A_0 is a persistent buffer. Defaults
are the official GPT-2 E2E script's, r = 8, alpha = 8, k_A = k_B = 512, except the learning rate. That script trains
the coefficients at 5e-3 where LoRA uses 2e-4 (Hu et al.), 25×; but an Adam step on the coefficients moves each
entry of A and B by about 0.46·lr·√(k / (d·r)) (k random directions summed with aligned signs), so narrow layers move
much further per step than GPT-2-medium's: at 25× the tiny test models do not train, at 10× they do, and that is the
default `coef_lr_ratio`. Only the coefficients get it; the task head (GPT-2 on E2E has none) keeps the run's rate,
LoRA's (`lr_mult` = 1): a head at 25× diverges.

Computation: A and B are built from the coefficients (a matrix-vector product per factor, k·r·d multiply-adds) inside
the factored-layer functions of vera.py, which keep only x and the coefficients for backward and rebuild A and B there;
the rest is LoRA's computation (merged weight with many tokens, two branches otherwise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lorafactory.errors import check
from lorafactory.variants.base import VARIANTS, SharedRef, VariantConfig, adapter_layers, kaiming_
from lorafactory.variants.vera import FactoredLinear, SharedStateVariant, weight_dims


class NOLALinear(FactoredLinear):
    """LoRA whose A and B mix the model's shared random bases with trainable coefficients `nola_alpha` (k_A) and
    `nola_beta` (k_B); A is anchored at a frozen Kaiming matrix `nola_A0` (r × d_in)."""

    def __init__(self, base: nn.Module, shared: SharedRef, r: int, k_a: int, k_b: int, scaling: float, dropout: float):
        super().__init__(base, shared, scaling, dropout)
        self.r = r
        factory = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.nola_alpha = nn.Parameter(torch.zeros(k_a, **factory))
        self.nola_beta = nn.Parameter(torch.zeros(k_b, **factory))
        self.register_buffer("nola_A0", kaiming_(torch.empty(r, self.in_features, **factory)))

    def factor_inputs(self) -> tuple[Tensor, ...]:
        return self.nola_alpha, self.nola_beta

    def factors(self, alpha: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
        shared, r, d_in, d_out = self.shared(), self.r, self.in_features, self.out_features
        mix_A = shared.nola_A[:d_in].reshape(d_in * r, -1) @ alpha  # leading-dim slices: views, no copy
        mix_B = shared.nola_B[:d_out].reshape(d_out * r, -1) @ beta
        return self.nola_A0 + mix_A.view(d_in, r).t(), mix_B.view(d_out, r)

    def extra_repr(self) -> str:
        k_a, k_b = self.nola_alpha.numel(), self.nola_beta.numel()
        return f"{super().extra_repr()}, r={self.r}, k_A={k_a}, k_B={k_b}, scaling={self.scaling:g}"


@dataclass
class NOLAConfig(VariantConfig):
    alpha: float = 8.0
    num_basis_a: int = 512
    """k_A: random matrices mixed into A (trainable coefficients per layer)."""
    num_basis_b: int = 512
    """k_B: random matrices mixed into B."""
    basis_seed: int = 0
    """Seed of the CPU generator that draws the shared bases (regenerated, not saved)."""
    coef_lr_ratio: float = 10.0
    """Learning rate of the coefficients relative to the run's, which the task head keeps (see the docstring)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.num_basis_a >= 1, f"variant.num_basis_a must be >= 1, got {self.num_basis_a}")
        check(self.num_basis_b >= 1, f"variant.num_basis_b must be >= 1, got {self.num_basis_b}")
        check(self.coef_lr_ratio > 0, f"variant.coef_lr_ratio must be > 0, got {self.coef_lr_ratio}")


@VARIANTS.register("nola", config=NOLAConfig)
class NOLA(SharedStateVariant):
    name = "nola"
    paper = (
        "NOLA: Compressing LoRA using Linear Combination of Random Basis "
        "(Koohpayegani et al., ICLR 2024, arXiv 2310.02556)"
    )
    taxonomy = "rank"
    tags = ("sharing", "random-basis")
    params_formula = "k_A + k_B"
    memory_note = "frozen random bases r·(k_A·max d_in + k_B·max d_out), once per model, not saved"

    def init_shared(self, shared: nn.Module, targets: list[nn.Module]) -> None:
        r, k_a, k_b = self.cfg.r, self.cfg.num_basis_a, self.cfg.num_basis_b
        d_out = max(weight_dims(m)[0] for m in targets)
        d_in = max(weight_dims(m)[1] for m in targets)
        generator = torch.Generator().manual_seed(self.cfg.basis_seed)
        A = torch.empty(d_in, r, k_a).uniform_(-1, 1, generator=generator).div_(math.sqrt(k_a))
        B = torch.empty(d_out, r, k_b).uniform_(-1, 1, generator=generator).div_(math.sqrt(k_b))
        factory = {"dtype": targets[0].weight.dtype, "device": targets[0].weight.device}
        shared.register_buffer("nola_A", A.to(**factory), persistent=False)
        shared.register_buffer("nola_B", B.to(**factory), persistent=False)

    def make_layer(self, base: nn.Module) -> NOLALinear:
        cfg = self.cfg
        return NOLALinear(base, self.shared, cfg.r, cfg.num_basis_a, cfg.num_basis_b, cfg.alpha / cfg.r, cfg.dropout)

    def layer_params(self, d_in: int, d_out: int) -> int:
        return self.cfg.num_basis_a + self.cfg.num_basis_b

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        coefficients = [p for layer in adapter_layers(model) for p in (layer.nola_alpha, layer.nola_beta)]
        ids = {id(p) for p in coefficients}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        return [
            {"params": rest, "lr": lr, "name": "head"},
            {"params": coefficients, "lr": lr * self.cfg.coef_lr_ratio, "name": "coefficients"},
        ]
