"""LoRA-SB — "Initialization using Update Approximation is a Silver Bullet for Extreme Efficient Low-Rank Fine-Tuning"
(Ponkshe, Singhal, Gorbunov, Tumanov, Horvath, Vepakomma, arXiv 2411.19557).

Update rule: the LoRA-XS architecture, a trainable r × r core between two frozen factors,

    y = W0 x + b + s · B R A x,     B ∈ R^{d_out×r}, A ∈ R^{r×d_in} frozen,  R ∈ R^{r×r} trainable,  s = alpha / r

initialised from an estimate of full fine-tuning's first update. With ΣG the gradient ∂L/∂W0 summed over
`init_batches` training batches, Adam's first step is approximated by its sign, ΔW₁ = −η · sign(ΣG) (η =
`first_step_lr`, the learning rate of the first warm-up step), and its rank-r SVD ΔW₁ ≈ U_r S_r V_rᵀ sets

    B = U_r,   A = V_rᵀ,   R = S_r / s

so s·B R A is the best rank-r approximation of ΔW₁. The base weight is not rewritten: the model starts one
(approximate, low-rank) full fine-tuning step away from the base model (`zero_init = False`). B and A are persistent
buffers (saved with the adapter, so a resumed run needs no data). Trainable parameters per layer: r².

Choices, from the official code (RaghavSinghal10/lora-sb: `utils/gradient_utils.py`, `initialization_utils.py`,
`train_glue.py`): alpha = r (the scripts force it, s = 1); η = lr / (warmup_ratio · total_steps), the first warm-up
rate. `init_from_data` does not see the run's optimizer or schedule, so η is a config value here; its default 1e-5 is
what the official GLUE recipe gives (lr 1e-3, warm-up 6 % of ~2,000 steps). The official code estimates from 2 to 50
samples (`num_samples`); `init_batches` = 2 is 64 at batch size 32. The SVD is randomized as in the official code, with
an oversampled sketch (8 extra columns, as PiSSA's here) instead of exactly r, which converges slowly when
σ_r ≈ σ_{r+1}. The official GLUE script trains at 1e-3 where LoRA uses ~3e-4 on RoBERTa-large (Hu et al.), 3×; on
SST-2 (MiniLM-L6, reports/zoo_init, 1 seed) LoRA-SB's score still rose up to the largest rate tried, 24× LoRA's (0.745
at 3×, 0.778 at 24×), so `lr_mult` = 24: measured, and a lower bound of its optimum. Until `init_from_data` runs, B
and A are random orthonormal bases and R = 0 (the base model); a run always calls it, except when resuming, where the
checkpoint holds them.

Memory (init only): as LoRA-GA's (see lora_ga.py's `weight_gradients`): one fp32 d_out × d_in gradient sum per
adapted layer in host memory, one layer's dense gradient on the device at a time.

Computation: LoRA with factors A (frozen) and B R (see svfit.py's `FactoredLinear`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lorafactory.errors import check
from lorafactory.variants.base import VARIANTS, Variant, VariantConfig, adapter_layers
from lorafactory.variants.lora_ga import weight_gradients
from lorafactory.variants.pissa import OVERSAMPLE
from lorafactory.variants.svfit import CoreLinear


class LoRASBLinear(CoreLinear):
    """`base(x) + s · B R A x` with `basis_out` = B and `basis_in` = A frozen, `core` = R trained."""

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float = 0.0):
        super().__init__(base, r, scaling, dropout, diagonal=False)
        with torch.no_grad():  # a placeholder until `init_from_update`: orthonormal random bases, R = 0
            self.basis_out.copy_(torch.linalg.qr(torch.randn(self.out_features, r))[0])
            self.basis_in.copy_(torch.linalg.qr(torch.randn(self.in_features, r))[0].t())

    @torch.no_grad()
    def init_from_update(self, update: Tensor, niter: int = 10) -> None:
        """Set B, R and A from the rank-r SVD of an estimated update ΔW₁ (d_out × d_in), so s·B R A ≈ ΔW₁."""
        M = update.to(self.basis_out.device, torch.float32)
        U, S, V = torch.svd_lowrank(M, q=min(self.r + OVERSAMPLE, *M.shape), niter=niter)
        r = self.r
        self.set_factors(U[:, :r], torch.diag(S[:r]) / self.scaling, V[:, :r].t(), residualize=False)


@dataclass
class LoRASBConfig(VariantConfig):
    alpha: float = 8.0  # = r: the official scripts force alpha = r (s = 1)
    lr_mult: float = 24.0  # measured: reports/zoo_init's best at 4.8e-2, the largest tried; see the docstring
    init_batches: int = 2
    """Training batches whose gradients are summed for the update estimate."""
    first_step_lr: float = 1e-5
    """η of the estimated first full fine-tuning step (the first warm-up learning rate)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.init_batches >= 1, f"variant.init_batches must be >= 1, got {self.init_batches}")
        check(self.first_step_lr > 0, f"variant.first_step_lr must be > 0, got {self.first_step_lr}")


@VARIANTS.register("lora_sb", config=LoRASBConfig)
class LoRASB(Variant):
    name = "lora_sb"
    paper = (
        "Initialization using Update Approximation is a Silver Bullet for Extreme Efficient Low-Rank Fine-Tuning "
        "(Ponkshe et al., 2024, arXiv 2411.19557)"
    )
    taxonomy = "initialization"
    tags = ("gradient",)
    quantized_base = "its init needs the full-precision gradient of every target weight W0"
    zero_init = False
    params_formula = "r²"
    memory_note = "init only: one fp32 d_out×d_in gradient sum per adapted layer in host memory"

    def make_layer(self, base: nn.Module) -> LoRASBLinear:
        return LoRASBLinear(base, self.cfg.r, self.cfg.alpha / self.cfg.r, self.cfg.dropout)

    def layer_params(self, d_in: int, d_out: int) -> int:
        return self.cfg.r**2

    def init_from_data(self, model: nn.Module, batches: Iterable[dict[str, Tensor]], loss_fn: Any) -> None:
        layers = adapter_layers(model)
        sums = weight_gradients(model, layers, batches, loss_fn, self.cfg.init_batches)
        for layer, total in zip(layers, sums, strict=True):
            layer.init_from_update(-self.cfg.first_step_lr * total.sign())
