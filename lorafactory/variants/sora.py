"""SoRA — "Sparse Low-rank Adaptation of Pre-trained Language Models" (Ding, Lv, Wang, Chen, Wang, Zhao, Chen, Liu,
Sun; EMNLP 2023, arXiv 2311.11696).

Update rule: LoRA at a maximal rank r with one gate per rank component,

    y = W0 x + b + s · B diag(g) A dropout(x),    A ∈ R^{r×d_in}, B ∈ R^{d_out×r}, g ∈ R^r, s = alpha / r

trained with a proximal step on the gates after every optimizer step, g ← sign(g)·max(|g| − ξ, 0) (soft
thresholding: every |g_i| ≤ ξ becomes exactly 0), plus an L1 term λ·mean|g| (mean over every gate of the model) in
the loss. After training, the components whose gate is 0 are deleted and the gates folded into B: an ordinary LoRA of
rank nnz(g) per layer, computing the same function.

Init: A kaiming-uniform, B = 0, g ~ N(0, 1) (so the model equals the base at step 0).
Trainable parameters per layer: r·(d_in + d_out) + r during training; r_eff·(d_in + d_out) after pruning.

Choices, checked against the official code (TsinghuaC3I/SoRA: src/lora.py, src/sparse_optimizer.py, src/trainer.py,
scripts/run_glue_sora_no_schedule.sh):
- The official SparseAdamW thresholds in three in-place passes (`g[g > ξ] -= ξ; g[g < -ξ] += ξ; g[|g| < ξ] = 0`),
  which also zeroes gates that were in (ξ, 2ξ) and keeps |g| = ξ; here the proximal operator of ξ·|g| (soft
  thresholding) as the paper writes it. ξ is used as is, not multiplied by the learning rate (the scripts' optimizer).
- The gates have their own optimizer in the official code (AdamW, same learning rate and schedule, no weight decay);
  here they are a parameter group of the run's optimizer with weight decay 0, which is the same update.
- Defaults are the scripts' main setting: r = 8, alpha = 16, ξ = 3e-4 (`sparse_lambda_2`), λ = 10 (`sparse_lambda`).
  The optional stage-wise schedule of ξ (used to trace rank/accuracy curves) is not implemented.
- The official code only counts zero gates; the paper deletes their components, which `on_train_end` does here.

Computation: g is folded into B (d_out × r, cheap) before the rank-r products, so the layer runs LoRA's two paths
(see lora.py), merged-weight GEMM included; autograd takes the gate's gradient through the product.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorafactory.errors import check
from lorafactory.variants.base import (
    VARIANTS,
    AdapterLayer,
    Variant,
    VariantConfig,
    kaiming_,
    named_adapter_layers,
)
from lorafactory.variants.lora import MergedLoRAFunction, merge_pays


def resize_to_state(module: nn.Module, state_dict: dict[str, Tensor], prefix: str, names: tuple[str, ...]) -> None:
    """Give `module`'s parameters and buffers `names` the shapes a checkpoint holds for them (a layer whose rank
    changed during training loads into a freshly built one); values come from the checkpoint afterwards."""
    for name in names:
        stored = state_dict.get(prefix + name)
        current = getattr(module, name)
        if stored is None or stored.shape == current.shape:
            continue
        empty = current.new_empty(stored.shape)
        if name in module._parameters:
            setattr(module, name, nn.Parameter(empty, requires_grad=current.requires_grad))
        else:
            module.register_buffer(name, empty)


class GatedLoRALinear(AdapterLayer):
    """`base(x) + scaling · B diag(g) A x` with `lora_A` (r × d_in), `lora_B` (d_out × r) and one gate per rank
    component, `gate` (r): SoRA's and CoDyRA's gates, AdaLoRA's singular values Λ. Subclasses initialise."""

    resizable: tuple[str, ...] = ("lora_A", "lora_B", "gate")
    """Tensors whose shapes follow the rank; a checkpoint of another rank resizes them on load."""

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float = 0.0):
        super().__init__(base)
        self.scaling = scaling
        factory = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.lora_A = nn.Parameter(torch.zeros(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **factory))
        self.gate = nn.Parameter(torch.zeros(r, **factory))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    @property
    def r(self) -> int:
        """The current rank (number of gated components)."""
        return self.gate.numel()

    def gate_vector(self) -> Tensor:
        """The gates multiplying B's columns in the forward (one per row of A)."""
        return self.gate

    def gated_B(self) -> Tensor:
        return self.lora_B * self.gate_vector()

    def adapter_forward(self, x: Tensor) -> Tensor:
        B = self.gated_B()
        if self.dropout is None and merge_pays(self, x):
            return MergedLoRAFunction.apply(x, self.weight, self.bias, self.lora_A, B, self.scaling)
        out = self.base_forward(x)
        # Rows named explicitly: a layer pruned to rank 0 has an empty h, which reshape(-1, 0) cannot size.
        rows = x.shape[:-1].numel()
        h = F.linear(x if self.dropout is None else self.dropout(x), self.lora_A).reshape(rows, self.lora_A.shape[0])
        return torch.addmm(out.reshape(-1, self.out_features), h, B.t(), alpha=self.scaling).view(out.shape)

    def delta_weight(self) -> Tensor:
        return self.scaling * (self.gated_B() @ self.lora_A)

    @torch.no_grad()
    def prune(self, keep: Tensor, fold: bool) -> None:
        """Keep only the components where `keep` is True. `fold`: multiply the gates into B and freeze them at 1 (the
        layer becomes a plain LoRA of the kept rank); otherwise the kept gates stay trainable. ΔW is unchanged."""
        index = keep.nonzero().flatten()
        B = self.gated_B() if fold else self.lora_B
        gate = torch.ones_like(self.gate[index]) if fold else self.gate[index]
        self.lora_A = nn.Parameter(self.lora_A[index].clone(), requires_grad=self.lora_A.requires_grad)
        self.lora_B = nn.Parameter(B[:, index].clone(), requires_grad=self.lora_B.requires_grad)
        self.gate = nn.Parameter(gate.clone(), requires_grad=self.gate.requires_grad and not fold)

    def _load_from_state_dict(self, state_dict: dict[str, Tensor], prefix: str, *args: Any, **kwargs: Any) -> None:
        resize_to_state(self, state_dict, prefix, self.resizable)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, scaling={self.scaling:g}"


