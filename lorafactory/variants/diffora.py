"""DiffoRA — "DiffoRA: Enabling Parameter-Efficient Fine-Tuning via Differential Module Selection" (Jiang, Wang,
Yuan, arXiv 2502.08905; v1 titled "... via Differential Low-Rank Matrix Adaptation").

Update rule: LoRA on every candidate module, each scaled by its entry of the Differential Adaptation Matrix (DAM),
relaxed to a gate γ_m = σ(α_m) ∈ (0, 1) with a learnable logit α_m while the modules are searched:

    search (steps 1 … `search_steps`):    y = W0 x + b + γ_m · s · B_m A_m x,      s = alpha / r
    fine-tune (after discretisation):    y = W0 x + b + s · B_m A_m x     for the ⌈keep_ratio · M⌉ modules of
                                                                         largest γ_m;   y = W0 x + b  for the rest

Init: LoRA's (A kaiming, B = 0) on every candidate and α_m = 0 (γ = ½, every module equally likely), so the model
equals the base at step 0. Trainable parameters per module: r·(d_in + d_out) + 1 while searching; afterwards
r·(d_in + d_out) on the kept modules and 0 on the others (their factors are freed).

What the paper fixes and what we chose (only its abstract and third-party summaries were reachable; no official code
is public, so every detail below is our reconstruction and says so):
- The DAM has one entry per candidate module (layer × module type); its continuous relaxation is a per-module gate
  on the LoRA branch. A DARTS-style softmax over the two choices {no adapter, LoRA} equals σ(α) of one logit, which
  is what we learn.
- The paper optimises the DAM bi-level (DARTS): α on held-out data, the LoRA weights on training data. The training
  loop gives a variant training batches only, so we use DARTS' first-order approximation without a held-out split:
  α and the LoRA weights descend the same training loss together, in the run's optimizer (with the run's learning
  rate and weight decay). This is the first-order DARTS update with the validation batch replaced by the training
  batch; it ranks modules by how consistently enlarging their LoRA branch lowers the training loss.
- Discretisation keeps the top ⌈keep_ratio · M⌉ modules by γ (ties by model order). The paper names the ratio ρ; its
  value is not stated in the parts we could read: 0.5 by default.
- "Weight sharing": the kept modules continue from the LoRA weights learned in the search (not re-initialised), with
  their gate folded into B (B ← γ B), so a kept module computes exactly what it computed before the switch; only the
  dropped modules' contributions vanish at discretisation (the usual DARTS discretisation gap).
- The switch happens after `search_steps` optimizer steps (our phase length; the loop rebuilds the optimizer and keeps
  the Adam state of the kept factors). A run shorter than that ends in the relaxed model (the summary says so).

Computation: while searching, the gate scales the rank-r activations A x (an r-wide product, not the output); after
the switch kept modules are plain LoRA layers (merged-weight path included, see lora.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorafactory.errors import check
from lorafactory.variants.base import VARIANTS, Variant, VariantConfig, named_adapter_layers
from lorafactory.variants.lora import LoRALinear


class DiffoRALinear(LoRALinear):
    """LoRA with a DAM gate `gate_logit` (α, shape (1,)) while searching. After discretisation the layer is plain LoRA
    (kept: `gate_logit` empty) or the frozen base alone (dropped: `lora_A`, `lora_B` and `gate_logit` empty)."""

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float = 0.0):
        super().__init__(base, r, scaling, dropout)
        self.gate_logit = nn.Parameter(torch.zeros(1, dtype=base.weight.dtype, device=base.weight.device))

    @property
    def searching(self) -> bool:
        return self.gate_logit.numel() > 0

    @property
    def kept(self) -> bool:
        """Still has a LoRA branch (searching, or kept at discretisation)."""
        return self.lora_A.numel() > 0

    def gate(self) -> Tensor:
        """γ = σ(α) while searching."""
        return torch.sigmoid(self.gate_logit)

    def adapter_forward(self, x: Tensor) -> Tensor:
        if self.searching:
            out = self.base_forward(x)
            if self.dropout is not None:
                x = self.dropout(x)
            h = (F.linear(x, self.lora_A) * self.gate()).reshape(-1, self.r)
            out2 = out.reshape(-1, self.out_features)
            return torch.addmm(out2, h, self.lora_B.t(), alpha=self.scaling).view(out.shape)
        if not self.kept:
            return self.base_forward(x)
        return super().adapter_forward(x)

    def delta_weight(self) -> Tensor:
        if not self.kept:
            return self.weight.new_zeros(self.out_features, self.in_features)
        delta = super().delta_weight()
        return delta * self.gate() if self.searching else delta

    @torch.no_grad()
    def discretize(self, keep: bool) -> None:
        """End the search: a kept module folds its gate into B and trains as LoRA; a dropped one frees its factors."""
        if keep:
            self.lora_B.mul_(self.gate())
        else:
            self.lora_A = _empty_like(self.lora_A)
            self.lora_B = _empty_like(self.lora_B)
        self.gate_logit = _empty_like(self.gate_logit)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # A checkpoint taken after discretisation holds empty tensors where this (fresh) layer still has factors, or
        # the reverse: take the saved shapes, then load as usual. Only non-empty tensors train.
        for name in ("lora_A", "lora_B", "gate_logit"):
            saved, current = state_dict.get(prefix + name), getattr(self, name)
            if saved is not None and saved.shape != current.shape:
                fresh = current.new_empty(saved.shape)
                setattr(self, name, nn.Parameter(fresh, requires_grad=fresh.numel() > 0))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        phase = "searching" if self.searching else ("kept" if self.kept else "dropped")
        return f"{super().extra_repr()}, {phase}"


def _empty_like(param: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(param.new_empty(0), requires_grad=False)


@dataclass
class DiffoRAConfig(VariantConfig):
    targets: Any = "all-linear"  # the candidates the DAM chooses among: every module type of every layer
    search_steps: int = 100
    """Optimizer steps of the search phase; the modules are discretised right after the last one."""
    keep_ratio: float = 0.5
    """ρ: the share of candidate modules kept at discretisation (rounded up, at least one)."""
    # lr_mult stays 1: after the search the kept modules train as LoRA, at LoRA's learning rate.

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.search_steps >= 1, f"variant.search_steps must be >= 1, got {self.search_steps}")
        check(0 < self.keep_ratio <= 1, f"variant.keep_ratio must be in (0, 1], got {self.keep_ratio}")


@VARIANTS.register("diffora", config=DiffoRAConfig)
class DiffoRA(Variant):
    name = "diffora"
    paper = (
        "DiffoRA: Enabling Parameter-Efficient Fine-Tuning via Differential Module Selection "
        "(Jiang, Wang, Yuan, arXiv 2502.08905)"
    )
    taxonomy = "rank"
    tags = ("budgeting", "module-selection")
    params_formula = "r·(d_in + d_out) + 1 per module while searching, then r·(d_in + d_out) on ⌈ρ·M⌉ kept modules"

    def __init__(self, cfg: DiffoRAConfig):
        super().__init__(cfg)
        self.switched_at: int | None = None
        self.search_gates: dict[str, float] = {}
        self.selected: list[str] = []

    @property
    def scaling(self) -> float:
        return self.cfg.alpha / self.cfg.r

    def make_layer(self, base: nn.Module) -> DiffoRALinear:
        return DiffoRALinear(base, self.cfg.r, self.scaling, self.cfg.dropout)

    def layer_params(self, d_in: int, d_out: int) -> int:
        return self.cfg.r * (d_in + d_out) + 1

    def expected_params(self, model: nn.Module) -> int:
        return sum(
            (self.cfg.r * (layer.in_features + layer.out_features) if layer.kept else 0) + int(layer.searching)
            for _, layer in named_adapter_layers(model)
        )

    def on_train_batch_end(self, model: nn.Module, step: int) -> bool | None:
        if self.switched_at is not None or step < self.cfg.search_steps:
            return None
        layers = named_adapter_layers(model)
        gates = {name: layer.gate().item() for name, layer in layers}
        keep = max(1, math.ceil(self.cfg.keep_ratio * len(layers)))
        order = sorted(range(len(layers)), key=lambda i: -gates[layers[i][0]])  # stable: ties keep model order
        chosen = {layers[i][0] for i in order[:keep]}
        for name, layer in layers:
            layer.discretize(name in chosen)
        self.switched_at, self.search_gates = step, gates
        self.selected = [name for name, _ in layers if name in chosen]
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"switched_at": self.switched_at, "search_gates": self.search_gates, "selected": self.selected}

    def load_state_dict(self, state: dict[str, Any], model: nn.Module) -> None:
        # The layers took their phase from the checkpoint's tensors (`_load_from_state_dict`); this is the record.
        self.switched_at = state.get("switched_at")
        self.search_gates = dict(state.get("search_gates", {}))
        self.selected = list(state.get("selected", []))

    def summary(self, model: nn.Module) -> dict[str, Any]:
        layers = named_adapter_layers(model)
        if self.switched_at is None:  # the run ended before the search did
            gates = {name: layer.gate().item() for name, layer in layers}
            return {"phase": "search", "search_steps": self.cfg.search_steps, "search_gates": gates}
        return {
            "phase": "fine-tune",
            "search_steps": self.cfg.search_steps,
            "switched_at": self.switched_at,
            "candidates": len(layers),
            "kept": len(self.selected),
            "selected": self.selected,
            "search_gates": self.search_gates,
        }
