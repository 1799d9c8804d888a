"""LoRA-Squeeze — "LoRA-Squeeze: Simple and Effective Post-Tuning and In-Tuning Compression of LoRA Modules" (Vulić,
Grycner, de Laroussilhe, Pfeiffer; arXiv 2602.10993).

Update rule: train plain LoRA at a high source rank r_src, then re-factorise ΔW = s·B A to a lower rank k by its
truncated SVD (the Eckart–Young optimum in Frobenius and spectral norm):

    ΔW = U Σ Vᵀ,   B' = U_k √(Σ_k / s'),   A' = √(Σ_k / s') V_kᵀ,   s' = alpha / k,   so s'·B'A' = U_k Σ_k V_kᵀ

(the singular values split evenly between the factors). Three ways to use it, all from this one variant:
- Post-Squeeze (default): train at r_src, squeeze to the deployment rank r at the end of training (`on_train_end`).
- In-Squeeze: every `squeeze_every` steps re-factorise to ⌈factor · current rank⌉ (not below r) and keep training:
  the rank anneals from r_src to r (e.g. 32 → 16 → 8), then trains at r.
- Cont-Squeeze: `squeeze_factor = 0` squeezes straight to r at step `squeeze_every` and fine-tunes at r after.
The summary records every in-training phase and the post-hoc squeeze.

Init: LoRA's (A kaiming, B = 0), at r_src = `source_r` (default 4·r), scale alpha / r_src.
Trainable parameters per layer: r_src·(d_in + d_out) at the start, r·(d_in + d_out) after the squeeze.

Choices (only the abstract and summaries of the paper were reachable; no official code):
- The SVD comes from the paper's memory-efficient route without a dense ΔW: QR of B and of Aᵀ, then the SVD of the
  small r_src × r_src core R_B R_Aᵀ. That is the exact SVD of ΔW, so the randomized SVD (RSVD) the paper runs on the
  dense ΔW, an approximation of it, is not needed.
- The In-Squeeze schedule (geometric, by `squeeze_factor`, every `squeeze_every` steps) is ours: the paper's exact
  annealing schedule was not reachable. Each squeeze replaces A and B, so the optimizer starts them with fresh state.
- A layer whose ΔW has rank below k (r_src < k, or a narrow weight) keeps the components it has.

Computation: the layer is LoRA's (lora.py); a squeeze costs O((d_in + d_out)·r_src²) per layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lorafactory.errors import check
from lorafactory.variants.base import VARIANTS, Variant, VariantConfig, named_adapter_layers
from lorafactory.variants.lora import LoRALinear
from lorafactory.variants.sora import resize_to_state


@torch.no_grad()
def truncated_svd(A: Tensor, B: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The top-k singular triplets (U_k, σ_k, V_k) of B A, from QR factors of B and Aᵀ and the SVD of their small
    core; never forms B A. Fewer than k when B A has smaller rank."""
    dtype = torch.promote_types(A.dtype, torch.float32)
    Q_b, R_b = torch.linalg.qr(B.to(dtype))
    Q_a, R_a = torch.linalg.qr(A.t().to(dtype))
    U, S, Vh = torch.linalg.svd(R_b @ R_a.t())
    k = min(k, S.numel())
    return Q_b @ U[:, :k], S[:k], Q_a @ Vh[:k].t()