class SoRALinear(GatedLoRALinear):
    """LoRA's init (A kaiming, B = 0) with standard-normal gates, as the official code."""

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float = 0.0):
        super().__init__(base, r, scaling, dropout)
        with torch.no_grad():
            kaiming_(self.lora_A)
            self.gate.normal_()


@torch.no_grad()
def soft_threshold_(gate: Tensor, threshold: float) -> None:
    """The proximal operator of threshold·|g|, in place: g ← sign(g)·max(|g| − threshold, 0)."""
    gate.copy_(gate.sign() * (gate.abs() - threshold).clamp_min(0))


def gated_layers(model: nn.Module) -> list[tuple[str, GatedLoRALinear]]:
    return [(n, m) for n, m in named_adapter_layers(model) if isinstance(m, GatedLoRALinear)]


def prune_zero_gates(model: nn.Module) -> None:
    """Delete every component whose gate is exactly 0 and fold the gates into B (SoRA's and CoDyRA's end of
    training); layers already pruned (frozen gates) stay as they are."""
    for _, layer in gated_layers(model):
        if layer.gate.requires_grad:
            layer.prune(layer.gate != 0, fold=True)


def gate_ranks(model: nn.Module) -> dict[str, int]:
    """Non-zero gates per layer: the rank each layer keeps."""
    return {name: int(torch.count_nonzero(layer.gate)) for name, layer in gated_layers(model)}


@dataclass
class SoRAConfig(VariantConfig):
    # The official scripts run SoRA at 8e-4 (1.2e-3 with the threshold schedule) and their LoRA baseline at 3e-4.
    lr_mult: float = 2.5
    threshold: float = 3e-4
    """ξ of the proximal step on the gates after every optimizer step (the official scripts' `sparse_lambda_2`)."""
    l1_weight: float = 10.0
    """λ of the loss term λ·mean|g| over every gate of the model (the scripts' `sparse_lambda`); 0 switches it off."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.threshold >= 0, f"variant.threshold must be >= 0, got {self.threshold}")
        check(self.l1_weight >= 0, f"variant.l1_weight must be >= 0, got {self.l1_weight}")


@VARIANTS.register("sora", config=SoRAConfig)
class SoRA(Variant):
    name = "sora"
    paper = "Sparse Low-rank Adaptation of Pre-trained Language Models (Ding et al., EMNLP 2023, arXiv 2311.11696)"
    taxonomy = "rank"
    tags = ("budgeting", "sparsity")
    params_formula = "r·(d_in + d_out) + r (gates); r_eff·(d_in + d_out) after pruning"

    def make_layer(self, base: nn.Module) -> SoRALinear:
        return SoRALinear(base, self.cfg.r, self.cfg.alpha / self.cfg.r, self.cfg.dropout)

    def layer_params(self, d_in: int, d_out: int) -> int:
        return self.cfg.r * (d_in + d_out + 1)

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        gates = [layer.gate for _, layer in gated_layers(model) if layer.gate.requires_grad]
        ids = {id(g) for g in gates}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        return [{"params": rest, "lr": lr}, {"params": gates, "lr": lr, "weight_decay": 0.0, "name": "gates"}]

    def aux_loss(self, model: nn.Module) -> Tensor | None:
        gates = [layer.gate for _, layer in gated_layers(model) if layer.gate.requires_grad]
        if self.cfg.l1_weight == 0 or not gates:
            return None
        return self.cfg.l1_weight * torch.cat(gates).abs().mean()

    def on_train_batch_end(self, model: nn.Module, step: int) -> bool | None:
        for _, layer in gated_layers(model):
            if layer.gate.requires_grad:
                soft_threshold_(layer.gate, self.cfg.threshold)
        return None

    def on_train_end(self, model: nn.Module) -> None:
        prune_zero_gates(model)

    def summary(self, model: nn.Module) -> dict[str, Any]:
        return {"ranks": gate_ranks(model), "r_max": self.cfg.r, "threshold": self.cfg.threshold}
