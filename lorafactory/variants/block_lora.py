"""Block-LoRA — "One Head Eight Arms: Block Matrix based Low Rank Adaptation for CLIP-based Few-Shot Learning" (Zhou,
Shen, Yu, Bu, Wang; arXiv 2501.16720, under review).

Update rule: LoRA's product BA is read as a block matrix: the input is cut into n blocks x = [x_1; …; x_n] (each
m = ⌈d_in/n⌉ wide, the last one zero-padded), A into the matching column blocks [A_1 … A_n], and every down-projection
block is one shared matrix A_j = A_s ∈ R^{r×m} (the "one head" the "arms" hang from). The n block products then
collapse to additions of the input blocks:

    y = W0 x + b + s · B Σ_j A_s x_j = W0 x + b + s · B A_s (Σ_j x_j),      s = alpha / r
    ΔW = s · B [A_s A_s … A_s]  (n copies side by side, cut to d_in columns)

Init: A_s uniform in ±1/sqrt(d_in) (LoRA's A init for the equivalent LoRA's [A_s … A_s], whose fan-in is d_in:
then A_s Σ_j x_j starts at the scale of LoRA's A x), B = 0, so the model equals the base at step 0.
Trainable parameters per layer: r·d_out + r·⌈d_in/n⌉ (the head once instead of n times); the rank stays r.

Source and choices. Only the abstract (and third-party summaries) could be read; the method section, official code
(none found) and the paper's settings could not (searched: the arXiv HTML, summary sites, the code index). The
abstract says the method "partitions the original low-rank decomposition matrix of LoRA into a series of sub-matrices
while sharing all down-projection sub-matrices", which "reduces the number of training parameters" and "transforms
certain complex matrix multiplication operations into simpler matrix addition". Two readings fit those words:
- partitioning along the input (here): A's column blocks are shared, so the n products A_j x_j become one product
  of the summed input blocks: the multiplications of the down-projection turn into additions (its cost and its
  saved activation drop n-fold), and ΔW is a new structure (n equal column blocks, rank ≤ r);
- partitioning along the rank: B = [B_1 … B_n], A = [A_s; …; A_s]. Then ΔW = (Σ_i B_i) A_s, and since every B_i gets
  the same gradient from a zero start, it trains exactly as a LoRA of rank r/n: no method of its own. We take the
  first reading for that reason; it is UNCONFIRMED against the paper, as are n, the init and the scaling.
`n` defaults to 8, the title's eight arms (at CLIP's width 768, 96-wide blocks); a layer gets fewer blocks where they
would be narrower than `min_block` (16; our choice: on a 32-wide tiny model 4 blocks already stall a toy fit, 2 fit
it). s = alpha / r is LoRA's rule (the rank is r); with n = 1 the method is LoRA exactly.

Computation: the input blocks are summed (one addition pass over x), then LoRA's two thin products at width m. With
many tokens the merged-weight GEMM of lora.py runs on the tiled head (autograd sums its gradient back over the n
copies). Merging writes ΔW above into W0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorafactory.errors import check
from lorafactory.variants.base import VARIANTS, AdapterLayer, Variant, VariantConfig
from lorafactory.variants.lora import MergedLoRAFunction, merge_pays


class BlockLoRALinear(AdapterLayer):
    """`base(x) + scaling · B A_s Σ_j dropout(x)_j`; the parameters are `lora_A` (the shared head A_s, r × m) and
    `lora_B` (d_out × r), with m = ⌈d_in / n⌉."""

    def __init__(self, base: nn.Module, r: int, n: int, scaling: float, dropout: float = 0.0, min_block: int = 1):
        super().__init__(base)
        self.r, self.scaling = r, scaling
        self.n = blocks(self.in_features, n, min_block)
        self.block = -(-self.in_features // self.n)
        factory = {"dtype": base.weight.dtype, "device": base.weight.device}
        # LoRA's A init for the equivalent LoRA's down-projection [A_s … A_s]: uniform with bound 1/sqrt(d_in), its
        # fan-in. (The head's own fan-in m would make A_s Σ_j x_j √n times larger than LoRA's A x at the start.)
        bound = 1 / math.sqrt(self.in_features)
        self.lora_A = nn.Parameter(torch.empty(r, self.block, **factory).uniform_(-bound, bound))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **factory))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def fold(self, x: Tensor) -> Tensor:
        """Σ_j x_j: the n input blocks of x (..., d_in), the last zero-padded, added up (..., m)."""
        pad = self.n * self.block - self.in_features
        if pad:
            x = F.pad(x, (0, pad))
        return x.unflatten(-1, (self.n, self.block)).sum(dim=-2)

    def tiled_head(self) -> Tensor:
        """[A_s A_s … A_s] cut to d_in columns (r × d_in): the down-projection of the equivalent LoRA."""
        return self.lora_A.repeat(1, self.n)[:, : self.in_features]

    def adapter_forward(self, x: Tensor) -> Tensor:
        if self.dropout is None and merge_pays(self, x):
            return MergedLoRAFunction.apply(x, self.weight, self.bias, self.tiled_head(), self.lora_B, self.scaling)
        out = self.base_forward(x)
        h = F.linear(self.fold(x if self.dropout is None else self.dropout(x)), self.lora_A).reshape(-1, self.r)
        return torch.addmm(out.reshape(-1, self.out_features), h, self.lora_B.t(), alpha=self.scaling).view(out.shape)

    def delta_weight(self) -> Tensor:
        return self.scaling * (self.lora_B @ self.tiled_head())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, n={self.n}, scaling={self.scaling:g}"


def blocks(d_in: int, n: int, min_block: int) -> int:
    """How many input blocks a layer of width d_in gets: n, fewer where blocks would be narrower than min_block."""
    return max(1, min(n, d_in // min_block))


@dataclass
class BlockLoRAConfig(VariantConfig):
    # The paper's learning rates could not be read (see the module docstring); a LoRA of the same rank and alpha
    # with a shared head: LoRA's rate.
    lr_mult: float = 1.0
    n: int = 8
    """Number of input blocks sharing one down-projection (the "arms" of the "one head"): the title's eight."""
    min_block: int = 16
    """Fewer blocks where they would be narrower than this: a head that sees only the sum of a few inputs per block
    cannot fit (tiny models: 8 blocks of a 32-wide layer leave a 4-wide head, and the loss of a toy batch stalls)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.n >= 1, f"variant.n must be >= 1, got {self.n}")
        check(self.min_block >= 1, f"variant.min_block must be >= 1, got {self.min_block}")


@VARIANTS.register("block_lora", config=BlockLoRAConfig)
class BlockLoRA(Variant):
    name = "block_lora"
    paper = (
        "One Head Eight Arms: Block Matrix based Low Rank Adaptation for CLIP-based Few-Shot Learning "
        "(Zhou et al., arXiv 2501.16720)"
    )
    taxonomy = "rank"
    tags = ("sharing",)
    params_formula = "r·d_out + r·⌈d_in/n'⌉, n' = min(n, ⌊d_in/min_block⌋) ≥ 1"

    def make_layer(self, base: nn.Module) -> BlockLoRALinear:
        cfg = self.cfg
        return BlockLoRALinear(base, cfg.r, cfg.n, cfg.alpha / cfg.r, cfg.dropout, cfg.min_block)

    def layer_params(self, d_in: int, d_out: int) -> int:
        return self.cfg.r * (d_out + -(-d_in // blocks(d_in, self.cfg.n, self.cfg.min_block)))
