"""VB-LoRA — "VB-LoRA: Extreme Parameter Efficient Fine-Tuning with Vector Banks" (Li, Han, Ji, NeurIPS 2024,
arXiv 2405.15179).

Update rule: LoRA's `y = W0 x + b + B A dropout(x)` (no α/r scale, as in the paper and PEFT: `alpha` is unused), with
A's rows and B's columns cut into sub-vectors of length b (`vector_length`), each a top-k admixture of one vector bank
shared by the whole model (`lf_shared.vblora_bank`, h × b, h = `num_vectors`, trainable):

    v = Σ_{j ∈ top-k(ℓ)} softmax_{top-k}(ℓ)_j · bank_j,    ℓ ∈ R^h the sub-vector's own logits

A ∈ R^{r×d_in}: each of its r rows is ⌈d_in/b⌉ sub-vectors end to end; B ∈ R^{d_out×r}: each column ⌈d_out/b⌉.

Init (PEFT's and the official code's): bank U(-0.02, 0.02), logits N(0, 0.1²); both factors are non-zero, so the
model does not start exactly at the base model (ΔW is small). Trainable parameters: h·r·(⌈d_in/b⌉ + ⌈d_out/b⌉) logits
per layer, plus the bank h·b once per model.

Choices: the official code and PEFT require b to divide d_in and d_out. Here a dimension that b does not divide gets
⌈d/b⌉ sub-vectors, the last one cut short (the layout is otherwise PEFT's, so when b divides both this is exactly
their method): the tiny CNN's 3×3 stem, seen as 8 × 27, and MiniLM's 384-wide layers work with the paper's b = 256.
Defaults are PEFT's (r = 4, h = 256, b = 256, k = 2; the paper's RoBERTa-base runs use h = 90, its Llama-2 runs
h = 2048). The official GLUE scripts train the bank at 1e-3 and the logits at 1e-2 where LoRA uses 5e-4 (Hu et al.):
`lr_mult` = 2 for the bank (and the task head), and the logits at `logits_lr_ratio` = 10 times that.

Computation: A and B are built from the logits and the bank (top-k, softmax, a gather of k·b per sub-vector) inside
the factored-layer functions of vera.py, which keep only x, the logits and the bank for backward and rebuild A and B
there; the rest is LoRA's computation (merged weight with many tokens, two branches otherwise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lorafactory.errors import UserError, check
from lorafactory.variants.base import (
    VARIANTS,
    SharedRef,
    VariantConfig,
    adapter_layers,
    named_adapter_layers,
    peft_layer_state,
)
from lorafactory.variants.vera import FactoredLinear, SharedStateVariant


def admix(logits: Tensor, bank: Tensor, topk: int) -> Tensor:
    """Each row of `logits` (..., h) picks its top-k bank vectors and mixes them with the softmax of their logits:
    (..., b)."""
    top, index = logits.topk(topk, dim=-1)
    return torch.einsum("...k,...kb->...b", top.softmax(dim=-1), bank[index])


class VBLoRALinear(FactoredLinear):
    """LoRA whose factors are assembled from the model's vector bank by `vblora_logits_A` (r × ⌈d_in/b⌉ × h) and
    `vblora_logits_B` (⌈d_out/b⌉ × r × h)."""

    def __init__(self, base: nn.Module, shared: SharedRef, cfg: VBLoRAConfig):
        super().__init__(base, shared, 1.0, cfg.dropout)
        self.r, self.topk, b, h = cfg.r, cfg.topk, cfg.vector_length, cfg.num_vectors
        factory = {"dtype": base.weight.dtype, "device": base.weight.device}
        logits_A = torch.empty(cfg.r, math.ceil(self.in_features / b), h, **factory)
        logits_B = torch.empty(math.ceil(self.out_features / b), cfg.r, h, **factory)
        self.vblora_logits_A = nn.Parameter(nn.init.normal_(logits_A, 0.0, cfg.init_logits_std))
        self.vblora_logits_B = nn.Parameter(nn.init.normal_(logits_B, 0.0, cfg.init_logits_std))

    def factor_inputs(self) -> tuple[Tensor, ...]:
        return self.vblora_logits_A, self.vblora_logits_B, self.shared().vblora_bank

    def factors(self, logits_A: Tensor, logits_B: Tensor, bank: Tensor) -> tuple[Tensor, Tensor]:
        A = admix(logits_A, bank, self.topk).reshape(self.r, -1)[:, : self.in_features]
        B = admix(logits_B, bank, self.topk).transpose(1, 2).reshape(-1, self.r)[: self.out_features]
        return A, B

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, topk={self.topk}"


@dataclass
class VBLoRAConfig(VariantConfig):
    r: int = 4
    lr_mult: float = 2.0  # official GLUE scripts: bank 1e-3, LoRA 5e-4
    num_vectors: int = 256
    """h: vectors in the model's bank."""
    vector_length: int = 256
    """b: length of each bank vector, the sub-vectors A and B are cut into."""
    topk: int = 2
    """k: bank vectors mixed into each sub-vector."""
    logits_lr_ratio: float = 10.0
    """Learning rate of the logits relative to the run's (the bank's and the head's)."""
    init_bank_bound: float = 0.02
    """The bank starts U(-bound, bound); not 0, which would give the logits no gradient."""
    init_logits_std: float = 0.1
    """The logits start N(0, std²)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.num_vectors >= 1, f"variant.num_vectors must be >= 1, got {self.num_vectors}")
        check(self.vector_length >= 1, f"variant.vector_length must be >= 1, got {self.vector_length}")
        check(
            1 <= self.topk <= self.num_vectors,
            f"variant.topk must be in [1, num_vectors={self.num_vectors}], got {self.topk}",
        )
        check(self.logits_lr_ratio > 0, f"variant.logits_lr_ratio must be > 0, got {self.logits_lr_ratio}")
        check(self.init_bank_bound > 0, f"variant.init_bank_bound must be > 0, got {self.init_bank_bound}")
        check(self.init_logits_std >= 0, f"variant.init_logits_std must be >= 0, got {self.init_logits_std}")


@VARIANTS.register("vblora", config=VBLoRAConfig)
class VBLoRA(SharedStateVariant):
    name = "vblora"
    paper = (
        "VB-LoRA: Extreme Parameter Efficient Fine-Tuning with Vector Banks "
        "(Li et al., NeurIPS 2024, arXiv 2405.15179)"
    )
    taxonomy = "rank"
    tags = ("sharing",)
    zero_init = False
    params_formula = "h·r·(⌈d_in/b⌉ + ⌈d_out/b⌉), plus h·b once per model"
    peft = "VBLoRAConfig()"

    def init_shared(self, shared: nn.Module, targets: list[nn.Module]) -> None:
        factory = {"dtype": targets[0].weight.dtype, "device": targets[0].weight.device}
        bank = torch.empty(self.cfg.num_vectors, self.cfg.vector_length, **factory)
        bound = self.cfg.init_bank_bound
        shared.vblora_bank = nn.Parameter(nn.init.uniform_(bank, -bound, bound))

    def make_layer(self, base: nn.Module) -> VBLoRALinear:
        return VBLoRALinear(base, self.shared, self.cfg)

    def layer_params(self, d_in: int, d_out: int) -> int:
        b = self.cfg.vector_length
        return self.cfg.num_vectors * self.cfg.r * (math.ceil(d_in / b) + math.ceil(d_out / b))

    def expected_params(self, model: nn.Module) -> int:
        return super().expected_params(model) + self.cfg.num_vectors * self.cfg.vector_length

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        logits = [p for layer in adapter_layers(model) for p in (layer.vblora_logits_A, layer.vblora_logits_B)]
        ids = {id(p) for p in logits}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        return [
            {"params": rest, "lr": lr, "name": "bank+head"},
            {"params": logits, "lr": lr * self.cfg.logits_lr_ratio, "name": "logits"},
        ]

    def peft_config(self, targets: list[str], head: list[str]) -> Any:
        from peft import VBLoRAConfig as PeftVBLoRAConfig

        return PeftVBLoRAConfig(
            r=self.cfg.r,
            num_vectors=self.cfg.num_vectors,
            vector_length=self.cfg.vector_length,
            topk=self.cfg.topk,
            target_modules=targets,
            modules_to_save=head,
            vblora_dropout=self.cfg.dropout,
            init_vector_bank_bound=self.cfg.init_bank_bound,
            init_logits_std=self.cfg.init_logits_std,
        )

    def peft_export(
        self, model: nn.Module, base: nn.Module, targets: list[str], head: list[str]
    ) -> tuple[Any, dict[str, Tensor]] | None:
        b = self.cfg.vector_length
        for name, layer in named_adapter_layers(model):
            if layer.in_features % b or layer.out_features % b:
                raise UserError(
                    f"variant=vblora: '{name}' ({layer.out_features} × {layer.in_features}) is not made of whole "
                    f"sub-vectors of vector_length={b}, which PEFT's VB-LoRA requires (ours cuts the last one "
                    "short); use --merged"
                )
        state = peft_layer_state(
            model, lambda layer: {"vblora_logits_A": layer.vblora_logits_A, "vblora_logits_B": layer.vblora_logits_B}
        )
        return self.peft_config(targets, head), state | {"base_model.vblora_vector_bank": model.lf_shared.vblora_bank}
