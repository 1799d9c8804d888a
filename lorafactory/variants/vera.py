"""VeRA — "VeRA: Vector-based Random Matrix Adaptation" (Kopiczko, Blankevoort, Asano, ICLR 2024, arXiv 2310.11454).

Update rule, for a frozen linear `y = W0 x + b`:

    y = W0 x + b + Λ_b B Λ_d A dropout(x),    Λ_b = diag(λ_b), λ_b ∈ R^{d_out},   Λ_d = diag(λ_d), λ_d ∈ R^r

A ∈ R^{r×d_in} and B ∈ R^{d_out×r} are frozen random matrices, one pair for the whole model (`lf_shared.vera_A`,
`lf_shared.vera_B`), allocated at the largest d_in and d_out among the adapted layers; each layer uses the slices
A[:, :d_in] and B[:d_out, :]. Only λ_b and λ_d train. There is no α/r scale (`alpha` is unused), as in the paper and
in PEFT.

Init: A and B Kaiming-uniform with gain √2 over their fan-in (bounds √(6/d_in_max) and √(6/r)), drawn from a CPU
generator seeded with `basis_seed` (PEFT's `projection_prng_key`: the same draws); λ_b = 0 and λ_d = `d_initial`, so
the model equals the base at step 0. The bases are persistent buffers, saved once with the adapter (PEFT's
`save_projection=True`); the seed also regenerates them identically. Trainable parameters per layer: d_out + r.

Choices: the paper uses r = 1024 on GLUE and E2E; the default here is PEFT's r = 256 (also what RandLoRA's authors
ran VeRA with on GLUE), a quarter of the cost and the same method. The paper tunes VeRA's learning rate at
4e-3–1e-2 on RoBERTa-base GLUE where LoRA uses 4e-4–5e-4 (Hu et al.), hence `lr_mult` = 10.

Computation: VeRA is LoRA with computed factors A' = Λ_d A and B' = Λ_b B. These, and the other shared-state variants
that reuse this module's layer (RandLoRA, NOLA, VB-LoRA, Uni-LoRA), run through two autograd functions that save only
the input and the trainable tensors and rebuild the factors from them in backward: no factor-sized copy of the shared
bases is kept per layer between forward and backward. With many tokens the layer multiplies by the merged weight
W0 + s·B'A' (one GEMM, as LoRA does, see lora.py); otherwise it runs `W0 x + s·B'(A' x)`. The factors' gradients come
from rank-r products, ∂A' = s·(g B')ᵀ x and ∂B' = s·gᵀ(x A'ᵀ), or, when that is cheaper (VeRA at r = 256, RandLoRA's
full-rank factors), from the dense weight gradient G = gᵀx: ∂A' = s·B'ᵀG, ∂B' = s·G A'ᵀ. Autograd then carries them
to the trainable tensors through the (parameter-sized) construction of the factors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorafactory.errors import check
from lorafactory.variants.base import (
    HEAD_NAMES,
    VARIANTS,
    AdapterLayer,
    AutocastFunction,
    SharedRef,
    Variant,
    VariantConfig,
    find_targets,
    peft_layer_state,
    shared_state,
)
from lorafactory.variants.lora import merge_pays

Factors = Callable[..., tuple[Tensor, Tensor]]
"""`factors(*inputs) -> (A', B')`, A' of shape (r' × d_in) and B' (d_out × r'), from the tensors that get gradients."""


def factor_grads(g: Tensor, x: Tensor, A: Tensor, B: Tensor, scaling: float) -> tuple[Tensor | None, Tensor | None]:
    """∂L/∂A' and ∂L/∂B' of `y = s·x A'ᵀ B'ᵀ`, for the factors that require grad, from the output gradient g
    (T × d_out) and the input x (T × d_in): through rank-r' products or through the dense weight gradient, whichever
    takes fewer multiply-adds."""
    need_A, need_B = A.requires_grad, B.requires_grad
    need = int(need_A) + int(need_B)
    A, B, s = A.detach(), B.detach(), scaling
    (tokens, d_out), (r, d_in) = g.shape, A.shape
    grad_A = grad_B = None
    if tokens * d_in * d_out + need * r * d_in * d_out < need * tokens * r * (d_in + d_out):
        G = torch.mm(g.t(), x).mul_(s)
        if need_A:
            grad_A = B.t() @ G
        if need_B:
            grad_B = G @ A.t()
        return grad_A, grad_B
    if need_A:
        grad_A = torch.mm((g @ B).t(), x).mul_(s)
    if need_B:
        grad_B = torch.mm((x @ A.t()).t(), g).t().mul_(s)  # (hᵀg)ᵀ: BLAS is faster than gᵀh here (see lora.py)
    return grad_A, grad_B


def rebuild_factors(factors: Factors, inputs: Sequence[Tensor], needs: Sequence[bool]) -> tuple[Tensor, ...]:
    """(A', B', *leaves): the factors built again, under autograd, from fresh leaves standing for `inputs`."""
    leaves = [t.detach().requires_grad_(need) for t, need in zip(inputs, needs, strict=True)]
    with torch.enable_grad():
        A, B = factors(*leaves)
    return A, B, *leaves


def input_grads(A: Tensor, B: Tensor, leaves: Sequence[Tensor], grad_A: Tensor | None, grad_B: Tensor | None):
    """The gradients of the leaves that require grad (None for the others), given those of the factors."""
    outputs = [(t, gt) for t, gt in ((A, grad_A), (B, grad_B)) if gt is not None]
    wanted = [leaf for leaf in leaves if leaf.requires_grad]
    if not outputs or not wanted:
        return [None] * len(leaves)
    grads = iter(torch.autograd.grad([t for t, _ in outputs], wanted, [gt for _, gt in outputs], allow_unused=True))
    return [next(grads) if leaf.requires_grad else None for leaf in leaves]


class MergedFactoredFunction(AutocastFunction):
    """y = x (W + s·B'A')ᵀ + b in one GEMM, with (A', B') = factors(*inputs); W and b are frozen."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, scaling: float, factors: Factors, *inputs):
        A, B = factors(*inputs)
        ctx.save_for_backward(x, weight, *inputs)
        ctx.scaling, ctx.factors = scaling, factors
        return F.linear(x, torch.addmm(weight, B, A, alpha=scaling), bias)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, *inputs = ctx.saved_tensors
        A, B, *leaves = rebuild_factors(ctx.factors, inputs, ctx.needs_input_grad[5:])
        g, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
        grad_x = None
        if ctx.needs_input_grad[0]:  # rebuilding W + sB'A' is cheaper than keeping it alive until backward
            grad_x = (g @ torch.addmm(weight, B.detach(), A.detach(), alpha=ctx.scaling)).view(x.shape)
        grad_A, grad_B = factor_grads(g, x2, A, B, ctx.scaling)
        return grad_x, None, None, None, None, *input_grads(A, B, leaves, grad_A, grad_B)


