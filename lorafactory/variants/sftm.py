"""SFTM / LT-SFT — "Composable Sparse Fine-Tuning for Cross-Lingual Transfer" (Ansell, Ponti, Korhonen, Vulić,
ACL 2022, arXiv 2110.07560): Lottery-Ticket Sparse Fine-Tuning, whose sparse fine-tuning masks (SFTMs) are also used
for cross-lingual reranking (Litschko, Vulić, Glavaš, COLING 2022).

Update rule: a sparse difference on top of the frozen weights, chosen by a first, dense phase:

    phase 1 (steps 1 … `full_steps`):   y = (W0 + ΔW) x + b,   ΔW dense, trained (full fine-tuning of W)
    switch:  S = the K entries of largest |ΔW| over all adapted layers; ΔW reset to 0 (and the head rewound)
    phase 2:                             y = (W0 + ΔW_S) x + b,  only the K entries in S train

Init: ΔW = 0, so the model equals the base at step 0. Trainable parameters: d_in·d_out per layer in phase 1, then K
in total, by default K = Σ r·(d_in + d_out), LoRA's budget at rank r (spread over the layers by the selection), or
`density` · Σ d_in·d_out. The sparse update is a weight: it merges, and two SFTMs compose by adding.

As the official code (`cambridgeltl/composable-sft`, `src/sft/lt_sft.py`, `trainer.py`) does: one selection
iteration (`n_ft_iterations` = 1, its default), the K-th largest |θ_ft − θ0| taken over all maskable weights at once
(a global threshold, not per layer), every parameter rewound to its value before phase 1 (the task head too, with
fresh optimizer moments for it at the start of phase 2; the head trains in full in both phases, as the official
scripts exclude it from the maskable set). Where we differ, and why:
- Maskable weights are the adapted layers' weights (`targets`, all linear layers by default); LT-SFT also masks
  embeddings, biases and LayerNorms, which the framework does not wrap. The official K is a share of those
  (`ft_params_proportion` 1%, or a count): ours is LoRA's parameter count unless `density` is set.
- Phases are measured in optimizer steps (`full_steps`; phase 2 is the rest of the run), not epochs, and share the
  run's learning-rate schedule (the official restarts its scheduler per phase; `scheduler=constant` is closest).
- Ties at the threshold: we keep exactly K entries (`topk`); the official `>=` may keep a few more.
- The optional L1 pull toward θ0 (`full_l1_reg`, `sparse_l1_reg`, 0 by default there) is not implemented.
The official scripts train at full fine-tuning's rate (2e-5 for XLM-R, where LoRA would take ~5e-4); see `lr_mult`.

Computation and memory: phase 1 is full fine-tuning of the target weights and costs what it costs (a dense ΔW, its
gradient and two Adam moments per layer; the official code keeps a copy of θ0 instead, we never touch W0, so the
reset is free). Phase 2 keeps K values and K int64 flat indices per model. Both phases run one GEMM with the merged
weight W0 + ΔW (formed on the fly, like LoRA's merged path) in a custom autograd function that recomputes it in
backward instead of keeping it alive; phase 2's gradient is the dense ∂L/∂W = gᵀx gathered at the K indices: one
GEMM, as fast as BLAS gets, where sampling only the K entries (SDDMM) would need a tokens × K gather.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    Variant,
    VariantConfig,
    in_head,
    named_adapter_layers,
)


def merged(weight: Tensor, values: Tensor, indices: Tensor | None) -> Tensor:
    """W0 + ΔW, ΔW dense (`indices` None) or `values` at flat `indices`."""
    if indices is None:
        return weight + values
    return weight.reshape(-1).index_add(0, indices, values).view(weight.shape)


class DeltaLinearFunction(AutocastFunction):
    """y = x (W0 + ΔW)ᵀ + b; gradients for x and for ΔW's trainable entries only (W0 and b are frozen)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, values: Tensor, indices: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight, values, indices)
        return F.linear(x, merged(weight, values, indices), bias)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, values, indices = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ merged(weight, values, indices)).view(x.shape)
        if ctx.needs_input_grad[3]:
            dense = g.t() @ x.reshape(-1, x.shape[-1])  # ∂L/∂W, d_out × d_in
            grad_values = dense if indices is None else dense.reshape(-1)[indices]
        return grad_x, None, None, grad_values, None


