"""Bayesian-LoRA (B-LoRA) — "Bayesian-LoRA: LoRA based Parameter Efficient Fine-Tuning using Optimal Quantization
levels and Rank Values trough Differentiable Bayesian Gates" (Meo, Sycheva, Goyal, Dauwels; WANT@ICML 2024,
arXiv 2406.13046).

Update rule: an SVD-shaped update (AdaLoRA's P Λ Q) whose rank and whose bit-widths are chosen by gates,

    y = W0 x + b + s · Q_B(P) diag(m ⊙ Q_E(Λ)) Q_A(Q) x,    s = alpha / r
    m_1 = 1,   m_i = round(z_2 ⋯ z_i)  (i = 2..r: component i is kept only while all gates before it are open)
    Q(x) = x_2 + z4 (ε4 + z8 (ε8 + z16 (ε16 + z32 ε32)))  with  x_2 = s_2 round(x / s_2),
           ε_2b = s_2b round((x − x_2 − … − ε_b) / s_2b),  s_2 = 2β/3,  s_2b = s_b / (2^b + 1),  ε32 = x − x_16

one Q per matrix (P, Λ, Q: per-tensor ranges β = max|x|), i.e. Bayesian Bits' nested residual quantization: with the
gates open up to z_b, Q(x) is x on the symmetric b-bit grid s_b·k, s_b = 2β/(2^b − 1), |k| ≤ 2^(b−1) − 1 (2^b − 1
levels: only an odd, zero-centred grid nests), and with every gate open Q(x) = x up to round-off (32 = full
precision). Each gate z
is a hard-concrete variable (Louizos et al.) with logit log α: z = clamp(σ((log u − log(1−u) + log α)/β_hc)·(ζ−γ)+γ,
0, 1), β_hc = 2/3, γ = −0.1, ζ = 1.1, u ~ U(0, 1), sampled at every training forward; rounding passes gradients
straight through. The prior on the gates adds to the loss

    λ · Σ_layers [ C(A) + C(B) + mean_i q(z_i) · C(E) ],    C = 1 + q4 + q4 q8 + q4 q8 q16 + q4 q8 q16 q32,
    q(z) = P(z ≠ 0) = σ(log α − β_hc log(−γ/ζ))

(the expected bit cost of each matrix's chain; the mean over the r − 1 rank gates weighs Λ's chain). At evaluation a
gate is open when P(z = 0) < 0.34 (Bayesian Bits' threshold), so the deployed layer is a fixed LoRA of rank
1 + (leading open rank gates) with each matrix at 2, 4, 8, 16 or 32 bits; it merges exactly. The record's summary
gives the ranks (`ranks`) and bit-widths (`bits`) of every layer.

Init (official code): P, Q ~ N(0, 0.02), Λ ~ N(0, 1), rank logits 6, bit logits 2: ΔW ≠ 0 at step 0 (small).
Trainable parameters per layer: r·(d_in + d_out + 1) + (r − 1) rank logits + 12 bit logits (4 per matrix).

Choices, checked against the official code (KseniaSycheva/peft, src/peft/tuners/blora/ with Qualcomm's Bayesian Bits
package; the paper's text beyond its abstract could not be read here):
- Quantized tensors: P, Λ, Q only. The official layer also quantizes the frozen W0 (its own gated quantizer) and five
  activations (x·Aᵀ, ·Λ, the branch output, W0 x, the sum) for its bit-operation count. Activation rounding makes the
  layer non-linear in x (no weight to merge) and W0's quantizer compresses the base model, which here is
  `model.quantize`'s business; both are left out, so the prior counts the adapter's matrices only.
- Range: β = max|x| of the tensor at each forward (no state). The official quantizer fixes its range from the first
  forward's min/max and never clips (its "b-bit" grid then has as many levels as the tensor grows into) and its
  `learn_scales` option is never wired to the quantizers. Inputs are clipped just inside ±β (PACT's trick, so ±β
  never rounds to a level outside the grid).
- Gate inits: the official config and script set 6 for the bit gates, but the layers never receive those values and
  run with the quantizer's default 2; 2 here. Rank logits 6 (hard-coded there). λ = 1e-3 (`quantization_lmbd`).
- As in the official code: the first component has no gate; a bit gate whose logit is ≤ −2 is 0 in training (with
  every gate after it); the rank mask is the rounded cumulative product of the sampled gates; the regulariser takes
  each rank gate's own probability (not the cumulative one) and keeps the constant 2-bit term.
- Gate noise comes from each layer's own stream (a seed drawn from the global RNG at construction plus a counter,
  both saved buffers), so a layer's samples do not depend on what else drew random numbers, and a resumed run draws
  the same gates. Recomputing a forward (activation checkpointing) would draw new ones.
- The gate logits train in the adapter's optimizer group without weight decay (which would pull closed gates open).

Computation: Q(·) works on the parameters, not the activations: one pass over the concatenation of Q, Λ and P (each
with its own range and gates) in a custom autograd node (`NestedQuantize`) that keeps no graph of its elementwise
steps. Λ and the rank mask are folded into P, so the layer runs LoRA's two paths (lora.py), merged-weight GEMM
included, on the quantized factors. The gates and the quantizer cost a fixed ~1 ms per layer and step on this CPU
(small tensors: the cost is per operation), which is most of the step on a tiny model and little on a real one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorafactory.errors import check
from lorafactory.variants.base import (
    VARIANTS,
    AdapterLayer,
    AutocastFunction,
    Variant,
    VariantConfig,
    named_adapter_layers,
)
from lorafactory.variants.lora import MergedLoRAFunction, merge_pays

HC_BETA, HC_GAMMA, HC_ZETA = 2.0 / 3.0, -0.1, 1.1
"""Hard-concrete temperature and stretch limits (Louizos et al., as Bayesian Bits and the official code)."""
CLOSED_BELOW = 0.34
"""A deployed gate is open when its probability of being exactly 0 is below this (Bayesian Bits)."""
DEAD_LOGIT = -2.0
"""A bit gate whose logit is at or below this is 0 in training, with every gate after it (official code)."""
BITS = (2, 4, 8, 16, 32)
"""The nested bit-widths; 32 is full precision (no rounding)."""
MATRICES = ("A", "E", "B")
"""Rows of `bit_logits`: Q (`lora_A`), Λ (`lora_E`), P (`lora_B`)."""


def open_probability(logits: Tensor) -> Tensor:
    """q(z) = P(z ≠ 0) of hard-concrete gates with these logits."""
    return torch.sigmoid(logits - HC_BETA * math.log(-HC_GAMMA / HC_ZETA))


def deployed_gates(logits: Tensor) -> Tensor:
    """The gates at evaluation: 1 where P(z = 0) < CLOSED_BELOW, else 0."""
    return (1 - open_probability(logits) < CLOSED_BELOW).to(logits.dtype)


def sample_gates(logits: Tensor, uniform: Tensor) -> Tensor:
    """Hard-concrete samples for noise `uniform` ∈ (0, 1) (differentiable in the logits)."""
    u = uniform.clamp(1e-6, 1 - 1e-6)
    stretched = torch.sigmoid((u.log() - (-u).log1p() + logits) / HC_BETA) * (HC_ZETA - HC_GAMMA) + HC_GAMMA
    return stretched.clamp(0.0, 1.0)


def residuals(x: Tensor, beta: Tensor | None = None) -> list[Tensor]:
    """Bayesian Bits' decomposition of `x` (no gradient): [x_2, ε4, ε8, ε16, ε32], where the sum of the first k terms
    is x on the symmetric 2^k-bit grid of range ±β and the sum of all five is x. `beta`: the range, max|x| by default,
    or one per element (several tensors quantized in one pass)."""
    with torch.no_grad():
        beta = x.abs().amax() if beta is None else beta
        beta = torch.where(beta > 0, beta, torch.ones_like(beta))  # an all-zero tensor stays 0 on any grid
        bound = beta * (1 - 2**-20)  # just inside ±β, so that the largest |x| does not round to a level outside
        inside = torch.clamp(x, -bound, bound)
        step = 2 * beta / 3
        level = step * torch.round(inside / step)
        parts = [level]
        for bits in BITS[:-2]:
            step = step / (2**bits + 1)
            eps = step * torch.round((inside - level) / step)
            parts.append(eps)
            level = level + eps
        parts.append(x.detach() - level)
        return parts


class NestedQuantize(AutocastFunction):
    """Q(x) = x_2 + z4 (ε4 + z8 (ε8 + z16 (ε16 + z32 ε32))) in one autograd node: the identity gradient for x
    (straight-through) and, for each gate, the bracket it multiplies times the gates before it. The quantizer's
    elementwise passes keep no graph (a tiny layer's step otherwise spends more time in them than in its GEMMs)."""

    @staticmethod
    def forward(ctx, x: Tensor, gates: Tensor, beta: Tensor | None) -> Tensor:
        x2, *eps = residuals(x, beta)
        brackets = [eps[-1]]  # innermost first: ε32, ε16 + z32 ε32, ε8 + z16 (…), ε4 + z8 (…)
        for k in (2, 1, 0):
            brackets.append(eps[k] + gates[k + 1] * brackets[-1])
        brackets.reverse()  # brackets[k] is what gate k multiplies
        ctx.save_for_backward(gates, *brackets)
        return x2 + gates[0] * brackets[0]

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        gates, *brackets = ctx.saved_tensors
        grad_gates = None
        if ctx.needs_input_grad[1]:
            rows, before = [], grad  # grad · z4 ⋯ z_(k−1)
            for k, bracket in enumerate(brackets):
                rows.append((before * bracket).sum_to_size(gates[k].shape))
                before = before * gates[k]
            grad_gates = torch.stack(rows)
        return grad, grad_gates, None


def quantize(x: Tensor, gates: Tensor, beta: Tensor | None = None) -> Tensor:
    """Q(x) for gates (z4, z8, z16, z32) ∈ [0, 1] along the first dimension of `gates` (each broadcast against x);
    `beta` as in `residuals`. All gates 1: x, up to round-off."""
    return NestedQuantize.apply(x, gates, beta)


def bit_width(gates: Tensor) -> int:
    """The bit-width a row of deployed (0/1) gates selects: 2 doubled once per leading open gate."""
    return BITS[int(torch.cumprod(gates, 0).sum())]


class BayesianLoRALinear(AdapterLayer):
    """`base(x) + s · Q(P) diag(m ⊙ Q(Λ)) Q(Q) x` with `lora_A` = Q (r × d_in), `lora_E` = Λ (r), `lora_B` = P
    (d_out × r), `rank_logits` (r − 1) and `bit_logits` (3 × 4: rows Q, Λ, P; columns the 4, 8, 16, 32-bit gates)."""

    def __init__(self, base: nn.Module, cfg: BayesianLoRAConfig):
        super().__init__(base)
        r = cfg.r
        self.r = r
        self.scaling = cfg.alpha / r
        factory = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory).normal_(0.0, 0.02))
        self.lora_E = nn.Parameter(torch.empty(r, **factory).normal_())
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **factory).normal_(0.0, 0.02))
        self.rank_logits = nn.Parameter(torch.full((r - 1,), cfg.rank_gate_init, **factory))
        self.bit_logits = nn.Parameter(torch.full((len(MATRICES), len(BITS) - 1), cfg.bit_gate_init, **factory))
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else None
        self.register_buffer("gate_seed", torch.randint(0, 2**62, ()))
        self.register_buffer("gate_draws", torch.zeros((), dtype=torch.long))
        sizes = [p.numel() for p in (self.lora_A, self.lora_E, self.lora_B)]
        self.register_buffer("segment_sizes", torch.tensor(sizes, device=factory["device"]), persistent=False)

    def gate_noise(self) -> Tensor:
        """Uniform noise for one training forward's gates, from this layer's own stream."""
        generator = torch.Generator(device=self.rank_logits.device)
        generator.manual_seed(int(self.gate_seed) + int(self.gate_draws))
        self.gate_draws += 1
        n = self.rank_logits.numel() + self.bit_logits.numel()
        return torch.rand(n, generator=generator, dtype=self.rank_logits.dtype, device=self.rank_logits.device)

    def gates(self) -> tuple[Tensor, Tensor]:
        """(rank mask m of size r, bit gates 3 × 4): sampled in training, thresholded otherwise."""
        logits = torch.cat([self.rank_logits, self.bit_logits.flatten()])
        if self.training:
            gates = sample_gates(logits, self.gate_noise())
            rank_gates, bit_gates = gates[: self.r - 1], gates[self.r - 1 :].view_as(self.bit_logits)
            bit_gates = bit_gates * torch.cumprod((self.bit_logits > DEAD_LOGIT).to(gates.dtype), dim=1)
            kept = torch.cumprod(rank_gates, 0)
            kept = kept + (torch.round(kept) - kept).detach()
        else:
            gates = deployed_gates(logits)
            kept, bit_gates = torch.cumprod(gates[: self.r - 1], 0), gates[self.r - 1 :].view_as(self.bit_logits)
        return torch.cat([kept.new_ones(1), kept]), bit_gates

    def factors(self) -> tuple[Tensor, Tensor]:
        """(A, B) of the current update `s · B A`: Q(Q) and Q(P) diag(m ⊙ Q(Λ)). The three matrices are quantized in
        one pass over their concatenation, each with its own range and gates."""
        mask, bit_gates = self.gates()
        params = (self.lora_A, self.lora_E, self.lora_B)
        sizes = self.segment_sizes
        beta = torch.stack([p.detach().abs().amax() for p in params]).repeat_interleave(sizes)
        flat = torch.cat([p.flatten() for p in params])
        gates = bit_gates.t().repeat_interleave(sizes, dim=1)
        A, E, B = quantize(flat, gates, beta).split([p.numel() for p in params])
        return A.view_as(self.lora_A), B.view_as(self.lora_B) * (E * mask)

    def adapter_forward(self, x: Tensor) -> Tensor:
        A, B = self.factors()
        if self.dropout is None and merge_pays(self, x):
            return MergedLoRAFunction.apply(x, self.weight, self.bias, A, B, self.scaling)
        out = self.base_forward(x)
        h = F.linear(x if self.dropout is None else self.dropout(x), A).reshape(-1, self.r)
        return torch.addmm(out.reshape(-1, self.out_features), h, B.t(), alpha=self.scaling).view(out.shape)

    def delta_weight(self) -> Tensor:
        A, B = self.factors()
        return self.scaling * (B @ A)

    @contextmanager
    def deployed(self) -> Iterator[None]:
        """Thresholded gates whatever the mode: merging folds in the deployed update (a sample would not unmerge)."""
        was_training = self.training
        self.train(False)
        try:
            yield
        finally:
            self.train(was_training)

    def merge(self) -> None:
        with self.deployed():
            super().merge()

    def unmerge(self) -> None:
        with self.deployed():
            super().unmerge()

    def prior(self) -> Tensor:
        """C(A) + C(B) + mean_i q(z_i)·C(E): the layer's expected bit cost under the gates' probabilities."""
        q = open_probability(self.bit_logits)
        chains = 1 + q[:, 0] * (1 + q[:, 1] * (1 + q[:, 2] * (1 + q[:, 3])))
        rank = open_probability(self.rank_logits).mean() if self.r > 1 else chains.new_ones(())
        return chains[0] + chains[2] + rank * chains[1]

    @torch.no_grad()
    def rank(self) -> int:
        """The deployed rank: 1 + the rank gates open before the first closed one."""
        return int(torch.cumprod(deployed_gates(self.rank_logits), 0).sum()) + 1

    @torch.no_grad()
    def bits(self) -> dict[str, int]:
        """The deployed bit-width of Q (`A`), Λ (`E`) and P (`B`)."""
        gates = deployed_gates(self.bit_logits)
        return {name: bit_width(row) for name, row in zip(MATRICES, gates, strict=True)}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, scaling={self.scaling:g}"


