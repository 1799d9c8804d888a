"""MoRA — "MoRA: High-Rank Updating for Parameter-Efficient Fine-Tuning" (Jiang, Huang, Luo, Zhang, Chen, Wang,
Wang, Deng, Zhang, Zhuang; arXiv 2405.12130).

Update rule: one trainable square matrix M ∈ R^{r̂×r̂} between a fixed compression of the input and a fixed
decompression of the output, both non-parametric:

    y = W0 x + b + decompress(M · compress(x)),    r̂ = ⌊√((d_in + d_out)·r) + 0.5⌋   (r̂ even for `rope`)

so M has about the parameters of a rank-r LoRA but the update can reach rank min(d_in, d_out). x is first padded by
wrap-around (x_{d_in+j} = x_j) to c = ⌈d_in / r̂⌉ chunks x_1 … x_c of length r̂. Two operator pairs, as the paper's
Eq. 6 and Eq. 9 (the official code's `mora_type` 1 and 6):
- `sharing`: compress(x) = Σ_i x_i, decompress(h) = [h, h, …] cut to d_out: ΔW is M tiled (rank ≤ r̂).
- `rope`: chunk i is rotated by RoPE's position-i rotation R_i (frequencies 10000^(−2j/r̂)), M applies to every chunk,
  the outputs [M R_1 x_1, …, M R_c x_c] are concatenated and cut to d_out (repeated when shorter): ΔW is the block
  diagonal of the M R_i, of rank up to min(d_in, d_out).
There is no α/r scale (the official code sets it to 1; `alpha` is unused).

Init: M = 0 (the official code's), so the model equals the base at step 0. Trainable parameters per layer: r̂².

Computation: training applies the operators to the activations (a wrap-around gather when d_in is not a multiple of
r̂, one GEMM with M over all chunks, a tiling): no dense d_out × d_in matrix. The RoPE rotations are folded into c
copies of M (M R_i, weight-sized work) instead of rotating the activations elementwise as the official code does.
ΔW is linear in x, so `delta_weight` applies the same operator to the identity (d_in rows through the forward:
d_in·c·r̂² work and a dense d_out × d_in result); merging, and k×k convolutions (which run on W0 + ΔW), pay that.

Choices:
- Type: `kind=auto` takes `sharing` for r ≥ 128 and `rope` below. The README prescribes sharing for large ranks and
  RoPE for small ones without a boundary; its MetaMath example runs r = 8 with RoPE, its pretraining example r = 128
  with the code's default, sharing.
- Padding wraps around by index, so it also covers d_in < r̂/2 (tiny convolutions), where the official
  `x[..., :pad]` would come up short; otherwise the two agree. The official RoPE `get_delta_weight` fails on a single
  chunk; here ΔW comes from the forward operator itself, so merged and unmerged always agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lorafactory.errors import check
from lorafactory.variants.base import VARIANTS, AdapterLayer, Variant, VariantConfig

KINDS = ("auto", "sharing", "rope")
SHARING_FROM_RANK = 128
"""`kind=auto` switches from RoPE to sharing at this r (see the module docstring)."""


def mora_rank(d_in: int, d_out: int, r: int, kind: str) -> int:
    """r̂, the side of M: about as many parameters as a rank-r LoRA, even for the RoPE type (it rotates pairs)."""
    r_hat = int(math.sqrt((d_in + d_out) * r) + 0.5)
    return r_hat // 2 * 2 if kind == "rope" else r_hat


class MoRALinear(AdapterLayer):
    """`base(x) + decompress(M compress(x))`; the parameter is `mora_M` (r̂ × r̂)."""

    def __init__(self, base: nn.Module, r: int, kind: str, dropout: float = 0.0):
        super().__init__(base)
        self.operator = kind  # not `kind`: AdapterLayer's says linear, pointwise or conv
        self.r_hat = mora_rank(self.in_features, self.out_features, r, kind)
        self.chunks = -(-self.in_features // self.r_hat)
        factory = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.mora_M = nn.Parameter(torch.zeros(self.r_hat, self.r_hat, **factory))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        padded = self.chunks * self.r_hat
        if padded > self.in_features:  # wrap-around padding: input j of the padded vector is x_{j mod d_in}
            self.register_buffer("wrap", torch.arange(padded, device=factory["device"]) % self.in_features, False)
        else:
            self.wrap = None
        if kind == "rope":  # RoPE's rotation of chunk i by angles i·θ_j, θ_j = 10000^(−2j/r̂), as the official code
            inv_freq = 1.0 / 10000 ** (torch.arange(0, self.r_hat, 2, dtype=torch.float32) / self.r_hat)
            angles = torch.outer(torch.arange(self.chunks, dtype=torch.float32), inv_freq).repeat(1, 2)
            self.register_buffer("cos", angles.cos().to(**factory), False)
            self.register_buffer("sin", angles.sin().to(**factory), False)

    def rotated_M(self) -> Tensor:
        """M R_i for every chunk i, (c, r̂, r̂). R_i x = x ⊙ cos_i + P x ⊙ sin_i with P x = [−x_{r̂/2:}, x_{:r̂/2}], so
        M R_i = M diag(cos_i) + (M P) diag(sin_i), M P = [M_{:, r̂/2:}, −M_{:, :r̂/2}]: weight-sized work (c·r̂² =
        d_in·r̂) in place of four elementwise passes over the activations."""
        M, half = self.mora_M, self.r_hat // 2
        return M * self.cos.unsqueeze(1) + torch.cat((M[:, half:], -M[:, :half]), 1) * self.sin.unsqueeze(1)

    def update(self, x: Tensor) -> Tensor:
        """decompress(M compress(x)) for x of shape (..., d_in): the adapter's contribution, (..., d_out)."""
        lead = x.shape[:-1]
        if self.wrap is not None:
            x = x[..., self.wrap]
        chunks = x.reshape(*lead, self.chunks, self.r_hat)
        if self.operator == "sharing":
            h = chunks.sum(-2) @ self.mora_M.t()
        else:
            h = torch.einsum("...cr,csr->...cs", chunks, self.rotated_M())
            h = h.reshape(*lead, self.chunks * self.r_hat)[..., : self.out_features]
        reps = -(-self.out_features // h.shape[-1])
        return (h.repeat(*([1] * len(lead)), reps) if reps > 1 else h)[..., : self.out_features]

    def adapter_forward(self, x: Tensor) -> Tensor:
        return self.base_forward(x) + self.update(x if self.dropout is None else self.dropout(x))

    def delta_weight(self) -> Tensor:
        eye = torch.eye(self.in_features, dtype=self.mora_M.dtype, device=self.mora_M.device)
        return self.update(eye).t()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r_hat={self.r_hat}, type={self.operator}"


@dataclass
class MoRAConfig(VariantConfig):
    # The paper and the official scripts run MoRA at LoRA's learning rates (3e-4 on MetaMath, 5e-4 pretraining).
    kind: str = "auto"
    """Compression/decompression operators: `sharing` (Eq. 6), `rope` (Eq. 9), or `auto` (rope for r < 128)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.kind in KINDS, f"variant.kind must be one of {', '.join(KINDS)}, got '{self.kind}'")

    @property
    def resolved_kind(self) -> str:
        if self.kind != "auto":
            return self.kind
        return "sharing" if self.r >= SHARING_FROM_RANK else "rope"


@VARIANTS.register("mora", config=MoRAConfig)
class MoRA(Variant):
    name = "mora"
    paper = "MoRA: High-Rank Updating for Parameter-Efficient Fine-Tuning (Jiang et al., arXiv 2405.12130)"
    taxonomy = "rank"
    tags = ("expansion",)
    params_formula = "r̂², r̂ = ⌊√((d_in + d_out)·r) + 0.5⌋ (even for rope)"

    def make_layer(self, base: nn.Module) -> MoRALinear:
        return MoRALinear(base, self.cfg.r, self.cfg.resolved_kind, self.cfg.dropout)

    def layer_params(self, d_in: int, d_out: int) -> int:
        return mora_rank(d_in, d_out, self.cfg.r, self.cfg.resolved_kind) ** 2

    def summary(self, model: nn.Module) -> dict[str, Any]:
        return {"kind": self.cfg.resolved_kind}
