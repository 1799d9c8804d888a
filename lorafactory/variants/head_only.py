"""Head only (linear probe) — the reference floor: the pretrained model stays frozen and only the new task head (and
the modules a task trains in full, e.g. MiniLM's pooler for STS-B) trains, as linear-probe baselines do in "A Unified
Study of LoRA Variants" (arXiv 2601.22708) and in the LoRA paper's comparisons (arXiv 2106.09685).

Update rule: W ← W (frozen) for every pretrained weight; y = head(f_W0(x)), head trained. Zero adapter parameters;
`variant.targets` is ignored. Anything an adapter reaches above this floor is what the adapter learned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from lorafactory.targets import HEAD_NAMES
from lorafactory.variants.base import VARIANTS, Variant, VariantConfig, freeze


@dataclass
class HeadOnlyConfig(VariantConfig):
    pass


@VARIANTS.register("head_only", config=HeadOnlyConfig)
class HeadOnly(Variant):
    name = "head_only"
    paper = "Linear probe: the task head alone (the floor of LoRA's comparisons, Hu et al., arXiv 2106.09685)"
    taxonomy = "baseline"
    tags = ("floor",)
    params_formula = "0"

    def adapt(self, model: nn.Module, head: Sequence[str] = HEAD_NAMES) -> nn.Module:
        freeze(model)  # the recipe unfreezes the head
        return model

    def trained_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return []

    def layer_params(self, d_in: int, d_out: int) -> int:
        return 0