def bayesian_layers(model: nn.Module) -> list[tuple[str, BayesianLoRALinear]]:
    return [(n, m) for n, m in named_adapter_layers(model) if isinstance(m, BayesianLoRALinear)]


@dataclass
class BayesianLoRAConfig(VariantConfig):
    # lr_mult 1: the paper's training settings could not be read (its text beyond the abstract was unreachable) and
    # the official run_glue.py takes the rate from the command line with no script or default beside it.
    prior_weight: float = 1e-3
    """λ, the weight of the gates' prior in the loss (the official `quantization_lmbd`)."""
    rank_gate_init: float = 6.0
    """Initial logit of every rank gate (P(z ≠ 0) ≈ 1)."""
    bit_gate_init: float = 2.0
    """Initial logit of every bit-width gate (what the official layers run with)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.prior_weight >= 0, f"variant.prior_weight must be >= 0, got {self.prior_weight}")
        for name in ("rank_gate_init", "bit_gate_init"):
            value = getattr(self, name)
            check(math.isfinite(value), f"variant.{name} must be a finite logit, got {value}")


@VARIANTS.register("bayesian_lora", config=BayesianLoRAConfig)
class BayesianLoRA(Variant):
    name = "bayesian_lora"
    paper = (
        "Bayesian-LoRA: LoRA based Parameter Efficient Fine-Tuning using Optimal Quantization levels and Rank Values "
        "trough Differentiable Bayesian Gates (Meo et al., WANT@ICML 2024, arXiv 2406.13046)"
    )
    taxonomy = "rank"
    tags = ("budgeting", "quantization", "svd")
    zero_init = False
    noisy_training = True
    params_formula = "r·(d_in + d_out + 1) + (r − 1) rank gates + 12 bit gates"

    def make_layer(self, base: nn.Module) -> BayesianLoRALinear:
        return BayesianLoRALinear(base, self.cfg)

    def layer_params(self, d_in: int, d_out: int) -> int:
        r = self.cfg.r
        return r * (d_in + d_out + 1) + (r - 1) + len(MATRICES) * (len(BITS) - 1)

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        gates = [p for _, layer in bayesian_layers(model) for p in (layer.rank_logits, layer.bit_logits)]
        ids = {id(p) for p in gates}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        return [{"params": rest, "lr": lr}, {"params": gates, "lr": lr, "weight_decay": 0.0, "name": "gates"}]

    def aux_loss(self, model: nn.Module) -> Tensor | None:
        layers = bayesian_layers(model)
        if self.cfg.prior_weight == 0 or not layers:
            return None
        return self.cfg.prior_weight * torch.stack([layer.prior() for _, layer in layers]).sum()

    def summary(self, model: nn.Module) -> dict[str, Any]:
        layers = bayesian_layers(model)
        return {
            "ranks": {name: layer.rank() for name, layer in layers},
            "bits": {name: layer.bits() for name, layer in layers},
            "r_max": self.cfg.r,
            "prior_weight": self.cfg.prior_weight,
        }
