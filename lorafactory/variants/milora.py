"""MiLoRA — "MiLoRA: Harnessing Minor Singular Components for Parameter-Efficient LLM Finetuning"
(Wang, Li, Wang, Zhang, Song, Hu, NAACL 2025, arXiv 2406.09044).

Update rule: LoRA's, `y = W_res x + b + s · B A x`, initialised from the minor part of W0 (PiSSA with the other end of
the spectrum). With the SVD `W0 = U S Vᵀ` and its bottom r triplets (U_min, S_min, V_min):

    A = diag(√(S_min / s)) V_minᵀ,   B = U_min diag(√(S_min / s)),   W_res = W0 − s · B A

so `W_res + s·B A = W0` (the model is unchanged at step 0); the frozen residual keeps the principal part of the
spectrum exactly and training starts in the subspace the pretrained weight uses least. The minor triplets need the
full (exact) SVD: a randomized one finds the top of the spectrum, not the bottom. Trainable parameters per layer:
r · (d_in + d_out).

Choices, from the official code (the paper's repository deondou/reproduce_lora, `svd_init.py` and
`scripts/run_milora.sh`): alpha = r (s = 1; the S/s division lets other alphas keep W_res + s·BA = W0), "minor" means
the last r of the min(d_in, d_out) singular values of the thin SVD. The official recipe trains MiLoRA at LoRA's
learning rate (3e-4 for both in its math recipe); so does `lr_mult` = 1. On SST-2 (MiniLM-L6, reports/zoo_init, 1 seed)
the selection split kept improving up to 4× LoRA's rate while validation peaked at 1× (0.835), so one seed does not
place its optimum more precisely than "about LoRA's".

The base weight is rewritten, so the adapter state saved for a run includes W_res.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorafactory.variants.base import VARIANTS, VariantConfig
from lorafactory.variants.lora import LoRA
from lorafactory.variants.pissa import PiSSALinear


class MiLoRALinear(PiSSALinear):
    """PiSSA's layer, initialised from the minor singular triplets instead of the principal ones (exact SVD always:
    `niter` does not apply)."""

    @torch.no_grad()
    def init_principal(self, niter: int) -> None:
        weight = self.weight
        W = weight.to(torch.promote_types(weight.dtype, torch.float32))
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        U, S, Vh = U[:, -self.r :], S[-self.r :], Vh[-self.r :]
        root = (S / self.scaling).sqrt()
        self.lora_A.copy_(root.unsqueeze(1) * Vh)
        self.lora_B.copy_(U * root.unsqueeze(0))
        dtype = W.dtype
        self.write_weight(W - self.delta_weight().to(dtype))  # from the rounded factors


@dataclass
class MiLoRAConfig(VariantConfig):
    alpha: float = 8.0  # = r: the official recipe sets alpha = r for MiLoRA (s = 1)
    lr_mult: float = 1.0  # the recipe's, and what reports/zoo_init supports; see the module docstring


@VARIANTS.register("milora", config=MiLoRAConfig)
class MiLoRA(LoRA):
    name = "milora"
    paper = (
        "MiLoRA: Harnessing Minor Singular Components for Parameter-Efficient LLM Finetuning "
        "(Wang et al., NAACL 2025, arXiv 2406.09044)"
    )
    taxonomy = "initialization"
    tags = ("svd",)
    peft = None

    def make_layer(self, base: nn.Module) -> MiLoRALinear:
        return MiLoRALinear(base, self.cfg.r, self.scaling, self.cfg.dropout)

    def peft_config(self, targets: list[str], head: list[str]) -> Any | None:
        return None  # PEFT has no MiLoRA (its "mica" init trains differently: frozen minor B, A = 0)
