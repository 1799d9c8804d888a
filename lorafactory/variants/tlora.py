"""TLoRA — "Transformed Low-rank Adaptation via Tensor Decomposition and Its Applications to Text-to-image Models"
(Tao, Takida, Murata, Zhao, Mitsufuji; ICCV 2025, arXiv 2501.08727). Not "TLoRA: Tri-Matrix LoRA" (arXiv 2504.18735)
nor the timestep-dependent "T-LoRA".

Update rule: a full-rank dense transform T (d_in × d_in) of the frozen weight plus a compact residual Δ,

    y = (W0 T + s·Δ) x + b,    s = alpha / √r

with both factors tensor decompositions over a factorisation of the widths, d_in = I_1·…·I_D, d_out = J_1·…·J_D
(row-major multi-indices, the first factor most significant):
- T is a tensor-ring matrix (TRM) of ring rank R_T = `transform_rank`: D cores A_k ∈ R^{I_k×I_k×R_T×R_T},
  T[(i_1…i_D), (j_1…j_D)] = tr(A_1[i_1, j_1] ⋯ A_D[i_D, j_D]);
- Δ is a tensor ring (TR) of rank R = `r` with 2D cores, out cores G_k ∈ R^{J_k×R×R} then in cores H_k ∈ R^{I_k×R×R},
  Δ[(j_1…j_D), (i_1…i_D)] = tr(G_1[j_1] ⋯ G_D[j_D] H_1[i_1] ⋯ H_D[i_D]).
DoRA (a diagonal T plus LoRA) is the special case the paper starts from.

Init: every A_k[:, :, a, b] = I/R_T, so T = I exactly (the paper's Proposition 1); G_1 = 0 and the other residual
cores Gaussian (the official code's scales: in cores std 1/√I_k, out cores std √J_k / R²), so Δ = 0 and the model
equals the base at step 0. Trainable parameters per layer: R_T²·Σ_k I_k² + R²·(Σ_k J_k + Σ_k I_k).

Sources: the paper (read through a stored reproduction note and an ICCV-2025 paper note, which give the TRM/TR
definitions, Proposition 1 and the zero-init of one TR core) and the official code
(github.com/taozerui/tlora_diffusion, read in the stored copy marcocst/PEFTDiff: `TTMLoRALinearLayer`). Choices:
- T acts on the input side (W0 T, T is d_in × d_in), the residual is scaled by alpha/√r with alpha = 1 (the code's
  `use_rslora=True`, `--alpha 1.0`), and neither T nor the factorisation is shared between layers, as in the code.
- Defaults are the paper's headline TLoRA(2, 6): R_T = 2, R = 6 (this count on the code's tensor shapes gives its
  0.40M-parameter SD-1.5 row; 0.39M on ours), and D = 3 (`order`; the code's shapes are all 3-way, 768 = 8·8·12).
  The paper's TLoRA*(2, 4) (0.94M: this transform's 0.14M plus its LoRA r = 4's 0.80M) has a LoRA residual instead
  (the code's `addition_part='lora'`, also its subject-driven script's default); not implemented here.
- Widths are factored here, not looked up in the code's table: the D factors with the fewest TRM parameters
  (smallest Σ I_k²), which gives the code's shapes for 640, 768, 1280 and 2048 ([5, 8, 8] for 320 where the code has
  [4, 8, 10]). A width whose best factors are unbalanced — a factor above twice the D-th root, as for primes
  (13 = 1·1·13) — is padded to the next width that factors well (13 → 16 = 2·2·4), and T and Δ are the leading
  d_in × d_in and d_out × d_in blocks of the padded TRM and TR (T stays I at init). tiny-cnn's 8 × 27 stem uses
  2·2·2 and 3·3·3 as they are.
- The paper's optional identity/orthogonality regulariser on the TRM cores is not implemented (the released
  subject-driven code does not use it); dropout is not part of the method.

Computation: Δ = U Vᵀ has rank ≤ R² (U ∈ R^{d_out×R²} from the out cores' ring products, V ∈ R^{d_in×R²} from the
in cores'). T is formed densely from its cores each step (d_in²·R_T² multiply-adds, never a d_in²·R_T² tensor): the
method needs this dense product, W0 T, in some form every step. Then, whichever is cheaper
(`TLoRALinear.merge_pays`): either transform the input and run the frozen layer, y = W0 (T x) + s·U(Vᵀx) — about
3·tokens·d_in² extra per step (forward, ∂T, ∂x) and the residual as two thin GEMMs, the choice for wide layers and
few tokens; or form W' = W0 T + s·U Vᵀ (d_out·d_in² twice, forward and ∂T = W0ᵀ ∂W') and run one GEMM, whose dense
weight gradient costs tokens·d_in·d_out — the choice when tokens exceed about d_in, as in MiniLM's and the tiny
models' layers at training batch sizes. The official code always forms W0 T. Applying T through its cores
(tokens·d_in·R_T²·Σ I_k) would save flops on very wide layers but keep R_T²-times-activation-sized intermediates
for the backward; not done. Merging writes W0 T + s·Δ; W0 is kept aside while merged (T has no cheap exact
inverse), so unmerging restores it bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from itertools import count

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorafactory.errors import check
from lorafactory.variants.base import VARIANTS, AdapterLayer, Variant, VariantConfig


def _factorisations(d: int, order: int, low: int = 1):
    """Every non-decreasing tuple of `order` factors ≥ `low` whose product is d."""
    if order == 1:
        if d >= low:
            yield (d,)
        return
    for f in range(low, int(round(d ** (1 / order))) + 2):
        if d % f == 0 and f**order <= d:
            for rest in _factorisations(d // f, order - 1, f):
                yield (f, *rest)


@cache
def tensor_shape(d: int, order: int) -> tuple[int, tuple[int, ...]]:
    """(d', factors): the width d' ≥ d the decompositions use and its `order` factors (ascending), those with the
    smallest Σ f² (the TRM's core size per R_T²). d' = d unless d's best factors have one above twice the
    order-th root (primes and near-primes); then the next width that factors that evenly."""
    for width in count(d):
        best = min(_factorisations(width, order), key=lambda fs: (sum(f * f for f in fs), fs))
        if best[-1] <= 2 * width ** (1 / order) + 1e-9:
            return width, best
    raise AssertionError("unreachable: powers of two always factor evenly")


def trm_matrix(cores: list[Tensor] | nn.ParameterList) -> Tensor:
    """The tensor-ring matrix of `cores` (each (I_k, J_k, R, R)): T[(i…), (j…)] = tr(A_1[i_1, j_1] ⋯ A_D[i_D, j_D]),
    shape (Π I_k, Π J_k). The ring is closed on the last core, so no (ΠI)·(ΠJ)·R² tensor is ever formed."""
    left = cores[0]
    for core in cores[1:-1]:
        p, q, r = left.shape[0] * core.shape[0], left.shape[1] * core.shape[1], core.shape[-1]
        left = torch.einsum("pqab,ijbc->piqjac", left, core).reshape(p, q, r, r)
    if len(cores) == 1:
        return left.diagonal(dim1=-2, dim2=-1).sum(-1)
    last = cores[-1]
    out = torch.einsum("pqab,ijba->piqj", left, last)
    return out.reshape(left.shape[0] * last.shape[0], left.shape[1] * last.shape[1])


def ring_chain(cores: list[Tensor] | nn.ParameterList) -> Tensor:
    """The products G_1[i_1] ⋯ G_D[i_D] of 3-way cores (each (I_k, R, R)), shape (Π I_k, R, R)."""
    out = cores[0]
    for core in cores[1:]:
        i, r = core.shape[0], core.shape[1]
        # One GEMM (P·R) × R × (I·R), then (p, a, i, c) → (p, i, a, c): a third cheaper than einsum on small cores.
        prod = out.reshape(-1, r) @ core.transpose(0, 1).reshape(r, i * r)
        out = prod.reshape(-1, r, i, r).transpose(1, 2).reshape(-1, r, r)
    return out


class TLoRALinear(AdapterLayer):
    """`base(T x) + scaling · Δ x`: T a tensor-ring matrix (`transform_cores`), Δ a tensor ring (`residual_out` then
    `residual_in` cores) on (possibly padded) factorisations of d_in and d_out."""

    def __init__(self, base: nn.Module, r: int, transform_rank: int, order: int, scaling: float):
        super().__init__(base)
        self.r, self.transform_rank, self.scaling = r, transform_rank, scaling
        self.in_width, self.in_factors = tensor_shape(self.in_features, order)
        self.out_width, self.out_factors = tensor_shape(self.out_features, order)
        self._unmerged: Tensor | None = None
        factory = {"dtype": base.weight.dtype, "device": base.weight.device}
        rt = transform_rank
        self.transform_cores = nn.ParameterList(
            nn.Parameter((torch.eye(i, **factory) / rt)[:, :, None, None].repeat(1, 1, rt, rt))
            for i in self.in_factors
        )
        out_cores = [torch.randn(j, r, r, **factory) * (j**0.5 / r**2) for j in self.out_factors]
        out_cores[0].zero_()  # Δ = 0 at init; the other cores carry the gradient to this one
        self.residual_out = nn.ParameterList(nn.Parameter(c) for c in out_cores)
        self.residual_in = nn.ParameterList(
            nn.Parameter(torch.randn(i, r, r, **factory) / i**0.5) for i in self.in_factors
        )

    def transform(self) -> Tensor:
        """T (d_in × d_in), the leading block of the padded TRM."""
        return trm_matrix(self.transform_cores)[: self.in_features, : self.in_features]

    def residual_factors(self) -> tuple[Tensor, Tensor]:
        """(U, V) with Δ = U Vᵀ, shapes (d_out, R²) and (d_in, R²): U[j, (a, b)] = (G_1[j_1] ⋯ G_D[j_D])[a, b] and
        V[i, (a, b)] = (H_1[i_1] ⋯ H_D[i_D])[b, a], since tr(P Q) = Σ_ab P[a, b] Q[b, a]."""
        rr = self.r * self.r
        U = ring_chain(self.residual_out).reshape(self.out_width, rr)[: self.out_features]
        V = ring_chain(self.residual_in).transpose(1, 2).reshape(self.in_width, rr)[: self.in_features]
        return U, V

    def residual(self) -> Tensor:
        """Δ (d_out × d_in), unscaled."""
        U, V = self.residual_factors()
        return U @ V.t()

    def merge_pays(self, x: Tensor) -> bool:
        """Whether one GEMM with W0 T + s·U Vᵀ costs less than transforming every input (see the module docstring):
        3·tokens·(d_in² + R²·(d_in + d_out)) against 2·d_out·d_in² + tokens·d_in·d_out + 3·R²·d_in·d_out."""
        tokens, d_in, d_out, rr = x.numel() // self.in_features, self.in_features, self.out_features, self.r**2
        input_side = 3 * tokens * (d_in * d_in + rr * (d_in + d_out))
        merged = 2 * d_out * d_in * d_in + tokens * d_in * d_out + 3 * rr * d_in * d_out
        return merged < input_side

    def adapter_forward(self, x: Tensor) -> Tensor:
        T = self.transform().to(x.dtype)
        U, V = (f.to(x.dtype) for f in self.residual_factors())
        if self.merge_pays(x):
            weight = torch.addmm(self.weight.to(x.dtype) @ T, U, V.t(), alpha=self.scaling)
            return F.linear(x, weight, self.bias)
        out = self.base_forward(F.linear(x, T))
        h = F.linear(x, V.t()).reshape(-1, V.shape[1])
        return torch.addmm(out.reshape(-1, self.out_features), h, U.t(), alpha=self.scaling).view(out.shape)

    def adapted_weight(self, weight: Tensor) -> Tensor:
        """W T + s·Δ for a d_out × d_in weight W, differentiable in the cores."""
        return weight @ self.transform().to(weight.dtype) + self.scaling * self.residual().to(weight.dtype)

    def original_weight(self) -> Tensor:
        return self.weight if self._unmerged is None else self._unmerged

    def delta_weight(self) -> Tensor:
        weight = self.original_weight()
        return self.adapted_weight(weight) - weight

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        weight = self.weight
        self._unmerged = weight.detach().clone()
        self.write_weight(self.adapted_weight(weight.to(torch.promote_types(weight.dtype, torch.float32))))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.write_weight(self._unmerged)
        self._unmerged = None
        self.merged = False

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, r={self.r}, transform_rank={self.transform_rank}, "
            f"in_factors={self.in_factors}, out_factors={self.out_factors}, scaling={self.scaling:g}"
        )


@dataclass
class TLoRAConfig(VariantConfig):
    r: int = 6  # the residual's tensor-ring rank R: TLoRA(2, 6), the paper's headline setting
    alpha: float = 1.0  # the official code's `--alpha`: s = alpha / √r (its `use_rslora=True`)
    # The official subject-driven scripts train TLoRA at 1e-4 and LoRA at 5e-5 (run_tlora.sh, run_lora.sh).
    lr_mult: float = 2.0
    transform_rank: int = 2
    """Ring rank R_T of the transform's tensor-ring matrix (the paper's TLoRA(R_T, R)); 1 makes T a Kronecker
    product of D small matrices (the code's `transform_rank=1`)."""
    order: int = 3
    """Number D of factors each width is split into (d_in = I_1·…·I_D), for T and for Δ."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.transform_rank >= 1, f"variant.transform_rank must be >= 1, got {self.transform_rank}")
        check(self.order >= 2, f"variant.order must be >= 2 (one factor is a dense d × d matrix), got {self.order}")
        check(self.dropout == 0, f"variant.dropout must be 0 (not part of TLoRA), got {self.dropout}")


@VARIANTS.register("tlora", config=TLoRAConfig)
class TLoRA(Variant):
    name = "tlora"
    paper = (
        "Transformed Low-rank Adaptation via Tensor Decomposition and Its Applications to Text-to-image Models "
        "(Tao et al., ICCV 2025, arXiv 2501.08727)"
    )
    taxonomy = "rank"
    tags = ("expansion", "multiplicative", "tensor")
    params_formula = "R_T²·Σ I_k² + r²·(Σ J_k + Σ I_k),  d_in = Π I_k, d_out = Π J_k (order factors each)"
    memory_note = (
        "forms the dense d_in × d_in transform T of each adapted layer every step, and, when tokens outnumber ~d_in, "
        "the dense W0·T and its gradient (d_out × d_in)"
    )

    def make_layer(self, base: nn.Module) -> TLoRALinear:
        cfg = self.cfg
        return TLoRALinear(base, cfg.r, cfg.transform_rank, cfg.order, cfg.alpha / cfg.r**0.5)

    def layer_params(self, d_in: int, d_out: int) -> int:
        cfg = self.cfg
        _, ins = tensor_shape(d_in, cfg.order)
        _, outs = tensor_shape(d_out, cfg.order)
        return cfg.transform_rank**2 * sum(i * i for i in ins) + cfg.r**2 * (sum(outs) + sum(ins))
