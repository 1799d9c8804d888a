"""MELoRA — "MELoRA: Mini-Ensemble Low-Rank Adapters for Parameter-Efficient Fine-Tuning" (Ren, Shi, Wu, Zhang,
Ren, de Rijke, Chen, Pei; ACL 2024, arXiv 2402.17263).

Update rule: n mini-LoRAs of rank r on disjoint slices of the input and the output, i.e. a block-diagonal update

    y = W0 x + b + s · [B_1 A_1 x_1; …; B_n A_n x_n],    ΔW = s · blockdiag(B_1 A_1, …, B_n A_n),    s = alpha / r

with x = [x_1; …; x_n], A_i ∈ R^{r × d_in/n}, B_i ∈ R^{d_out/n × r}. The blocks are independent, so ΔW reaches rank
n·r at the parameter cost of one rank-r LoRA: r · (d_in + d_out) in all. `r` is the mini-LoRAs' rank (the official
scripts' `rank`, e.g. 8 with n = 2 on GLUE, 1 with n = 8 on LLaMA), `n` their number.

Init: each A_i kaiming-uniform over its own fan-in d_in/n (as each official mini `nn.Linear`), B_i = 0, so the model
equals the base at step 0. Trainable parameters per layer: r · (d_in + d_out).

Computation: the A_i are stored side by side as one r × d_in matrix `lora_A` (A_i = its i-th column block) and the
B_i stacked as one d_out × r matrix `lora_B` (B_i = its i-th row block). When n divides both dimensions the n
mini-LoRAs run as two batched GEMMs over views of x, A and B; otherwise one small product per block. Never a dense
d_out × d_in update (only `delta_weight`, for merging and k×k convolutions, forms the block diagonal).

Choices: the official code splits d_in and d_out into n equal parts and fails when n does not divide them; here
blocks are uneven then, the first d mod n blocks one wider (the `torch.tensor_split` convention), so odd shapes such
as a 3×3 stem seen as 8 × 27 are adapted, still with r · (d_in + d_out) parameters. n must not exceed
min(d_in, d_out), so that no block is empty. The official scaling α_i / r_i per mini-LoRA is α / r here, all ranks
and alphas being equal in every official script.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lorafactory.errors import ConfigError, check
from lorafactory.variants.base import VARIANTS, AdapterLayer, Variant, VariantConfig, kaiming_


def block_sizes(d: int, n: int) -> list[int]:
    """Sizes of n contiguous blocks covering d, the first d mod n one larger (as `torch.tensor_split`)."""
    return [d // n + 1] * (d % n) + [d // n] * (n - d % n)


class MELoRALinear(AdapterLayer):
    """`base(x) + scaling · blockdiag(B_i A_i) x`; the parameters are `lora_A` (r × d_in, the A_i side by side) and
    `lora_B` (d_out × r, the B_i stacked)."""

    def __init__(self, base: nn.Module, r: int, n: int, scaling: float, dropout: float = 0.0):
        super().__init__(base)
        if n > min(self.in_features, self.out_features):
            raise ConfigError(
                f"variant.n={n} leaves empty blocks in a {self.out_features}×{self.in_features} weight; MELoRA needs "
                f"n <= {min(self.in_features, self.out_features)}"
            )
        self.r, self.n, self.scaling = r, n, scaling
        self.in_sizes = block_sizes(self.in_features, n)
        self.out_sizes = block_sizes(self.out_features, n)
        self.even = self.in_features % n == 0 and self.out_features % n == 0
        factory = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **factory))
        with torch.no_grad():
            for block in self.lora_A.split(self.in_sizes, dim=1):
                kaiming_(block)  # fan-in of the mini-LoRA: d_in / n
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def blocks(self) -> list[tuple[Tensor, Tensor]]:
        """(A_i, B_i) for each mini-LoRA, as views of `lora_A` and `lora_B`."""
        return list(zip(self.lora_A.split(self.in_sizes, 1), self.lora_B.split(self.out_sizes, 0), strict=True))

    def update(self, x: Tensor) -> Tensor:
        """s · blockdiag(B_i A_i) x for x of shape (T, d_in)."""
        if self.even:
            n, tokens = self.n, x.shape[0]
            h = torch.einsum("tnk,rnk->tnr", x.view(tokens, n, -1), self.lora_A.view(self.r, n, -1))
            out = torch.einsum("tnr,nor->tno", h, self.lora_B.view(n, -1, self.r))
            return out.reshape(tokens, self.out_features) * self.scaling
        parts = [(xi @ A.t()) @ B.t() for xi, (A, B) in zip(x.split(self.in_sizes, -1), self.blocks(), strict=True)]
        return torch.cat(parts, -1) * self.scaling

    def adapter_forward(self, x: Tensor) -> Tensor:
        out = self.base_forward(x)
        adapter_x = x if self.dropout is None else self.dropout(x)
        return out + self.update(adapter_x.reshape(-1, self.in_features)).view(out.shape)

    def delta_weight(self) -> Tensor:
        return torch.block_diag(*(B @ A for A, B in self.blocks())) * self.scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, n={self.n}, scaling={self.scaling:g}"


@dataclass
class MELoRAConfig(VariantConfig):
    # The official scripts train MELoRA at LoRA's learning rates (4e-4–5e-4 on RoBERTa-base GLUE, 3e-4 on LLaMA).
    n: int = 2
    """Number of mini-LoRAs (the official GLUE script's `l_num`); the update reaches rank n·r."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.n >= 1, f"variant.n must be >= 1, got {self.n}")


@VARIANTS.register("melora", config=MELoRAConfig)
class MELoRA(Variant):
    name = "melora"
    paper = (
        "MELoRA: Mini-Ensemble Low-Rank Adapters for Parameter-Efficient Fine-Tuning "
        "(Ren et al., ACL 2024, arXiv 2402.17263)"
    )
    taxonomy = "rank"
    tags = ("expansion",)
    params_formula = "r·(d_in + d_out), rank up to n·r"

    def make_layer(self, base: nn.Module) -> MELoRALinear:
        return MELoRALinear(base, self.cfg.r, self.cfg.n, self.cfg.alpha / self.cfg.r, self.cfg.dropout)

    def layer_params(self, d_in: int, d_out: int) -> int:
        return self.cfg.r * (d_in + d_out)
