"""LQ-LoRA — "LQ-LoRA: Low-rank plus Quantized Matrix Decomposition for Efficient Language Model Finetuning" (Guo,
Greengard, Xing, Kim, ICLR 2024, arXiv 2311.12023).

Update rule: LoRA on a quantized base, `y = Q x + b + s · B A dropout(x)`, with W0 ≈ Q + L R found by alternating,
from Q = 0, until the error stops falling (at most `max_iters` steps):

    L R = rank-r SVD of (W0 − Q),    Q = q(W0 − L R),    error = ‖√F ⊙ (W0 − Q − L R)‖_F   (F = 1 without Fisher)

then base = Q (NF4, stored quantized), B = L / √s, A = R / √s (s·B A = L R, as the official code folds the scale).
The official loop stops at the first step whose error rose and keeps that (slightly worse) step, a TODO in its code;
here the previous, best step is kept, so the recorded errors never increase. SVDs are randomized (`svd_lowrank`,
r + 10 columns, 2 subspace iterations) as in the official `svd_decomposition`.

Fisher weighting (optional, `fisher_batches > 0`): `init_from_data` accumulates the squared gradient of the loss with
respect to each target's weight over that many batches (the gradient of a whole batch, not of single examples as the
official 10,000-sample empirical Fisher; taken at the step-0 model Q + s·B A, not at W0, in eval mode) and decomposes
again with the official "two-sided" weighted SVD: rows and columns scaled by √(mean F) over columns and rows, SVD,
scaled back.
Until then each layer keeps W0 in full precision (the memory of one fp32 copy of the targets).

Not implemented: the integer linear program that assigns each matrix its own bits and block sizes to meet an average
bit budget (e.g. 2.75 bits); every matrix here gets NF4 with 64-value blocks and double quantization (QLoRA's format,
the ILP's 4.127-bit point). Trainable parameters per layer: r · (d_in + d_out). The base is rewritten (Q), so the
adapter state includes it; k×k convolution targets keep Q's values in full precision (see lorafactory/quantize.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lorafactory import quantize
from lorafactory.errors import ConfigError, check
from lorafactory.variants.base import VARIANTS, VariantConfig, adapter_layers
from lorafactory.variants.lora import LoRA
from lorafactory.variants.qlora import QuantizedLoRALinear

OVERSAMPLE = 10  # extra sketch columns of the randomized SVD (official num_oversampling)


def low_rank(matrix: Tensor, r: int, fisher: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """L (d_out × r), R (r × d_in) with L R ≈ matrix; with Fisher weights, the official two-sided weighted SVD."""
    if fisher is not None:
        rows = fisher.mean(dim=1, keepdim=True).sqrt().clamp_min(1e-12)
        cols = fisher.mean(dim=0, keepdim=True).sqrt().clamp_min(1e-12)
        L, R = low_rank(rows * matrix * cols, r)
        return L / rows, R / cols
    U, S, V = torch.svd_lowrank(matrix, q=min(r + OVERSAMPLE, *matrix.shape), niter=2)
    root = S[:r].sqrt()
    return U[:, :r] * root, root.unsqueeze(1) * V[:, :r].t()


@torch.no_grad()
def lq_decompose(
    W: Tensor,
    r: int,
    max_iters: int,
    block_size: int = 64,
    double_quant: bool = True,
    fisher: Tensor | None = None,
) -> tuple[quantize.QuantizedMatrix, Tensor, Tensor, list[float]]:
    """The best step of the alternation on W (float32): Q (quantized), L, R, and the (weighted) error of each step
    kept, in order (non-increasing)."""
    weight = None if fisher is None else fisher.sqrt()
    Q = torch.zeros_like(W)
    best: tuple[quantize.QuantizedMatrix, Tensor, Tensor] | None = None
    errors: list[float] = []
    for _ in range(max_iters):
        L, R = low_rank(W - Q, r, fisher)
        q = quantize.quantize_matrix(W - L @ R, block_size, double_quant)
        Q = q.dequantize()
        residual = W - Q - L @ R
        error = torch.linalg.norm(residual if weight is None else weight * residual).item()
        if errors and error > errors[-1]:
            break
        best = (q, L, R)
        errors.append(error)
    return *best, errors


class LQLoRALinear(QuantizedLoRALinear):
    saves_base = True

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float, cfg: LQLoRAConfig):
        super().__init__(base, r, scaling, dropout)
        if r > min(self.in_features, self.out_features):
            raise ConfigError(
                f"variant.r={r} exceeds the rank of a {self.out_features}×{self.in_features} weight; LQ-LoRA needs "
                f"r <= {min(self.in_features, self.out_features)}"
            )
        if cfg.fisher_batches > 0 and self.kind == "conv":
            raise ConfigError(
                "variant.fisher_batches > 0 weights linear and 1×1 targets only; a k×k convolution is targeted "
                "(variant.targets=pointwise, or fisher_batches=0)"
            )
        self.cfg = cfg
        weight = self.weight
        W = weight.to(torch.promote_types(weight.dtype, torch.float32))
        # Kept until init_from_data re-decomposes with Fisher weights (a plain attribute: never saved or counted).
        self.full_weight = W.clone() if cfg.fisher_batches > 0 else None
        self.decompose(W)

    @torch.no_grad()
    def decompose(self, W: Tensor, fisher: Tensor | None = None) -> None:
        cfg = self.cfg
        q, L, R, self.init_errors = lq_decompose(W, self.r, cfg.max_iters, cfg.block_size, cfg.double_quant, fisher)
        self.lora_B.copy_(L / self.scaling**0.5)
        self.lora_A.copy_(R / self.scaling**0.5)
        if quantize.quantizable(self.base):
            quantize.install_(self.base, q)
        else:
            self.write_weight(q.dequantize())


@dataclass
class LQLoRAConfig(VariantConfig):
    targets: Any = "all-linear"
    max_iters: int = 100
    """Most alternating steps (the loop stops earlier when the error rises; official: 100)."""
    fisher_batches: int = 0
    """Batches of squared gradients for the Fisher-weighted decomposition (0: unweighted)."""
    block_size: int = 64
    """NF4 block size."""
    double_quant: bool = True
    """Quantize the block scales too."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.max_iters >= 1, f"variant.max_iters must be >= 1, got {self.max_iters}")
        check(self.fisher_batches >= 0, f"variant.fisher_batches must be >= 0, got {self.fisher_batches}")
        check(
            self.block_size in (32, 64, 128, 256, 512, 1024, 2048, 4096),
            f"variant.block_size must be a power of two in [32, 4096], got {self.block_size}",
        )


