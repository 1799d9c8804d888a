"""SLTrain — "SLTrain: a sparse plus low-rank approach for parameter and memory efficient pretraining" (Han, Li, Huang,
Hong, Takeda, Jawanpuria, Mishra, NeurIPS 2024, arXiv 2406.02214), adapted to fine-tuning.

Update rule: a low-rank term plus a sparse term on a fixed random support,

    ΔW = s · B A + S,   y = (W0 + ΔW) x + b,   s = alpha / r,   S ∈ R^{d_out×d_in} zero outside the support Ω

with |Ω| = max(1, ⌊δ · d_out · d_in⌋) entries (δ = `density`) drawn once per layer, uniformly without replacement
(the official `randperm(d_out·d_in)[:nnz]`, sorted); the values of S on Ω train, Ω never changes.
Init: A kaiming-uniform, B = 0, S = 0, so the model equals the base at step 0.
Trainable parameters per layer: r · (d_in + d_out) + |Ω|.

Adapting a pre-training method (the paper's W = BA + S has no frozen W0; VARIANTS.md §14): W0 stays frozen and
ΔW = s·BA + S is the update, with S's values at 0 where the paper draws them U(±1/√d_in), since here S is a change of
a pretrained weight, not the weight. Other choices:
- δ = 0.03, the paper's runs from 60M to 1B parameters (its module default is 0.01, 7B uses 0.05); s = alpha/r as
  LoRA (the paper pre-trains at alpha = 32 with r = 128, alpha/r < 1).
- Support: drawn from `seed` and the layer's position among the adapted layers, and kept as a buffer of flat indices
  (saved with the adapter), so a saved adapter brings its own support into a fresh process.
- The paper's optional trainable tanh-scaled s and its dropout (accepted but never applied) are not implemented;
  `variant.dropout` drops the input of the update (both terms).

Computation: S is never stored densely. With many tokens and no dropout the layer multiplies by the merged weight
W0 + s·BA + S in one GEMM, as LoRA's merged path does, S scattered into it (|Ω| writes); the backward recomputes that
weight for the input gradient, takes A's and B's gradients from rank-r products, and S's from a sampled dense-dense
product (SDDMM: gᵀx evaluated on Ω only, `torch.sparse.sampled_addmm`), never the dense ∂L/∂W the official kernel
forms and gathers. Otherwise (few tokens, dropout) W0 x + s·B(A x) + S x with S x, Sᵀ g as CSR sparse-dense products.
CPU sparse kernels have no half-precision types: there the sparse products run in float32.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorafactory.errors import check
from lorafactory.variants.base import (
    HEAD_NAMES,
    VARIANTS,
    AdapterLayer,
    AutocastFunction,
    Variant,
    VariantConfig,
    kaiming_,
)
from lorafactory.variants.lora import merge_pays

# torch says once per process that CSR support is "beta"; the products used here are tested against dense ones.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state", category=UserWarning)


def support_size(d_out: int, d_in: int, density: float) -> int:
    """|Ω| = ⌊δ · d_out · d_in⌋, at least 1 (a layer too small for one entry still gets one)."""
    return max(1, int(density * d_out * d_in))


def draw_support(d_out: int, d_in: int, density: float, seed: int) -> Tensor:
    """Sorted flat indices (row-major) of |Ω| distinct entries, drawn as the official code does."""
    generator = torch.Generator().manual_seed(seed)
    flat = torch.randperm(d_out * d_in, generator=generator)[: support_size(d_out, d_in, density)]
    return flat.sort().values


def sparse_dtype(t: Tensor) -> torch.dtype:
    """CPU CSR kernels (MKL) take float32 and float64 only."""
    if t.device.type == "cpu" and t.dtype not in (torch.float32, torch.float64):
        return torch.float32
    return t.dtype


class Support:
    """The CSR index arrays of S (d_out × d_in) and of Sᵀ for a fixed support given as sorted flat indices: the
    values of S are in flat order, which is S's CSR order; Sᵀ takes them permuted (`t_order`)."""

    def __init__(self, flat: Tensor, d_out: int, d_in: int):
        rows, cols = flat // d_in, flat % d_in
        self.flat, self.shape = flat, (d_out, d_in)
        self.cols = cols
        self.crow = F.pad(torch.bincount(rows, minlength=d_out).cumsum(0), (1, 0))
        self.t_order = torch.argsort(cols * d_out + rows)
        self.t_cols = rows[self.t_order]
        self.t_crow = F.pad(torch.bincount(cols, minlength=d_in).cumsum(0), (1, 0))

    def matrix(self, values: Tensor) -> Tensor:
        return torch.sparse_csr_tensor(self.crow, self.cols, values, self.shape, check_invariants=False)

    def transposed(self, values: Tensor) -> Tensor:
        shape = self.shape[::-1]
        return torch.sparse_csr_tensor(self.t_crow, self.t_cols, values[self.t_order], shape, check_invariants=False)

    def sampled_gradient(self, g: Tensor, x: Tensor, dtype: torch.dtype) -> Tensor:
        """(gᵀ x) at the support, in value order, without forming gᵀ x (SDDMM); g (T × d_out), x (T × d_in)."""
        dt = sparse_dtype(g)
        pattern = self.matrix(torch.zeros(self.flat.numel(), dtype=dt, device=g.device))
        return torch.sparse.sampled_addmm(pattern, g.t().to(dt), x.to(dt), beta=0.0).values().to(dtype)