class SFTMLinear(AdapterLayer):
    """Phase 1: a dense `delta` (d_out × d_in). Phase 2: `values` at the flat positions `indices` (a persistent
    buffer), `delta` empty. Unused tensors are empty, so the state's keys are the same in both phases."""

    def __init__(self, base: nn.Module):
        super().__init__(base)
        factory = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.delta = nn.Parameter(torch.zeros(self.out_features, self.in_features, **factory))
        self.values = nn.Parameter(torch.zeros(0, **factory), requires_grad=False)
        self.register_buffer("indices", torch.zeros(0, dtype=torch.long, device=base.weight.device))

    @property
    def dense(self) -> bool:
        return self.delta.numel() > 0

    def adapter_forward(self, x: Tensor) -> Tensor:
        if self.dense:
            return DeltaLinearFunction.apply(x, self.weight, self.bias, self.delta, None)
        return DeltaLinearFunction.apply(x, self.weight, self.bias, self.values, self.indices)

    def delta_weight(self) -> Tensor:
        if self.dense:
            return self.delta
        return merged(self.weight.new_zeros(self.out_features, self.in_features), self.values, self.indices)

    @torch.no_grad()
    def sparsify(self, indices: Tensor) -> None:
        """Start phase 2 on the flat positions `indices`: ΔW reset to 0 there, the dense ΔW freed."""
        self.indices = indices.to(self.indices.device)
        self.values = nn.Parameter(self.delta.new_zeros(indices.numel()), requires_grad=indices.numel() > 0)
        self.delta = nn.Parameter(self.delta.new_zeros(0), requires_grad=False)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # A state saved in the other phase has other shapes: take them, then load as usual. Non-empty tensors train.
        for name in ("delta", "values"):
            saved, current = state_dict.get(prefix + name), getattr(self, name)
            if saved is not None and saved.shape != current.shape:
                fresh = current.new_empty(saved.shape)
                setattr(self, name, nn.Parameter(fresh, requires_grad=fresh.numel() > 0))
        saved = state_dict.get(prefix + "indices")
        if saved is not None and saved.shape != self.indices.shape:
            self.indices = self.indices.new_empty(saved.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        phase = "dense" if self.dense else f"sparse, entries={self.values.numel()}"
        return f"{super().extra_repr()}, {phase}"


@dataclass
class SFTMConfig(VariantConfig):
    targets: Any = "all-linear"  # LT-SFT fine-tunes the whole body; the framework wraps its linear layers
    # LT-SFT trains at full fine-tuning's rate (2e-5 on XLM-R), which the literature puts ~0.05x LoRA's (RoBERTa: 2e-5
    # vs 4e-4). Our sweeps centre on 0.2x: the toy contract problem (random tiny models, 25 steps) does not learn below
    # it, and the sparse phase moves only K entries at that rate. `sweep=lr_grid` spans the published ratio too.
    lr_mult: float = 0.2
    full_steps: int = 100
    """Optimizer steps of phase 1 (dense fine-tuning); the mask is chosen right after the last one."""
    density: float = 0.0
    """K as a share of the adapted weights' entries (LT-SFT's `ft_params_proportion`); 0: K = Σ r·(d_in + d_out),
    the parameter count of LoRA at rank `r` on the same layers."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.full_steps >= 1, f"variant.full_steps must be >= 1, got {self.full_steps}")
        check(0 <= self.density <= 1, f"variant.density must be in [0, 1] (0: LoRA's budget), got {self.density}")


@VARIANTS.register("sftm", config=SFTMConfig)
class SFTM(Variant):
    name = "sftm"
    paper = (
        "Composable Sparse Fine-Tuning for Cross-Lingual Transfer (LT-SFT; Ansell, Ponti, Korhonen, Vulić, ACL 2022, "
        "arXiv 2110.07560)"
    )
    taxonomy = "optimization"
    tags = ("sparsity", "two-phase")
    params_formula = "d_in·d_out (phase 1), then K in total: Σ r·(d_in + d_out) or density·Σ d_in·d_out (phase 2)"
    memory_note = "phase 1: full fine-tuning of the target weights (dense ΔW, Adam moments) + a copy of the head"

    def __init__(self, cfg: SFTMConfig):
        super().__init__(cfg)
        self.switched_at: int | None = None
        self.threshold: float | None = None
        self.head_start: dict[str, Tensor] = {}
        self.reset_head_moments = False

    def make_layer(self, base: nn.Module) -> SFTMLinear:
        return SFTMLinear(base)

    def layer_params(self, d_in: int, d_out: int) -> int:
        return d_in * d_out

    def expected_params(self, model: nn.Module) -> int:
        return sum(
            layer.delta.numel() if layer.dense else layer.values.numel() for _, layer in named_adapter_layers(model)
        )

    def budget(self, model: nn.Module) -> int:
        """K: the number of entries phase 2 trains."""
        layers = [layer for _, layer in named_adapter_layers(model)]
        if self.cfg.density > 0:
            return round(self.cfg.density * sum(layer.in_features * layer.out_features for layer in layers))
        return sum(self.cfg.r * (layer.in_features + layer.out_features) for layer in layers)

    def adapt(self, model: nn.Module, head: Sequence[str] = HEAD_NAMES) -> nn.Module:
        super().adapt(model, head)
        # LT-SFT rewinds every parameter at the switch, the (new, fully trained) head included: keep its start.
        self.head_start = {
            name: p.detach().clone() for name, p in model.named_parameters() if in_head(name.rpartition(".")[0], head)
        }
        return model

    def on_train_batch_end(self, model: nn.Module, step: int) -> bool | None:
        if self.switched_at is not None or step < self.cfg.full_steps:
            return None
        layers = named_adapter_layers(model)
        k = min(self.budget(model), sum(layer.delta.numel() for _, layer in layers))
        # The global top K lies within each layer's own top K: rank those candidates only, not every entry.
        candidates = [layer.delta.detach().abs().reshape(-1).topk(min(k, layer.delta.numel())) for _, layer in layers]
        scores = torch.cat([c.values for c in candidates])
        owner = torch.cat([torch.full_like(c.indices, i) for i, c in enumerate(candidates)])
        flat = torch.cat([c.indices for c in candidates])
        top = scores.topk(k)
        self.threshold = top.values.min().item() if k else None
        for i, (_, layer) in enumerate(layers):
            layer.sparsify(flat[top.indices[owner[top.indices] == i]].sort().values)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in self.head_start:
                    p.copy_(self.head_start[name])
        self.switched_at, self.reset_head_moments = step, bool(self.head_start)
        return True

    def on_before_optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        # The loop carries the head's Adam moments into the rebuilt optimizer; LT-SFT starts phase 2 afresh.
        if self.reset_head_moments:
            for name, p in model.named_parameters():
                if name in self.head_start:
                    optimizer.state.pop(p, None)
            self.reset_head_moments = False

    def state_dict(self) -> dict[str, Any]:
        return {
            "switched_at": self.switched_at,
            "threshold": self.threshold,
            "head_start": self.head_start,
            "reset_head_moments": self.reset_head_moments,
        }

    def load_state_dict(self, state: dict[str, Any], model: nn.Module) -> None:
        # The layers took their phase from the checkpoint's tensors (`_load_from_state_dict`).
        self.switched_at = state.get("switched_at")
        self.threshold = state.get("threshold")
        self.head_start = dict(state.get("head_start", self.head_start))
        self.reset_head_moments = bool(state.get("reset_head_moments", False))

    def summary(self, model: nn.Module) -> dict[str, Any]:
        layers = named_adapter_layers(model)
        if self.switched_at is None:  # the run ended in phase 1: a dense update, no mask yet
            return {"phase": "dense", "full_steps": self.cfg.full_steps}
        return {
            "phase": "sparse",
            "full_steps": self.cfg.full_steps,
            "switched_at": self.switched_at,
            "budget": self.budget(model),
            "threshold": self.threshold,
            "entries": {name: layer.values.numel() for name, layer in layers},
        }
