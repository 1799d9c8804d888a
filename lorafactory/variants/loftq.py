"""LoftQ — "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models" (Li, Yu, Liang, He, Karampatziakis,
Chen, Zhao, ICLR 2024, arXiv 2310.08659).

Update rule: LoRA on a quantized base, `y = Q x + b + s · B A dropout(x)`, where Q and the initial B, A are chosen
together so that Q + s·B A approximates W0, by T alternating steps (paper Algorithm 1):

    Q_t = q_N(W0 − L_{t−1} R_{t−1}),   L_t R_t = rank-r SVD of (W0 − Q_t) (L = U_r √S_r, R = √S_r V_rᵀ),   L_0 R_0 = 0

then base = Q_T (stored in NF4), B = L_T / √s, A = R_T / √s. The first step is QLoRA's quantization plus the best
rank-r fit of its error; each later one re-quantizes what the low-rank part leaves. q_N is NF4 in blocks of 64 without
double quantization, as LoftQ's code and PEFT's `loftq_init` quantize (and as LoftQ's examples load the result).

Scaling: PEFT assigns A = R, B = L without dividing by s = alpha / r, so its initial model matches Q + L R only when
alpha = r. Here the factors carry 1/√s each, so s·B A = L R for any alpha (the model at step 0 is the same whatever
alpha is; alpha only sets the learning dynamics).

Init cost: T NF4 quantizations and T full SVDs per layer (fp32), at adapt time. Trainable parameters per layer:
r · (d_in + d_out). Defaults from the paper's examples: T = 5, all linear layers. The base is rewritten (Q_T), so
the adapter state includes it. k×k convolution targets keep Q_T's values in full precision (their adapter runs the
convolution with W0 + ΔW, see lorafactory/quantize.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lorafactory import quantize
from lorafactory.errors import ConfigError, check
from lorafactory.variants.base import VARIANTS, VariantConfig
from lorafactory.variants.lora import LoRA
from lorafactory.variants.qlora import QuantizedLoRALinear


def rank_r(matrix: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """L = U_r √S_r, R = √S_r V_rᵀ: the best rank-r approximation of `matrix` (exact SVD, as LoftQ and PEFT)."""
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    root = S[:r].sqrt()
    return U[:, :r] * root, root.unsqueeze(1) * Vh[:r]


@torch.no_grad()
def loftq_decompose(
    W: Tensor, r: int, iters: int, block_size: int = 64, double_quant: bool = False
) -> tuple[quantize.QuantizedMatrix, Tensor, Tensor, list[float]]:
    """LoftQ's alternating steps on W (float32): Q_T (quantized), L_T, R_T, and ‖W − Q_t − L_t R_t‖_F per step."""
    low_rank = torch.zeros_like(W)
    errors = []
    for _ in range(iters):
        q = quantize.quantize_matrix(W - low_rank, block_size, double_quant)
        residual = W - q.dequantize()
        L, R = rank_r(residual, r)
        low_rank = L @ R
        errors.append(torch.linalg.norm(residual - low_rank).item())
    return q, L, R, errors


class LoftQLinear(QuantizedLoRALinear):
    saves_base = True

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float, cfg: LoftQConfig):
        super().__init__(base, r, scaling, dropout)
        if r > min(self.in_features, self.out_features):
            raise ConfigError(
                f"variant.r={r} exceeds the rank of a {self.out_features}×{self.in_features} weight; LoftQ needs "
                f"r <= {min(self.in_features, self.out_features)}"
            )
        weight = self.weight
        W = weight.to(torch.promote_types(weight.dtype, torch.float32))
        q, L, R, self.init_errors = loftq_decompose(W, r, cfg.iters, cfg.block_size, cfg.double_quant)
        with torch.no_grad():
            self.lora_B.copy_(L / scaling**0.5)
            self.lora_A.copy_(R / scaling**0.5)
        if quantize.quantizable(base):
            quantize.install_(base, q)
        else:
            self.write_weight(q.dequantize())


@dataclass
class LoftQConfig(VariantConfig):
    targets: Any = "all-linear"
    iters: int = 5
    """Alternating steps T (paper's examples: 5; PEFT's default: 1)."""
    block_size: int = 64
    """NF4 block size."""
    double_quant: bool = False
    """Quantize the block scales too; LoftQ's code and PEFT do not."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.iters >= 1, f"variant.iters must be >= 1, got {self.iters}")
        check(
            self.block_size in (32, 64, 128, 256, 512, 1024, 2048, 4096),
            f"variant.block_size must be a power of two in [32, 4096], got {self.block_size}",
        )


@VARIANTS.register("loftq", config=LoftQConfig)
class LoftQ(LoRA):
    name = "loftq"
    paper = (
        "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models (Li et al., ICLR 2024, arXiv 2310.08659)"
    )
    taxonomy = "initialization"
    tags = ("quantization", "svd")
    zero_init = False
    peft = 'LoraConfig(init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_bits=4))'
    quantized_base = "its init quantizes the targets itself, from their full-precision weights"

    def make_layer(self, base: nn.Module) -> LoftQLinear:
        return LoftQLinear(base, self.cfg.r, self.scaling, self.cfg.dropout, self.cfg)

    def peft_config(self, targets: list[str], head: list[str]) -> Any:
        from peft import LoftQConfig as PeftLoftQConfig

        config = super().peft_config(targets, head)
        config.init_lora_weights = "loftq"
        config.loftq_config = PeftLoftQConfig(loftq_bits=4, loftq_iter=self.cfg.iters)
        return config