class SparseProduct(AutocastFunction):
    """x Sᵀ for S on a fixed support with trainable `values`; x (T × d_in) → (T × d_out)."""

    @staticmethod
    def forward(ctx, x: Tensor, values: Tensor, support: Support) -> Tensor:
        ctx.save_for_backward(x, values)
        ctx.support = support
        dt = sparse_dtype(x)
        return torch.sparse.mm(support.matrix(values.to(dt)), x.t().to(dt)).t().to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, values = ctx.saved_tensors
        support = ctx.support
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            dt = sparse_dtype(grad)
            # (Sᵀ gᵀ)ᵀ, made contiguous: a transposed gradient would change how later kernels round.
            grad_x = torch.sparse.mm(support.transposed(values.to(dt)), grad.t().to(dt)).t().to(x.dtype).contiguous()
        if ctx.needs_input_grad[1]:
            grad_values = support.sampled_gradient(grad, x, values.dtype)
        return grad_x, grad_values, None


def merged_weight(weight: Tensor, A: Tensor, B: Tensor, values: Tensor, support: Support, s: float) -> Tensor:
    """W0 + s·B A + S as one new dense matrix (S scattered in, |Ω| writes)."""
    merged = torch.addmm(weight, B, A, alpha=s)
    merged.view(-1).index_add_(0, support.flat, values.to(merged.dtype))
    return merged


