"""BOFT — "Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization" (Liu et al., ICLR 2024,
arXiv 2311.06243).

Update rule: OFT's multiplicative update (see oft.py) with the orthogonal matrix a product of m butterfly factors, each
a block-diagonal orthogonal matrix conjugated by a fixed permutation, and a trainable scale per output:

    W' = s ⊙ (W0 R),   R = Π_{i=0..m−1} P_i blockdiag(R_{i,1}, ..., R_{i,d_in/b}) P_iᵀ,   R_{i,j} = Cayley(S_{i,j})

(⊙ scales the rows, y = W' x + b). P_0 = I; P_i interleaves the half-blocks of groups of b·2^i inputs (even halves
first, then odd), so information travels between blocks as in the Cooley–Tukey FFT and m = log2(d_in/b) + 1 factors
make R dense. m = 1 is OFT plus the scale. This is PEFT's composition: PEFT rotates the input by
`M_{m−1} ⋯ M_0` with M_i = P_i blockdiag(R_{i,j}ᵀ) P_iᵀ, which is Rᵀ, and scales the output without its bias.
Init: S = 0 and s = 1, so the model equals the base at step 0.
Trainable parameters per layer: m · (d_in / b) · b(b−1)/2 + d_out.

Choices where the paper and PEFT differ or leave room:
- Defaults b = 8, m = 2 (`block_size`, `butterfly_factors`), the BOFT(m=2, b=8) setting of the paper's GLUE
  experiments; PEFT's defaults (b = 4, m = 1) are plain block-diagonal OFT.
- Each generator is stored as the b(b−1)/2 free entries of a skew-symmetric matrix, as PEFT's OFT does; PEFT's BOFT
  stores a full b × b matrix D per block and uses S = (D − Dᵀ)/2: the same functions from b² parameters per block,
  so PEFT counts more trainable parameters. The parity test maps one onto the other.
- PEFT builds the permutations for m > 1 only when its CUDA block-diagonal extension compiles: on a CPU it silently
  falls back to m = 1. The parity test therefore compares m = 2 against PEFT's own butterfly path with that kernel
  replaced by torch.block_diag; the benchmark's PEFT twin runs m = 1.
- Widths: b must divide d_in, and each extra factor doubles the group size, so m > 1 needs d_in divisible by
  b·2^(m−1) and b even. PEFT raises otherwise; here b falls back to the nearest divisor of d_in (OFT's rule) and m to
  the largest count that fits (down to 1), with a warning. tiny-cnn's stem (8 × 27) gets b = 9, m = 1.
- `variant.r` is not used (the budget is b and m); PEFT's multiplicative block dropout is not implemented, so
  `variant.dropout` must stay 0.

Computation: the input is rotated factor by factor, x ↦ x Rᵀ = x M_{m−1} ⋯ M_0, each factor one blockwise matmul
(d_in · b per token) on a view of x that lines up P_i's pairs of half-blocks, so the permutations cost no gathers
(whose backward is a scatter-add); the frozen layer runs on the result and the scale multiplies its output. No
d_in × d_in matrix is formed in training (PEFT forms R densely each step: m·d_in³ through dense permutation
products, then x R at d_in² per token). Layers small for the number of tokens run one GEMM with s ⊙ (W0 R) instead
(see OFT's `merge_pays`), as do k×k convolutions. Merging writes s ⊙ (W0 R); unmerging divides by s and multiplies
by Rᵀ.

Measured (docs/bench.md: MiniLM-L6, every linear layer): a step costs 2.04× the frozen model's forward + backward,
against 5.17× for PEFT's BOFT in the same process (its twin runs m = 1).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lorafactory.errors import UserError, check
from lorafactory.variants.base import VARIANTS, Variant, VariantConfig, named_adapter_layers, peft_layer_state
from lorafactory.variants.oft import RotatedLayer, block_matmul, cayley, fit_block_size


def fit_butterfly(d: int, block_size: int, factors: int) -> tuple[int, int]:
    """(b, m) used on a width d: b = `fit_block_size(d, block_size)`, m the largest count <= `factors` such that each
    factor's groups of b·2^i inputs tile d and half-blocks exist (b even), down to 1."""
    b = fit_block_size(d, block_size)
    m = factors
    while m > 1 and (b % 2 or d % (b << (m - 1))):
        m -= 1
    return b, m


