"""LoRA+ — "LoRA+: Efficient Low Rank Adaptation of Large Models" (Hayou, Ghosh, Yu, ICML 2024, arXiv 2402.12354).

Update rule: LoRA's forward, `y = W0 x + b + s · B A x`, trained with a larger learning rate for B than for A:

    η_B = λ · η_A,   λ = `lr_ratio` (the paper recommends 2^4)

A and every non-adapter trainable parameter (the task head) use η_A = the run's learning rate. (PEFT's
`create_loraplus_optimizer` also puts the head's biases in B's group; here the head keeps the base rate, so the
head trains the same way for every variant.) The paper advises a somewhat smaller base rate than LoRA's, hence the
default `lr_mult` of 0.5. Init and parameter count are LoRA's: r · (d_in + d_out).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from lorafactory.errors import check
from lorafactory.variants.base import VARIANTS, VariantConfig, adapter_layers
from lorafactory.variants.lora import LoRA


@dataclass
class LoRAPlusConfig(VariantConfig):
    lr_mult: float = 0.5
    lr_ratio: float = 16.0
    """λ = η_B / η_A."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.lr_ratio > 0, f"variant.lr_ratio must be > 0, got {self.lr_ratio}")


@VARIANTS.register("loraplus", config=LoRAPlusConfig)
class LoRAPlus(LoRA):
    name = "loraplus"
    paper = "LoRA+: Efficient Low Rank Adaptation of Large Models (Hayou et al., ICML 2024, arXiv 2402.12354)"
    taxonomy = "optimization"
    tags = ("learning-rate",)
    peft = "create_loraplus_optimizer(...)"

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        b_params = [layer.lora_B for layer in adapter_layers(model)]
        b_ids = {id(p) for p in b_params}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in b_ids]
        return [
            {"params": rest, "lr": lr, "name": "A+head"},
            {"params": b_params, "lr": lr * self.cfg.lr_ratio, "name": "B"},
        ]
