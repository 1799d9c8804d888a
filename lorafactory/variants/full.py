"""Full fine-tuning — the reference ceiling every parameter-efficient method is measured against (as the LoRA paper,
arXiv 2106.09685, and "A Unified Study of LoRA Variants", arXiv 2601.22708, compare with it).

Update rule: every pretrained weight W trains, W ← W − η·update(∂L/∂W), with the task head; nothing is added to the
model, so there is nothing to merge (the trained model is the merged one). Trainable parameters: all of the base
model's (the head aside), whatever the targets say (`variant.targets` is ignored).

On a causal LM, "every pretrained weight" includes the output layer (`lm_head`, which every adapter leaves frozen and
unadapted): it is pretrained, not a task head, so it trains here at full fine-tuning's rate, as full fine-tuning of a
language model trains it (SmolLM2 ties it to the input embeddings: the shared matrix trains once).

Its usual learning rate is much smaller than LoRA's: `lr_mult` = 0.1, measured on SST-2 (reports/sst2_lr_study:
MiniLM-L6, 6,000 sentences, 2 seeds, rates chosen on the 500 held-out training sentences): at 1e-4 the selection
accuracy is 0.877, against 0.870 at 2e-4 and 0.850 at 5e-5 (validation 0.845 ± 0.002), where the task's LoRA rate is
1e-3. The LoRA paper's RoBERTa/DeBERTa GLUE settings put it ~20× below LoRA's (full fine-tuning at 1e-5–3e-5, LoRA at
4e-4–5e-4); the study ran 0.05 (2.5e-5 … 2e-4), which brackets the optimum. The head trains at LoRA's rate, as for
every variant. Saved adapter state = the whole trained model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from lorafactory.targets import HEAD_NAMES, in_head
from lorafactory.variants.base import VARIANTS, Variant, VariantConfig


@dataclass
class FullConfig(VariantConfig):
    lr_mult: float = 0.1
    """Full fine-tuning's usual rate is ~10× below LoRA's (measured on SST-2; see the module docstring)."""


@VARIANTS.register("full", config=FullConfig)
class Full(Variant):
    name = "full"
    paper = "Full fine-tuning (the reference of LoRA, Hu et al., ICLR 2022, arXiv 2106.09685)"
    taxonomy = "baseline"
    tags = ("ceiling",)
    params_formula = "every pretrained weight"
    memory_note = "gradients and Adam moments for every weight: ~3× the model's size on top of it"
    quantized_base = "it trains every pretrained weight, and 4-bit codes cannot be trained"

    def adapt(self, model: nn.Module, head: Sequence[str] = HEAD_NAMES) -> nn.Module:
        self.check_base(model)
        self._head = tuple(head)
        trained = {id(p) for p in self.trained_parameters(model)}
        for param in model.parameters():
            param.requires_grad_(id(param) in trained)  # the recipe unfreezes the head itself
        return model

    def trained_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        head = getattr(self, "_head", HEAD_NAMES)
        # A causal LM's output layer is in `head` (no adapter may touch it) but is pretrained: it trains here.
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        pretrained = {id(p) for p in output.parameters()} if isinstance(output, nn.Module) else set()
        return [p for n, p in model.named_parameters() if not in_head(n, head) or id(p) in pretrained]

    def expected_params(self, model: nn.Module) -> int:
        return sum(p.numel() for p in self.trained_parameters(model))

    def layer_params(self, d_in: int, d_out: int) -> int:
        return d_in * d_out