@VARIANTS.register("lq_lora", config=LQLoRAConfig)
class LQLoRA(LoRA):
    name = "lq_lora"
    paper = (
        "LQ-LoRA: Low-rank plus Quantized Matrix Decomposition for Efficient Language Model Finetuning "
        "(Guo, Greengard, Xing, Kim, ICLR 2024, arXiv 2311.12023)"
    )
    taxonomy = "initialization"
    tags = ("quantization", "svd")
    zero_init = False
    peft = None  # PEFT has no LQ-LoRA
    quantized_base = "its decomposition quantizes the targets itself, from their full-precision weights"
    memory_note = "with fisher_batches > 0: a full-precision copy of every target until init_from_data"

    def make_layer(self, base: nn.Module) -> LQLoRALinear:
        return LQLoRALinear(base, self.cfg.r, self.scaling, self.cfg.dropout, self.cfg)

    def peft_config(self, targets: list[str], head: list[str]) -> None:
        return None

    def init_from_data(self, model: nn.Module, batches: Iterable[dict[str, Tensor]], loss_fn: Any) -> None:
        layers = [m for m in adapter_layers(model) if isinstance(m, LQLoRALinear) and m.full_weight is not None]
        if self.cfg.fisher_batches == 0 or not layers:
            return
        fisher = {id(layer): torch.zeros_like(layer.full_weight) for layer in layers}
        seen: list[tuple[LQLoRALinear, Tensor, Tensor]] = []

        def keep(layer: nn.Module, args: tuple, out: Tensor) -> None:
            seen.append((layer, args[0].detach(), out))

        hooks = [layer.register_forward_hook(keep) for layer in layers]
        was_training = model.training
        model.eval()  # no dropout noise in the gradients, and no trace left (BatchNorm statistics)
        try:
            for _, batch in zip(range(self.cfg.fisher_batches), batches, strict=False):
                seen.clear()
                loss = loss_fn(model, batch)
                outs = [out for _, _, out in seen]
                grads = torch.autograd.grad(loss, outs, allow_unused=True)  # leaves every .grad untouched
                for (layer, x, _), g in zip(seen, grads, strict=True):
                    if g is not None:
                        x2, g2 = layer_view(layer, x, g)
                        fisher[id(layer)] += (g2.t() @ x2).float().square()
        finally:
            for hook in hooks:
                hook.remove()
            model.train(was_training)
        for layer in layers:
            layer.decompose(layer.full_weight, fisher[id(layer)])
            layer.full_weight = None


def layer_view(layer: nn.Module, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """Input and output gradient as (tokens, d_in) and (tokens, d_out) rows: ∂L/∂W = gᵀ x summed over tokens.
    A 1×1 convolution is a linear over the channels of every pixel."""
    if layer.kind == "pointwise":
        x, g = x.movedim(1, -1), g.movedim(1, -1)
    return x.reshape(-1, layer.in_features), g.reshape(-1, layer.out_features)
