"""OFT — "Controlling Text-to-Image Diffusion by Orthogonal Finetuning" (Qiu et al., NeurIPS 2023, arXiv 2306.07280).

Update rule: the frozen weight is multiplied by a block-diagonal orthogonal matrix acting on the input side,

    W' = W0 R,   R = blockdiag(R_1, ..., R_{d_in/b}),   R_i = (I + S_i)(I − S_i)⁻¹   (Cayley),   y = W' x + b

with S_i a skew-symmetric b × b matrix stored as its b(b−1)/2 upper-triangle entries. This is how PEFT applies it:
PEFT rotates the input by `oft_mat = (I − S)(I + S)⁻¹ = Rᵀ` and calls the base layer, i.e. W' = W0 oft_matᵀ = W0 R.
R is orthogonal for any S, so W' keeps the singular values of W0 (and the angles between its rows).
Init: S = 0, so R = I and the model equals the base at step 0.
Trainable parameters per layer: (d_in / b) · b(b−1)/2 = d_in · (b − 1) / 2.

Choices where the paper and PEFT differ or leave room:
- The Cayley map is exact (a batched b × b solve per step). PEFT 0.21.2's default is a 5-term Neumann series
  (`use_cayley_neumann=True`), which is only approximately orthogonal; `peft_config` asks PEFT for its exact
  Cayley (`use_cayley_neumann=False`), where the two compute the same function (parity test).
- Block size: `block_size` (PEFT's `oft_block_size`, default 32). A layer whose d_in it does not divide uses the
  divisor of d_in nearest to it (the smaller on a tie; d_in itself when the block is wider), PEFT's own rule, with a
  warning. tiny-cnn's stem, viewed as 8 × 27, gets one 27 × 27 block at the default.
- `variant.r` is not used: OFT's budget is the block size. Constrained OFT (COFT), block sharing and PEFT's
  multiplicative block dropout are not implemented; `variant.dropout` must stay 0.

Computation: the layer rotates its input block by block, x ↦ x Rᵀ (d_in · b per token, one batched matmul), and runs
the frozen layer on the result, so the backward is the frozen layer's input gradient plus the same small blockwise
products; the Cayley solves cost (d_in / b) · b³ per step. PEFT does the same on the input side. When the layer is
small for the number of tokens (d_out < ~6b, as in the tiny test models), one GEMM with W0 R is cheaper, including
its dense weight gradient, and is used instead (`RotatedLayer.merge_pays`; tests check both paths agree). k×k
convolutions (weight viewed as d_out × in·k·k) run with W0 R. Merging writes W0 R (in float32 at least) and
unmerging multiplies by Rᵀ, exact to round-off because R is orthogonal.

Measured (docs/bench.md: MiniLM-L6, every linear layer, b = 32): a step costs 1.20× the frozen model's forward +
backward, against 1.26× for PEFT's OFT in the same process.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lorafactory.errors import check
from lorafactory.variants.base import VARIANTS, AdapterLayer, Variant, VariantConfig, peft_layer_state


def fit_block_size(d: int, block: int) -> int:
    """The block size used on a width `d`: `block` when it divides d, else the divisor of d nearest to it (the smaller
    one on a tie), which is d itself when block > d. PEFT's OFT adjusts the same way."""
    if d % block == 0:
        return block
    return min((k for k in range(1, d + 1) if d % k == 0), key=lambda k: (abs(k - block), k))


def cayley(skew: Tensor, block: int) -> Tensor:
    """Orthogonal blocks R = (I + S)(I − S)⁻¹ (shape (..., b, b)) from the upper-triangle entries `skew`
    (..., b(b−1)/2) of skew-symmetric S; computed in float32 at least (the solve has no half-precision kernel)."""
    dtype = torch.promote_types(skew.dtype, torch.float32)
    rows, cols = torch.triu_indices(block, block, 1, device=skew.device)
    upper = skew.new_zeros((*skew.shape[:-1], block, block), dtype=dtype)
    upper[..., rows, cols] = skew.to(dtype)
    S = upper - upper.transpose(-1, -2)
    eye = torch.eye(block, dtype=dtype, device=skew.device)
    return torch.linalg.solve(eye - S, eye + S)  # (I − S)⁻¹(I + S) = (I + S)(I − S)⁻¹: the two factors commute


def block_matmul(x: Tensor, blocks: Tensor, transpose: bool = False) -> Tensor:
    """`x` (..., n·b) times blockdiag(blocks) (`blocks` (n, b, b)), or times its transpose, one block at a time."""
    n, b, _ = blocks.shape
    spec = "...nk,njk->...nj" if transpose else "...nk,nkj->...nj"
    return torch.einsum(spec, x.reshape(*x.shape[:-1], n, b), blocks.to(x.dtype)).reshape(x.shape)


