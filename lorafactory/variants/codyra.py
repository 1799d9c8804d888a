"""CoDyRA — "Adaptive Rank, Reduced Forgetting: Knowledge Retention in Continual Learning Vision-Language Models with
Dynamic Rank-Selective LoRA" (Lu, Zhao, Xue, Yao, Moore, Gong; arXiv 2412.01004).

Update rule: LoRA with one importance weight per rank component and no α/r scale (the official code's
`lora_scaling = 1`; `alpha` is the plain multiplier here, default 1),

    y = W0 x + b + alpha · B diag(w) A x,    A ∈ R^{r×d_in}, B ∈ R^{d_out×r}, w ∈ R^r

trained by the task loss alone, with a sparsity-promoting proximal step on w after every optimizer step:
w ← sign(w)·max(|w| − κ_t, 0). The threshold κ_t is 0 for the first half of training (dense phase), then rises
linearly to `max_threshold` in `threshold_steps` equal stages; components whose weight reaches 0 are deleted at the
end and w folded into B, leaving a plain LoRA of rank nnz(w) per layer (the same function).

Init: A kaiming-uniform, B = 0, w ~ N(0, 1) (the model equals the base at step 0).
Trainable parameters per layer: r·(d_in + d_out) + r; r_eff·(d_in + d_out) after pruning.

This is CoDyRA's single-task rank selection. The paper's continual part (after each task: prune, merge ΔW into W0,
start a fresh LoRA for the next task) needs a sequence of tasks in one run, which this framework does not express
(a run is one task); `merge_and_unload` after a run is the merge step.

Choices, checked against the official code (Artificer-AI-Lab/CoDyRA: loralib/codyra.py, models/codyra.py,
runner_codyra.sh):
- Schedule as in `train_model`: κ takes the values linspace(0, max_threshold, threshold_steps), moving to the next one
  every (T − T_dense) // threshold_steps steps once T_dense = dense_fraction·T steps are done, and is applied only
  after the dense phase. Steps count from 1 here (the official loop counts from 0: the same schedule, one step later).
- The official thresholding runs three in-place passes that also zero weights in (κ, 2κ); here the proximal operator
  of κ·|w| (soft thresholding). κ is used as is, not multiplied by the learning rate, as in the official code.
- Defaults from runner_codyra.sh: r = 16, max_threshold = 5e-3 (κ_max), threshold_steps = 50, dense_fraction = 0.5.
  The official optimizer is AdamW over A, B and w together (no separate group), as here.
- The schedule needs the run's length: the training loop's, or `total_steps` (see adalora.py, `RunLength`).

Computation: as SoRA's layer (sora.py): w is folded into B before the rank-r products.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import nn

from lorafactory.errors import check
from lorafactory.variants.adalora import RunLength
from lorafactory.variants.base import VARIANTS, Variant, VariantConfig
from lorafactory.variants.sora import SoRALinear, gate_ranks, gated_layers, prune_zero_gates, soft_threshold_


@dataclass
class CoDyRAConfig(VariantConfig):
    # lr_mult stays 1: the official runs use 5e-4 (CLIP, AdamW); no LoRA rate from the same setup was reachable.
    r: int = 16
    alpha: float = 1.0
    """The update's multiplier (the official code has none, i.e. 1); not divided by r."""
    max_threshold: float = 5e-3
    """κ_max, the proximal threshold reached at the end of training."""
    threshold_steps: int = 50
    """How many equal stages κ rises through, from 0 to κ_max, after the dense phase."""
    dense_fraction: float = 0.5
    """Fraction of the run trained without thresholding."""
    total_steps: int = 0
    """The run's length in optimizer steps, over which the schedule is laid out; 0: the training loop's
    (`on_train_start`)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.max_threshold >= 0, f"variant.max_threshold must be >= 0, got {self.max_threshold}")
        check(self.threshold_steps >= 2, f"variant.threshold_steps must be >= 2, got {self.threshold_steps}")
        check(0 <= self.dense_fraction < 1, f"variant.dense_fraction must be in [0, 1), got {self.dense_fraction}")
        check(self.total_steps >= 0, f"variant.total_steps must be >= 0, got {self.total_steps}")


@VARIANTS.register("codyra", config=CoDyRAConfig)
class CoDyRA(Variant):
    name = "codyra"
    paper = (
        "Adaptive Rank, Reduced Forgetting: Knowledge Retention in Continual Learning Vision-Language Models with "
        "Dynamic Rank-Selective LoRA (Lu et al., arXiv 2412.01004)"
    )
    taxonomy = "rank"
    tags = ("budgeting", "sparsity")
    params_formula = "r·(d_in + d_out) + r (weights); r_eff·(d_in + d_out) after pruning"

    def __init__(self, cfg: CoDyRAConfig):
        super().__init__(cfg)
        self.run = RunLength(cfg.total_steps, self.name)

    def make_layer(self, base: nn.Module) -> SoRALinear:
        return SoRALinear(base, self.cfg.r, self.cfg.alpha, self.cfg.dropout)

    def layer_params(self, d_in: int, d_out: int) -> int:
        return self.cfg.r * (d_in + d_out + 1)

    def threshold(self, step: int) -> float:
        """κ applied after optimizer step `step` (counted from 1); 0 during the dense phase."""
        total = self.run.total
        i = step - 1  # the official loop's iteration index
        dense = self.cfg.dense_fraction * total
        stride = int((total - dense) // self.cfg.threshold_steps)
        if i <= dense or stride == 0:
            return 0.0
        first = math.ceil(dense / stride) * stride  # the first iteration that moves κ up one stage
        stage = 0 if i < first else (i - first) // stride + 1
        return self.cfg.max_threshold * min(stage, self.cfg.threshold_steps - 1) / (self.cfg.threshold_steps - 1)

    def on_train_start(self, model: nn.Module, total_steps: int) -> None:
        self.run.from_run(total_steps)

    def on_train_batch_end(self, model: nn.Module, step: int) -> bool | None:
        kappa = self.threshold(step)
        if kappa > 0:
            for _, layer in gated_layers(model):
                if layer.gate.requires_grad:
                    soft_threshold_(layer.gate, kappa)
        return None

    def on_train_end(self, model: nn.Module) -> None:
        prune_zero_gates(model)

    def summary(self, model: nn.Module) -> dict[str, Any]:
        return {"ranks": gate_ranks(model), "r_max": self.cfg.r, **self.run.summary()}