class MergedSLTrainFunction(AutocastFunction):
    """y = x (W + s·B A + S)ᵀ + b in one GEMM; gradients for x, A, B and S's values (W and b are frozen)."""

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        A: Tensor,
        B: Tensor,
        values: Tensor,
        support: Support,
        s: float,
    ) -> Tensor:
        ctx.save_for_backward(x, weight, A, B, values)
        ctx.support, ctx.scaling = support, s
        return F.linear(x, merged_weight(weight, A, B, values, support, s), bias)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, A, B, values = ctx.saved_tensors
        s, support = ctx.scaling, ctx.support
        g = grad.reshape(-1, grad.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        grad_x = grad_A = grad_B = grad_values = None
        if ctx.needs_input_grad[0]:  # recomputing the merged weight is cheaper than keeping it alive
            grad_x = (g @ merged_weight(weight, A, B, values, support, s)).view(x.shape)
        if ctx.needs_input_grad[3]:
            grad_A = torch.mm((g @ B).t(), x2).mul_(s)
        if ctx.needs_input_grad[4]:
            grad_B = torch.mm((x2 @ A.t()).t(), g).t().mul_(s)
        if ctx.needs_input_grad[5]:
            grad_values = support.sampled_gradient(g, x2, values.dtype)
        return grad_x, None, None, grad_A, grad_B, grad_values, None, None


class SLTrainLinear(AdapterLayer):
    """`base(x) + s·B A x + S x`; parameters `lora_A` (r × d_in), `lora_B` (d_out × r) and `sparse_values` (|Ω|),
    buffer `sparse_index` (|Ω| sorted flat indices of Ω)."""

    def __init__(self, base: nn.Module, r: int, scaling: float, support: Tensor, dropout: float = 0.0):
        super().__init__(base)
        self.r = r
        self.scaling = scaling
        factory = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.lora_A = nn.Parameter(kaiming_(torch.empty(r, self.in_features, **factory)))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **factory))
        self.register_buffer("sparse_index", support.to(base.weight.device))
        self.sparse_values = nn.Parameter(torch.zeros(support.numel(), **factory))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self._support: tuple[tuple, Support] | None = None

    def support(self) -> Support:
        """The CSR arrays of the current `sparse_index`, rebuilt only when it changed (loaded, moved)."""
        index = self.sparse_index
        key = (index.data_ptr(), index._version, index.device)
        if self._support is None or self._support[0] != key:
            self._support = (key, Support(index, self.out_features, self.in_features))
        return self._support[1]

    def adapter_forward(self, x: Tensor) -> Tensor:
        support = self.support()
        if self.dropout is None and merge_pays(self, x):
            return MergedSLTrainFunction.apply(
                x, self.weight, self.bias, self.lora_A, self.lora_B, self.sparse_values, support, self.scaling
            )
        out = self.base_forward(x).reshape(-1, self.out_features)
        if self.dropout is not None:
            x = self.dropout(x)
        x2 = x.reshape(-1, self.in_features)
        out = torch.addmm(out, F.linear(x2, self.lora_A), self.lora_B.t(), alpha=self.scaling)
        out = out + SparseProduct.apply(x2, self.sparse_values, support)
        return out.view(*x.shape[:-1], self.out_features)

    def delta_weight(self) -> Tensor:
        zero = torch.zeros_like(self.weight)
        return merged_weight(zero, self.lora_A, self.lora_B, self.sparse_values, self.support(), self.scaling)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, nnz={self.sparse_values.numel()}, scaling={self.scaling:g}"


@dataclass
class SLTrainConfig(VariantConfig):
    # No fine-tuning rate is published (the paper pre-trains at 3e-3 at every size); S starts at 0 as B does, and
    # trains at LoRA's rate.
    lr_mult: float = 1.0
    density: float = 0.03
    """δ, the share of each weight's entries in the sparse term's support (the paper's sp_ratio)."""
    seed: int = 0
    """Seed of the supports: layer i of the adapted layers draws its support from seed and i."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0 < self.density < 1, f"variant.density must be in (0, 1), got {self.density}")


@VARIANTS.register("sltrain", config=SLTrainConfig)
class SLTrain(Variant):
    name = "sltrain"
    paper = (
        "SLTrain: a sparse plus low-rank approach for parameter and memory efficient pretraining "
        "(Han et al., NeurIPS 2024, arXiv 2406.02214)"
    )
    taxonomy = "rank"
    tags = ("expansion", "sparsity")
    params_formula = "r·(d_in + d_out) + max(1, ⌊δ·d_in·d_out⌋)"
    memory_note = "keeps each support's int64 indices (saved) and the CSR index arrays of S and Sᵀ (cached)"

    def __init__(self, cfg: SLTrainConfig):
        super().__init__(cfg)
        self._layers_made = 0

    def adapt(self, model: nn.Module, head: Sequence[str] = HEAD_NAMES) -> nn.Module:
        self._layers_made = 0  # supports are numbered from the first adapted layer, whatever adapted before
        return super().adapt(model, head)

    def make_layer(self, base: nn.Module) -> SLTrainLinear:
        cfg = self.cfg
        d_out, d_in = base.weight.shape[0], base.weight[0].numel()
        support = draw_support(d_out, d_in, cfg.density, seed=cfg.seed * 100_003 + self._layers_made)
        self._layers_made += 1
        return SLTrainLinear(base, cfg.r, cfg.alpha / cfg.r, support, cfg.dropout)

    def layer_params(self, d_in: int, d_out: int) -> int:
        return self.cfg.r * (d_in + d_out) + support_size(d_out, d_in, self.cfg.density)