class BranchFactoredFunction(AutocastFunction):
    """out + s·(x A'ᵀ) B'ᵀ with (A', B') = factors(*inputs); `out` is the frozen layer's output."""

    @staticmethod
    def forward(ctx, out: Tensor, x: Tensor, scaling: float, factors: Factors, *inputs):
        A, B = factors(*inputs)
        ctx.save_for_backward(x, *inputs)
        ctx.scaling, ctx.factors = scaling, factors
        h = x.reshape(-1, x.shape[-1]) @ A.t()
        return torch.addmm(out.reshape(-1, out.shape[-1]), h, B.t(), alpha=scaling).view(out.shape)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, *inputs = ctx.saved_tensors
        A, B, *leaves = rebuild_factors(ctx.factors, inputs, ctx.needs_input_grad[4:])
        g, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
        grad_x = None
        if ctx.needs_input_grad[1]:
            grad_x = ((g @ B.detach()) @ A.detach()).mul_(ctx.scaling).view(x.shape)
        grad_A, grad_B = factor_grads(g, x2, A, B, ctx.scaling)
        grad_out = grad if ctx.needs_input_grad[0] else None
        return grad_out, grad_x, None, None, *input_grads(A, B, leaves, grad_A, grad_B)


class FactoredLinear(AdapterLayer):
    """`base(x) + s · B' A' dropout(x)`, where the factors A' (r' × d_in) and B' (d_out × r') are computed by
    `factors(*factor_inputs())` from a few trainable tensors and, usually, frozen state shared by the whole model
    (`self.shared()`, the model's `lf_shared`). Subclasses define those two methods; tensors the factors read that
    do not train (bases, indices) are read inside `factors`, the trainable ones must come through `factor_inputs`."""

    def __init__(self, base: nn.Module, shared: SharedRef | None, scaling: float = 1.0, dropout: float = 0.0):
        super().__init__(base)
        self.shared = shared
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def factor_inputs(self) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def factors(self, *inputs: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def adapter_forward(self, x: Tensor) -> Tensor:
        inputs = self.factor_inputs()
        if self.dropout is None and merge_pays(self, x):
            return MergedFactoredFunction.apply(x, self.weight, self.bias, self.scaling, self.factors, *inputs)
        adapter_x = x if self.dropout is None else self.dropout(x)
        return BranchFactoredFunction.apply(self.base_forward(x), adapter_x, self.scaling, self.factors, *inputs)

    def delta_weight(self) -> Tensor:
        A, B = self.factors(*self.factor_inputs())
        return self.scaling * (B @ A)


def weight_dims(module: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of a module's weight seen as a matrix (a k×k convolution's as out × in·k·k)."""
    return module.weight.shape[0], module.weight[0].numel()


class SharedState(nn.Module):
    """The model's `lf_shared` module. Its forward is the identity because `shared_state` attaches it as a child of
    the model: in an `nn.Sequential` it becomes the last stage, which must leave the output as it is."""

    def forward(self, x: Any) -> Any:
        return x


class SharedStateVariant(Variant):
    """A variant with state held once per model (`shared_state(model)`): `init_shared` fills it from the target
    modules before the layers are made, and `make_layer` hands the layers `self.shared`, a reference to it."""

    def init_shared(self, shared: nn.Module, targets: list[nn.Module]) -> None:
        raise NotImplementedError

    def adapt(self, model: nn.Module, head: Sequence[str] = HEAD_NAMES) -> nn.Module:
        targets = [model.get_submodule(name) for name in find_targets(model, self.cfg.targets, head)]
        if not isinstance(getattr(model, "lf_shared", None), nn.Module):
            model.lf_shared = SharedState()
        shared = shared_state(model)
        self.init_shared(shared, targets)
        self.shared = SharedRef(shared)
        super().adapt(model, head)
        for param in shared.parameters():  # `adapt` froze the whole model, the shared parameters too
            param.requires_grad_(True)
        return model


def kaiming_bases(shapes: Sequence[tuple[int, int]], seed: int) -> list[Tensor]:
    """Matrices drawn in turn from one CPU generator seeded with `seed`, each Kaiming-uniform with gain √2 over its
    fan-in (its second dimension): bound √(6 / fan_in)."""
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.empty(shape).uniform_(-math.sqrt(6 / shape[1]), math.sqrt(6 / shape[1]), generator=generator)
        for shape in shapes
    ]


class VeRALinear(FactoredLinear):
    """The shared bases scaled by two trainable vectors: `lambda_b` (d_out) and `lambda_d` (r)."""

    def __init__(self, base: nn.Module, shared: SharedRef, r: int, d_initial: float, dropout: float = 0.0):
        super().__init__(base, shared, 1.0, dropout)
        factory = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.lambda_b = nn.Parameter(torch.zeros(self.out_features, **factory))
        self.lambda_d = nn.Parameter(torch.full((r,), d_initial, **factory))

    def factor_inputs(self) -> tuple[Tensor, ...]:
        return self.lambda_b, self.lambda_d

    def factors(self, lambda_b: Tensor, lambda_d: Tensor) -> tuple[Tensor, Tensor]:
        shared = self.shared()
        A = shared.vera_A[:, : self.in_features] * lambda_d.unsqueeze(1)
        B = shared.vera_B[: self.out_features] * lambda_b.unsqueeze(1)
        return A, B

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.lambda_d.numel()}"


@dataclass
class VeRAConfig(VariantConfig):
    r: int = 256
    lr_mult: float = 10.0  # paper: 4e-3–1e-2 on RoBERTa-base GLUE, LoRA 4e-4–5e-4
    d_initial: float = 0.1
    """Initial value of every entry of λ_d (the paper recommends ≤ 0.1)."""
    basis_seed: int = 0
    """Seed of the CPU generator that draws the shared bases A and B."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.d_initial != 0, "variant.d_initial must be non-zero (λ_d = 0 and λ_b = 0 get no gradient)")


@VARIANTS.register("vera", config=VeRAConfig)
class VeRA(SharedStateVariant):
    name = "vera"
    paper = "VeRA: Vector-based Random Matrix Adaptation (Kopiczko et al., ICLR 2024, arXiv 2310.11454)"
    taxonomy = "rank"
    tags = ("sharing", "random-basis")
    params_formula = "d_out + r"
    peft = "VeraConfig()"
    memory_note = "frozen random bases r·(max d_in + max d_out), once per model"

    def init_shared(self, shared: nn.Module, targets: list[nn.Module]) -> None:
        d_out = max(weight_dims(m)[0] for m in targets)
        d_in = max(weight_dims(m)[1] for m in targets)
        A, B = kaiming_bases([(self.cfg.r, d_in), (d_out, self.cfg.r)], self.cfg.basis_seed)
        factory = {"dtype": targets[0].weight.dtype, "device": targets[0].weight.device}
        shared.register_buffer("vera_A", A.to(**factory))
        shared.register_buffer("vera_B", B.to(**factory))

    def make_layer(self, base: nn.Module) -> VeRALinear:
        return VeRALinear(base, self.shared, self.cfg.r, self.cfg.d_initial, self.cfg.dropout)

    def layer_params(self, d_in: int, d_out: int) -> int:
        return d_out + self.cfg.r

    def peft_config(self, targets: list[str], head: list[str]) -> Any:
        from peft import VeraConfig

        return VeraConfig(
            r=self.cfg.r,
            target_modules=targets,
            modules_to_save=head,
            projection_prng_key=self.cfg.basis_seed,
            vera_dropout=self.cfg.dropout,
            d_initial=self.cfg.d_initial,
        )

    def peft_export(
        self, model: nn.Module, base: nn.Module, targets: list[str], head: list[str]
    ) -> tuple[Any, dict[str, Tensor]] | None:
        config = self.peft_config(targets, head)
        config.save_projection = True  # the bases themselves travel with the adapter, not only their seed
        state = peft_layer_state(
            model, lambda layer: {"vera_lambda_b": layer.lambda_b, "vera_lambda_d": layer.lambda_d}
        )
        shared = model.lf_shared
        return config, state | {"base_model.vera_A": shared.vera_A, "base_model.vera_B": shared.vera_B}