class SqueezeLinear(LoRALinear):
    """LoRA whose rank can be lowered in place by `squeeze(k)`; scale alpha / (current rank)."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0):
        super().__init__(base, r, alpha / r, dropout)
        self.alpha = alpha

    @torch.no_grad()
    def squeeze(self, k: int) -> None:
        """Replace A, B by the rank-k truncation of ΔW (new parameters), with scale alpha / k."""
        U, S, V = truncated_svd(self.lora_A, self.lora_B, k)
        k = S.numel()
        scaling = self.alpha / k if k else self.scaling
        root = (self.scaling * S / scaling).sqrt()
        # Contiguous, as a loaded checkpoint's tensors are: BLAS would otherwise round a resumed run differently.
        A = (root.unsqueeze(1) * V.t()).to(self.lora_A.dtype).contiguous()
        B = (U * root).to(self.lora_B.dtype).contiguous()
        self.lora_A = nn.Parameter(A, requires_grad=self.lora_A.requires_grad)
        self.lora_B = nn.Parameter(B, requires_grad=self.lora_B.requires_grad)
        self.r, self.scaling = k, scaling

    def _load_from_state_dict(self, state_dict: dict[str, Tensor], prefix: str, *args: Any, **kwargs: Any) -> None:
        resize_to_state(self, state_dict, prefix, ("lora_A", "lora_B"))
        r = self.lora_A.shape[0]
        if r != self.r and r > 0:
            self.r, self.scaling = r, self.alpha / r
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def squeeze_layers(model: nn.Module) -> list[tuple[str, SqueezeLinear]]:
    return [(n, m) for n, m in named_adapter_layers(model) if isinstance(m, SqueezeLinear)]


@dataclass
class LoRASqueezeConfig(VariantConfig):
    # lr_mult stays 1: the method trains plain LoRA (at the source rank); the paper's rates were not reachable.
    source_r: int = 0
    """r_src, the training rank at the start; 0: 4·r. `r` is the deployment rank after the squeeze."""
    squeeze_every: int = 0
    """In-Squeeze: re-factorise to a lower rank every this many steps until it reaches r; 0: Post-Squeeze only."""
    squeeze_factor: float = 0.5
    """Each in-training squeeze keeps ⌈factor · current rank⌉ components, at least r; 0: straight to r
    (Cont-Squeeze)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.source_r == 0:
            self.source_r = 4 * self.r
        check(self.source_r >= self.r, f"variant.source_r must be >= variant.r, got {self.source_r}")
        check(self.squeeze_every >= 0, f"variant.squeeze_every must be >= 0, got {self.squeeze_every}")
        check(0 <= self.squeeze_factor < 1, f"variant.squeeze_factor must be in [0, 1), got {self.squeeze_factor}")


@VARIANTS.register("lora_squeeze", config=LoRASqueezeConfig)
class LoRASqueeze(Variant):
    name = "lora_squeeze"
    paper = (
        "LoRA-Squeeze: Simple and Effective Post-Tuning and In-Tuning Compression of LoRA Modules "
        "(Vulić et al., arXiv 2602.10993)"
    )
    taxonomy = "rank"
    tags = ("budgeting", "svd")
    params_formula = "source_r·(d_in + d_out) in training; r·(d_in + d_out) after the squeeze"

    def __init__(self, cfg: LoRASqueezeConfig):
        super().__init__(cfg)
        self.phases: list[dict[str, int]] = []
        """Every in-training squeeze: the step and the rank after it."""
        self.post_squeeze: dict[str, int] | None = None
        self.rank = cfg.source_r
        """The rank the in-training schedule has reached."""

    def make_layer(self, base: nn.Module) -> SqueezeLinear:
        return SqueezeLinear(base, self.cfg.source_r, self.cfg.alpha, self.cfg.dropout)

    def layer_params(self, d_in: int, d_out: int) -> int:
        return self.cfg.source_r * (d_in + d_out)

    def squeeze(self, model: nn.Module, k: int) -> None:
        for _, layer in squeeze_layers(model):
            if layer.r > k:
                layer.squeeze(k)

    def on_train_batch_end(self, model: nn.Module, step: int) -> bool | None:
        every = self.cfg.squeeze_every
        if every == 0 or step % every or self.rank <= self.cfg.r:
            return None
        self.rank = max(self.cfg.r, math.ceil(self.cfg.squeeze_factor * self.rank))
        self.squeeze(model, self.rank)
        self.phases.append({"step": step, "rank": self.rank})
        return True

    def on_train_end(self, model: nn.Module) -> None:
        self.post_squeeze = {"from": self.rank, "to": self.cfg.r}
        self.squeeze(model, self.cfg.r)
        self.rank = self.cfg.r

    def summary(self, model: nn.Module) -> dict[str, Any]:
        return {
            "ranks": {name: layer.r for name, layer in squeeze_layers(model)},
            "source_r": self.cfg.source_r,
            "phases": self.phases,
            "post_squeeze": self.post_squeeze,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "phases": self.phases}

    def load_state_dict(self, state: dict[str, Any], model: nn.Module) -> None:
        self.rank = state.get("rank", self.cfg.source_r)
        self.phases = list(state.get("phases", []))
