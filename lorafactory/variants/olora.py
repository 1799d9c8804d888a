"""OLoRA — "OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models" (Büyükakyüz, arXiv 2406.01775).

Update rule: LoRA's, `y = W_res x + b + s · B A x` (s = alpha / r), initialised from the thin QR decomposition of the
frozen weight, `W0 = Q R` (Q ∈ R^{d_out×k} with orthonormal columns, R ∈ R^{k×d_in} upper-triangular,
k = min(d_in, d_out)):

    B = Q[:, :r],   A = R[:r, :],   W_res = W0 − s · B A

so `W_res + s·B A = W0` (the model is unchanged at step 0) and B starts orthonormal, spanning the span of W0's first
r columns. Trainable parameters per layer: r · (d_in + d_out).

Choices: PEFT's `init_lora_weights="olora"` is the reference implementation (the author's own code went into PEFT);
we do the same: QR in fp32, no division of the factors by s (so with s ≠ 1 the residual absorbs the difference), and
the parity test checks factors, residual, outputs and gradients against it. Learning rate: the companion study
(LoRAFactory, arXiv 2601.22708) finds OLoRA's best rate about 18× below LoRA's. Ours does not: on SST-2 (MiniLM-L6,
reports/zoo_init, 1 seed, rates bracketed on the selection split) OLoRA's best is 8e-4 against LoRA's 2e-3, and it
reaches only 0.56 at 1e-4, so `lr_mult` = 0.4, measured there.

The base weight is rewritten, so the adapter state saved for a run includes W_res.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorafactory.errors import ConfigError
from lorafactory.variants.base import VARIANTS, VariantConfig
from lorafactory.variants.lora import LoRA, LoRALinear


class OLoRALinear(LoRALinear):
    saves_base = True

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float = 0.0):
        super().__init__(base, r, scaling, dropout)
        if r > min(self.in_features, self.out_features):
            raise ConfigError(
                f"variant.r={r} exceeds the rank of a {self.out_features}×{self.in_features} weight; OLoRA needs "
                f"r <= {min(self.in_features, self.out_features)}"
            )
        with torch.no_grad():
            W = self.weight.to(torch.promote_types(self.weight.dtype, torch.float32))
            Q, R = torch.linalg.qr(W)
            self.lora_B.copy_(Q[:, :r])
            self.lora_A.copy_(R[:r])
            self.write_weight(W - self.delta_weight().to(W.dtype))  # from the rounded factors


@dataclass
class OLoRAConfig(VariantConfig):
    lr_mult: float = 0.4  # measured: reports/zoo_init brackets OLoRA's best at 0.4 × LoRA's rate; see the docstring


@VARIANTS.register("olora", config=OLoRAConfig)
class OLoRA(LoRA):
    name = "olora"
    paper = "OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models (Büyükakyüz, 2024, arXiv 2406.01775)"
    taxonomy = "initialization"
    tags = ("qr",)
    peft = 'LoraConfig(init_lora_weights="olora")'

    peft_options = {"init_lora_weights": "olora"}

    def make_layer(self, base: nn.Module) -> OLoRALinear:
        return OLoRALinear(base, self.cfg.r, self.scaling, self.cfg.dropout)