def butterfly_factor(x: Tensor, blocks: Tensor, i: int, transpose: bool) -> Tensor:
    """x P_i blockdiag(blocks) P_iᵀ (or with each block transposed), without gathers. P_i pairs, within each group of
    b·2^i inputs, the half-block c with the half-block c + 2^i: block (g, c) is [half c; half c + 2^i] of group g.
    Viewing x as (..., groups, 2, 2^i, b/2) puts those pairs in place, so one einsum multiplies every block."""
    n, b, _ = blocks.shape
    if i == 0:  # P_0 = I (and b may be odd)
        return block_matmul(x, blocks, transpose)
    pairs, half = 1 << i, b // 2
    groups = n // pairs
    spec = "...gsct,gcpqst->...gpcq" if transpose else "...gsct,gcstpq->...gpcq"
    xv = x.reshape(*x.shape[:-1], groups, 2, pairs, half)
    out = torch.einsum(spec, xv, blocks.to(x.dtype).reshape(groups, pairs, 2, half, 2, half))
    return out.reshape(x.shape)


class BOFTLinear(RotatedLayer):
    """`s ⊙ base_no_bias(x Rᵀ) + b`; parameters `skew` (m, d_in/b, b(b−1)/2) and `scale` (d_out)."""

    def __init__(self, base: nn.Module, block_size: int, factors: int):
        super().__init__(base)
        self.block_size, self.factors = fit_butterfly(self.in_features, block_size, factors)
        if (self.block_size, self.factors) != (block_size, factors):
            warnings.warn(
                f"boft: d_in={self.in_features} does not fit block_size={block_size} with {factors} butterfly "
                f"factors; this layer uses block_size={self.block_size}, {self.factors} factor(s)",
                stacklevel=2,
            )
        b = self.block_size
        factory = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.skew = nn.Parameter(torch.zeros(self.factors, self.in_features // b, b * (b - 1) // 2, **factory))
        self.scale = nn.Parameter(torch.ones(self.out_features, **factory))

    def rotation_blocks(self) -> Tensor:
        """The orthogonal blocks R_{i,j} of every factor, (m, d_in / b, b, b)."""
        return cayley(self.skew, self.block_size)

    def _apply_factors(self, x: Tensor, blocks: Tensor, transpose: bool) -> Tensor:
        """x Rᵀ (`transpose`: factors m−1 down to 0, each x ↦ x P_i blockdiag(R_iᵀ) P_iᵀ) or x R (factors 0 up to
        m−1, each x ↦ x P_i blockdiag(R_i) P_iᵀ)."""
        for i in range(self.factors - 1, -1, -1) if transpose else range(self.factors):
            x = butterfly_factor(x, blocks[i], i, transpose)
        return x

    def rotation(self) -> Tensor:
        """R as a dense d_in × d_in matrix (for tests and inspection; training never forms it)."""
        eye = torch.eye(self.in_features, dtype=torch.promote_types(self.skew.dtype, torch.float32))
        return self._apply_factors(eye.to(self.skew.device), self.rotation_blocks(), transpose=False)

    def rotation_cost(self) -> int:
        return self.factors * self.in_features * self.block_size

    def rotated_forward(self, x: Tensor) -> Tensor:
        out = nn.functional.linear(self._apply_factors(x, self.rotation_blocks(), transpose=True), self.weight)
        if self.bias is None:
            return out * self.scale
        return torch.addcmul(self.bias, out, self.scale)

    def rotate(self, weight: Tensor, inverse: bool = False) -> Tensor:
        blocks = self.rotation_blocks()
        scale = self.scale.to(weight.dtype).unsqueeze(1)
        if inverse:  # W0 = (W' / s) Rᵀ
            return self._apply_factors(weight / scale, blocks, transpose=True)
        return self._apply_factors(weight, blocks, transpose=False) * scale

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, block_size={self.block_size}, factors={self.factors}"


@dataclass
class BOFTConfig(VariantConfig):
    # No rate relative to LoRA's on a shared setup is published; like OFT, BOFT starts at R = I, s = 1 with
    # gradients of LoRA's scale, so it starts from LoRA's rate (`sweep=lr_grid` centres on it).
    lr_mult: float = 1.0
    block_size: int = 8
    """Size b of each orthogonal block in every factor (PEFT's `boft_block_size`)."""
    butterfly_factors: int = 2
    """Number m of butterfly factors (PEFT's `boft_n_butterfly_factor`); 1 is block-diagonal OFT plus the scale."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.block_size >= 2, f"variant.block_size must be >= 2, got {self.block_size}")
        check(self.butterfly_factors >= 1, f"variant.butterfly_factors must be >= 1, got {self.butterfly_factors}")
        check(self.dropout == 0, f"variant.dropout must be 0 (not implemented for BOFT), got {self.dropout}")


@VARIANTS.register("boft", config=BOFTConfig)
class BOFT(Variant):
    name = "boft"
    paper = (
        "Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization "
        "(Liu et al., ICLR 2024, arXiv 2311.06243)"
    )
    taxonomy = "rank"
    tags = ("multiplicative", "orthogonal")
    params_formula = "m·d_in·(b − 1)/2 + d_out  (b = block_size, m = butterfly_factors)"
    peft = "BOFTConfig(boft_block_size=b, boft_n_butterfly_factor=m)"

    def make_layer(self, base: nn.Module) -> BOFTLinear:
        return BOFTLinear(base, self.cfg.block_size, self.cfg.butterfly_factors)

    def layer_params(self, d_in: int, d_out: int) -> int:
        b, m = fit_butterfly(d_in, self.cfg.block_size, self.cfg.butterfly_factors)
        return m * (d_in // b) * (b * (b - 1) // 2) + d_out

    def peft_config(self, targets: list[str], head: list[str]) -> Any:
        from peft import BOFTConfig as PeftBOFTConfig

        return PeftBOFTConfig(
            boft_block_size=self.cfg.block_size,
            boft_n_butterfly_factor=self.cfg.butterfly_factors,
            target_modules=targets,
            modules_to_save=head,
        )

    def peft_export(
        self, model: nn.Module, base: nn.Module, targets: list[str], head: list[str]
    ) -> tuple[Any, dict[str, Tensor]] | None:
        setting = (self.cfg.block_size, self.cfg.butterfly_factors)
        for name, layer in named_adapter_layers(model):
            if (layer.block_size, layer.factors) != setting:
                raise UserError(
                    f"variant=boft: '{name}' fell back to block_size={layer.block_size} with {layer.factors} "
                    "factor(s) for its width, and PEFT's BOFT has one setting for every layer; use --merged"
                )
        if self.cfg.butterfly_factors > 1:
            from peft.tuners.boft.layer import get_fbd_cuda

            if get_fbd_cuda() is None:
                raise UserError(
                    f"variant=boft: PEFT builds {self.cfg.butterfly_factors} butterfly factors only with its CUDA "
                    "extension, which does not build here (it would load the adapter with one factor); export "
                    "where it builds, or use --merged"
                )
        b = self.cfg.block_size
        rows, cols = torch.triu_indices(b, b, 1)

        def tensors(layer: BOFTLinear) -> dict[str, Tensor]:
            # PEFT stores a full matrix D per block and uses S = (D − Dᵀ)/2: D = 2·(our upper triangle of S).
            full = layer.skew.new_zeros(*layer.skew.shape[:-1], b, b)
            full[..., rows, cols] = 2 * layer.skew
            return {"boft_R": full, "boft_s": layer.scale.unsqueeze(1)}

        return self.peft_config(targets, head), peft_layer_state(model, tensors)