class RotatedLayer(AdapterLayer):
    """A layer whose adapted weight is its frozen weight times an orthogonal matrix (times an output scale, BOFT):
    W' = rotate(W0). Subclasses implement `rotate(weight, inverse)` (W ↦ W' and back), `rotated_forward(x)` (the
    layer applied by rotating its input) and `rotation_cost()`.
    Merging is multiplicative: the base weight becomes W' exactly and unmerging applies the inverse, never a
    subtraction of ΔW."""

    def rotate(self, weight: Tensor, inverse: bool = False) -> Tensor:
        """W ↦ W' (or, `inverse`, W' ↦ W) for a d_out × d_in matrix, differentiable in the adapter's parameters."""
        raise NotImplementedError

    def rotated_forward(self, x: Tensor) -> Tensor:
        """W' x + b computed by rotating x (linear form), never forming W'."""
        raise NotImplementedError

    def rotation_cost(self) -> int:
        """Multiply-adds to rotate one d_in vector."""
        raise NotImplementedError

    def merge_pays(self, x: Tensor) -> bool:
        """Whether running one GEMM with W' = rotate(W0) is cheaper than rotating every input: rotating the input
        costs c per token three times (forward, input and parameter gradients), counted twice because its small
        batched products run at about half the rate of one large GEMM on CPU (measured on the tiny models' widths);
        the merged weight costs the dense weight gradient gᵀx (tokens · d_out · d_in) plus rotating W0's d_out rows
        twice. Small layers with many tokens (the tiny test models) merge; MiniLM's layers and short inputs rotate."""
        tokens, c = x.numel() // self.in_features, self.rotation_cost()
        return tokens * self.out_features * self.in_features + 2 * self.out_features * c < 6 * tokens * c

    def adapter_forward(self, x: Tensor) -> Tensor:
        if self.merge_pays(x):
            return nn.functional.linear(x, self.rotate(self.weight), self.bias)
        return self.rotated_forward(x)

    def original_weight(self) -> Tensor:
        if not self.merged:
            return self.weight
        return self.rotate(self.weight.to(torch.promote_types(self.weight.dtype, torch.float32)), inverse=True)

    def delta_weight(self) -> Tensor:
        weight = self.original_weight()
        return self.rotate(weight) - weight

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        self.write_weight(self.rotate(self.weight.to(torch.promote_types(self.weight.dtype, torch.float32))))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.write_weight(self.original_weight())
        self.merged = False


class OFTLinear(RotatedLayer):
    """`base(x Rᵀ)` with R block-diagonal orthogonal; the parameter `skew` (d_in/b, b(b−1)/2) holds the generators."""

    def __init__(self, base: nn.Module, block_size: int):
        super().__init__(base)
        self.block_size = fit_block_size(self.in_features, block_size)
        if self.block_size != block_size:
            warnings.warn(
                f"oft: block_size={block_size} does not divide d_in={self.in_features}; this layer uses "
                f"{self.block_size}",
                stacklevel=2,
            )
        b = self.block_size
        factory = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.skew = nn.Parameter(torch.zeros(self.in_features // b, b * (b - 1) // 2, **factory))

    def rotation_blocks(self) -> Tensor:
        """The orthogonal blocks R_i, (d_in / b, b, b)."""
        return cayley(self.skew, self.block_size)

    def rotated_forward(self, x: Tensor) -> Tensor:
        return self.base_forward(block_matmul(x, self.rotation_blocks(), transpose=True))

    def rotation_cost(self) -> int:
        return self.in_features * self.block_size

    def rotate(self, weight: Tensor, inverse: bool = False) -> Tensor:
        return block_matmul(weight, self.rotation_blocks(), transpose=inverse)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, block_size={self.block_size}"


@dataclass
class OFTConfig(VariantConfig):
    # Neither the paper nor PEFT gives a rate relative to LoRA's on a shared setup; OFT starts at R = I and moves
    # with gradients of the same scale as LoRA's, so it starts from LoRA's rate (`sweep=lr_grid` centres on it).
    lr_mult: float = 1.0
    block_size: int = 32
    """Size b of the orthogonal blocks (PEFT's `oft_block_size` and default); see the module docstring for widths it
    does not divide."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.block_size >= 2, f"variant.block_size must be >= 2, got {self.block_size}")
        check(self.dropout == 0, f"variant.dropout must be 0 (not implemented for OFT), got {self.dropout}")


@VARIANTS.register("oft", config=OFTConfig)
class OFT(Variant):
    name = "oft"
    paper = "Controlling Text-to-Image Diffusion by Orthogonal Finetuning (Qiu et al., NeurIPS 2023, arXiv 2306.07280)"
    taxonomy = "rank"
    tags = ("multiplicative", "orthogonal")
    params_formula = "d_in·(b − 1)/2  (b = block_size)"
    peft = "OFTConfig(oft_block_size=b, use_cayley_neumann=False)"

    def make_layer(self, base: nn.Module) -> OFTLinear:
        return OFTLinear(base, self.cfg.block_size)

    def layer_params(self, d_in: int, d_out: int) -> int:
        b = fit_block_size(d_in, self.cfg.block_size)
        return d_in // b * (b * (b - 1) // 2)

    def peft_config(self, targets: list[str], head: list[str]) -> Any:
        from peft import OFTConfig as PeftOFTConfig

        return PeftOFTConfig(
            r=0,
            oft_block_size=self.cfg.block_size,
            use_cayley_neumann=False,
            target_modules=targets,
            modules_to_save=head,
        )

    def peft_export(
        self, model: nn.Module, base: nn.Module, targets: list[str], head: list[str]
    ) -> tuple[Any, dict[str, Tensor]] | None:
        # PEFT's OFT stores the same upper-triangle generators, and picks the same block size on every width.
        return self.peft_config(targets, head), peft_layer_state(model, lambda layer: {"oft_R.weight": layer.skew})
