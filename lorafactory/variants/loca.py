"""LoCA — "LoCA: Location-Aware Cosine Adaptation for Parameter-Efficient Fine-Tuning" (Du et al., ICLR 2025,
arXiv 2502.06820).

Update rule: the update is the 2-D inverse DCT of a sparse spectrum whose non-zero locations are learned,

    ΔW = α · C_outᵀ S(a, l) C_in,   y = (W0 + ΔW) x + b

with C_d the orthonormal DCT-II matrix of size d (C x = DCT-II(x), Cᵀ X = DCT-III(X), both norm "ortho"), and
S ∈ R^{d_out × d_in} zero except for n coefficients a_k at integer locations (u_k, v_k) (coefficients that land on the
same entry add). Each location is a pair of continuous parameters l_k ∈ [0, 1]², mapped to
u_k = round(clip(l_k,row, 0, 0.999) · (d_out − 1)) and likewise v_k, so it is discrete in the forward pass.
Gradients: ∂L/∂a_k = K[u_k, v_k] with K = C_out (∂L/∂ΔW') C_inᵀ the spectral gradient (ΔW' = ΔW/α); the location
gradient is the paper's finite-difference estimate along each axis, clip(a_k (K[u_k+1, v_k] − K[u_k−1, v_k])/2, −1, 1)
(neighbours clamped to the grid, so one-sided at the edges) and the same along columns, then through the clip and
the (d − 1) scaling of l by ordinary autograd — a custom autograd function.
Training alternates: step 0 trains the coefficients; while step < `location_steps` (the paper's B_s, ~10% of
training) it cycles `coefficient_phase` steps of coefficients (B_a = 10) and `location_phase` steps of locations
(B_l = 20), each phase with the other set frozen; from `location_steps` on the locations are frozen for good. The
locations train with their own learning rate (`location_lr`, 1e-4 in the paper's GLUE setup), the coefficients with
the run's, and the head with the task's LoRA rate (`param_groups`, the official scripts' separate head rate).
Init: a = 0 (ΔW = 0, the model equals the base at step 0), l ~ U[0, 1]² per layer.
Trainable parameters per layer: n (the paper's count; the 2n locations also train during location phases).

Source: the paper's abstract and the authors' code (TL-UESTC/LoCA, `peft/tuners/loca/{layer,dct_utils}.py`) as a
third party vendored it (SDMuhsin/SCoRA, `src/loca_adapter.py`, `src/loca_dct_utils.py`; the official repository
itself was not reachable): its layer, its DCT and its schedule. Choices:
- The schedule follows optimizer steps (the training loop's `on_train_batch_end`); the official layer counts its own
  training forward passes, which is the same without gradient accumulation.
- `location_steps` is a step count, not a fraction: variants do not know a run's length. The default, 50, is ~10%
  of this project's GLUE budgets (234–500 steps); set it per task for other budgets. 0 never moves the locations.
- Frozen parameters stay in the optimizer (the official single optimizer keeps their Adam state across phases); a
  phase switch still reports a changed trainable set, and the rebuilt optimizer carries every state over.
- `variant.r` is not used (the budget is n); the official dropout on the adapter's input is not implemented, so
  `variant.dropout` must stay 0.

Computation: the method defines ΔW densely and its location gradient reads the dense spectral gradient, so each step
forms ΔW (as (C_outᵀ[:, u] · a) C_in[v, :] when n < d_out + d_in, else C_outᵀ S C_in) and runs one GEMM with
W0 + ΔW; the backward's ∂L/∂ΔW' = gᵀx is the dense GEMM the estimator needs. The spectral gradient is taken either
densely (C_out G C_inᵀ, d_out·d_in·(d_out + d_in)) or only at the 1 + 4 probes per coefficient (one or two
n × d_out × d_in products), whichever costs less. The DCT matrices are built once per width, dtype and device and
shared by every layer.

Measured (docs/bench.md: MiniLM-L6, every linear layer): a step costs 1.83× the frozen model's forward + backward
(PEFT has no LoCA).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorafactory.errors import check
from lorafactory.variants.base import VARIANTS, AdapterLayer, AutocastFunction, Variant, VariantConfig, adapter_layers


@cache
def dct_matrix(n: int, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> Tensor:
    """The orthonormal DCT-II matrix C (n × n): C x = DCT-II(x, norm="ortho"), and Cᵀ = C⁻¹ is DCT-III."""
    k = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    j = torch.arange(n, dtype=torch.float64).unsqueeze(0)
    C = torch.cos(math.pi * (2 * j + 1) * k / (2 * n)) * math.sqrt(2 / n)
    C[0] /= math.sqrt(2)
    return C.to(dtype=dtype, device=device)


def idct2(coefficients: Tensor, rows: Tensor, cols: Tensor, C_out: Tensor, C_in: Tensor) -> Tensor:
    """C_outᵀ S C_in for S holding `coefficients` at (rows, cols) (repeated entries add), by the cheaper product."""
    d_out, d_in = C_out.shape[0], C_in.shape[0]
    if coefficients.numel() < d_out + d_in:
        return (C_out.t()[:, rows] * coefficients) @ C_in[cols]
    S = coefficients.new_zeros(d_out, d_in).index_put((rows, cols), coefficients, accumulate=True)
    return C_out.t() @ S @ C_in


class LocatedIDCT(AutocastFunction):
    """ΔW' = idct2(a at round(locations)); ∂a is the spectral gradient at the locations, ∂locations the paper's
    finite-difference estimate (see the module docstring)."""

    @staticmethod
    def forward(ctx, coefficients: Tensor, locations: Tensor, d_out: int, d_in: int) -> Tensor:
        rows, cols = locations.detach().round().long()
        dtype, device = coefficients.dtype, coefficients.device
        ctx.save_for_backward(coefficients, rows, cols)
        return idct2(coefficients, rows, cols, dct_matrix(d_out, dtype, device), dct_matrix(d_in, dtype, device))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        coefficients, rows, cols = ctx.saved_tensors
        d_out, d_in = grad.shape
        C_out, C_in = dct_matrix(d_out, grad.dtype, grad.device), dct_matrix(d_in, grad.dtype, grad.device)
        want_locations = ctx.needs_input_grad[1]
        up, down = (rows + 1).clamp(max=d_out - 1), (rows - 1).clamp(min=0)
        right, left = (cols + 1).clamp(max=d_in - 1), (cols - 1).clamp(min=0)
        n = coefficients.numel()
        if (2 if want_locations else 1) * n >= d_out + d_in:  # the dense spectral gradient is cheaper
            K = C_out @ grad @ C_in.t()
            at_center = K[rows, cols]
            if want_locations:
                d_rows, d_cols = K[up, cols] - K[down, cols], K[rows, right] - K[rows, left]
        else:  # only the probed entries: K[u, ·] = C_out[u] G, and K[·, v] = G C_in[v]ᵀ
            P = C_out[rows] @ grad
            at_center = (P * C_in[cols]).sum(1)
            if want_locations:
                d_cols = (P * (C_in[right] - C_in[left])).sum(1)
                d_rows = ((C_out[up] - C_out[down]) * (grad @ C_in[cols].t()).t()).sum(1)
        grad_locations = None
        if want_locations:
            grad_locations = (0.5 * coefficients * torch.stack([d_rows, d_cols])).clamp(-1.0, 1.0)
        grad_coefficients = at_center if ctx.needs_input_grad[0] else None
        return grad_coefficients, grad_locations, None, None


class LoCALinear(AdapterLayer):
    """`(W0 + α·idct2(a at l)) x + b`; parameters `coefficients` (n) and `locations` (2 × n, in [0, 1])."""

    def __init__(self, base: nn.Module, n: int, scale: float):
        super().__init__(base)
        self.scale = scale
        factory = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.coefficients = nn.Parameter(torch.zeros(n, **factory))
        self.locations = nn.Parameter(torch.rand(2, n, **factory), requires_grad=False)

    def grid_locations(self) -> Tensor:
        """The locations on the d_out × d_in grid, before rounding (differentiable in `locations`)."""
        limits = torch.tensor([self.out_features - 1, self.in_features - 1], dtype=self.locations.dtype)
        return self.locations.clamp(0.0, 0.999) * limits.to(self.locations.device).unsqueeze(1)

    def delta_weight(self) -> Tensor:
        dtype = torch.promote_types(self.coefficients.dtype, torch.float32)
        locations = self.grid_locations().to(dtype)
        return self.scale * LocatedIDCT.apply(self.coefficients.to(dtype), locations, *self.weight.shape)

    def adapter_forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight + self.delta_weight().to(self.weight.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, n={self.coefficients.numel()}, scale={self.scale:g}"


@dataclass
class LoCAConfig(VariantConfig):
    # The official GLUE runs (RoBERTa-base, α = 1) train the coefficients at 5e-3 to 1e-2 on most tasks where LoRA
    # trains at 4e-4 to 5e-4: ~10× on 768-wide layers. An orthonormal basis moves ‖ΔW‖_F by about lr·√n whatever the
    # width, so each entry moves ∝ 1/width: at MiniLM's 384, 5× gives the official step per entry.
    lr_mult: float = 5.0
    n_coefficients: int = 1000
    """n, the trainable DCT coefficients per layer (the paper's GLUE setting; its `n_frequency`)."""
    scale: float = 1.0
    """α, the scale of ΔW (1 in the paper's GLUE runs)."""
    location_lr: float = 1e-4
    """Learning rate of the locations (absolute, as in the paper: 1e-4 for every task)."""
    location_steps: int = 50
    """B_s: the steps during which locations may train (the paper: ~10% of training); 0 never moves them."""
    coefficient_phase: int = 10
    """B_a: steps of each cycle that train the coefficients while locations may train."""
    location_phase: int = 20
    """B_l: steps of each cycle that train the locations."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.n_coefficients >= 1, f"variant.n_coefficients must be >= 1, got {self.n_coefficients}")
        check(self.scale > 0, f"variant.scale must be > 0, got {self.scale}")
        check(self.location_lr > 0, f"variant.location_lr must be > 0, got {self.location_lr}")
        check(self.location_steps >= 0, f"variant.location_steps must be >= 0, got {self.location_steps}")
        check(self.coefficient_phase >= 1, f"variant.coefficient_phase must be >= 1, got {self.coefficient_phase}")
        check(self.location_phase >= 1, f"variant.location_phase must be >= 1, got {self.location_phase}")
        check(self.dropout == 0, f"variant.dropout must be 0 (not implemented for LoCA), got {self.dropout}")


@VARIANTS.register("loca", config=LoCAConfig)
class LoCA(Variant):
    name = "loca"
    paper = (
        "LoCA: Location-Aware Cosine Adaptation for Parameter-Efficient Fine-Tuning "
        "(Du et al., ICLR 2025, arXiv 2502.06820)"
    )
    taxonomy = "rank"
    tags = ("frequency",)
    params_formula = "n  (n_coefficients; + 2n locations during location phases)"
    memory_note = "forms the dense ΔW (d_out × d_in, fp32) of each adapted layer every step"

    def __init__(self, cfg: LoCAConfig):
        super().__init__(cfg)
        self._step = 0  # optimizer steps taken; the phase is a function of it

    def make_layer(self, base: nn.Module) -> LoCALinear:
        return LoCALinear(base, self.cfg.n_coefficients, self.cfg.scale)

    def layer_params(self, d_in: int, d_out: int) -> int:
        return self.cfg.n_coefficients

    def trains_locations(self, step: int) -> bool:
        """Whether the locations (not the coefficients) train at optimizer step `step` (0-based)."""
        cycle = self.cfg.coefficient_phase + self.cfg.location_phase
        return step < self.cfg.location_steps and step % cycle >= self.cfg.coefficient_phase

    def _apply_phase(self, model: nn.Module) -> bool:
        """Set which parameters train at the current step; whether that changed anything."""
        locations = self.trains_locations(self._step)
        changed = False
        for layer in adapter_layers(model):
            changed |= layer.locations.requires_grad != locations
            layer.locations.requires_grad_(locations)
            layer.coefficients.requires_grad_(not locations)
            frozen = layer.coefficients if locations else layer.locations
            frozen.grad = None  # a stale gradient would still move it under AdamW
        return changed

    def on_train_batch_end(self, model: nn.Module, step: int) -> bool:
        self._step = step
        return self._apply_phase(model)

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        layers = adapter_layers(model)
        coefficients = [layer.coefficients for layer in layers]
        locations = [layer.locations for layer in layers]
        ids = {id(p) for p in coefficients + locations}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        groups = [
            {"params": coefficients, "lr": lr, "name": "coefficients"},
            {"params": locations, "lr": self.cfg.location_lr, "name": "locations"},
        ]
        if rest:  # the task head, at the task's LoRA rate
            groups.append({"params": rest, "lr": lr / self.cfg.lr_mult, "name": "head"})
        return groups

    def state_dict(self) -> dict[str, Any]:
        return {"step": self._step}

    def load_state_dict(self, state: dict[str, Any], model: nn.Module) -> None:
        self._step = int(state.get("step", 0))
        self._apply_phase(model)
