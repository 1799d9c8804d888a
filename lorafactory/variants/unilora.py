"""Uni-LoRA — "Uni-LoRA: One Vector is All You Need" (Li, Ji, Han, arXiv 2506.00799).

Update rule: LoRA's `y = W0 x + b + B A dropout(x)` (no α/r scale, as in the official code and PEFT: `alpha` is
unused), where every entry of every layer's A and B, D of them in all, is one entry of a single trainable vector
θ ∈ R^d (`lf_shared.unilora_theta`) times a fixed factor:

    vec(A_1, B_1, ..., A_L, B_L) = P θ,    P ∈ R^{D×d} with one non-zero per row, P_{t, j(t)} = 1 / √n_{j(t)}

j(t) ∈ {1..d} is the slot entry t reads and n_j the number of entries reading slot j. The assignment is balanced:
every slot is read ⌊D/d⌋ or ⌈D/d⌉ times, so PᵀP = I and the projection is an isometry (‖P θ‖ = ‖θ‖).

Init: θ ~ U(-0.02, 0.02) (PEFT's `init_theta_d_bound`); A and B both start non-zero, so the model does not start
exactly at the base model. Trainable parameters: d for the whole model, none per layer.

Choices: the assignment is a random permutation of the D entries, entry t of it taking slot (t mod d): balanced as
PEFT's (its own shuffle gives other slots, from the same kind of draw; the official NLU code draws slots
independently, which leaves some unused). It is drawn from a CPU generator seeded with `projection_seed`, over the
adapted layers in model order, A before B, each row-major, and is regenerated rather than saved (non-persistent
buffers, as PEFT's default `save_indices=False`); the factors 1/√n_j are one d-vector (`lf_shared.unilora_norm`),
applied to θ before the gather. When d > D (a small model), d − D slots are read by no entry and never train, as in
PEFT; P is then an isometry from the slots in use. Defaults are PEFT's
(r = 4, d = 256); the official RoBERTa-base GLUE scripts use d = 23,040 on query and value, at a learning rate of 5e-3
where LoRA uses 4e-4–5e-4 (Hu et al.): `lr_mult` = 10.

Computation: A and B are gathers from θ (r·(d_in + d_out) entries) inside the factored-layer functions of vera.py,
which keep only x and θ for backward and rebuild A and B there; the gradient reaches θ by scatter-add. The rest is
LoRA's computation (merged weight with many tokens, two branches otherwise).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lorafactory.errors import check
from lorafactory.variants.base import (
    HEAD_NAMES,
    VARIANTS,
    SharedRef,
    VariantConfig,
    adapter_layers,
    peft_layer_state,
)
from lorafactory.variants.vera import FactoredLinear, SharedStateVariant


class UniLoRALinear(FactoredLinear):
    """LoRA whose factors are gathered from the model's vector θ through `unilora_index_A` (r × d_in) and
    `unilora_index_B` (d_out × r), each entry scaled by its slot's 1/√n."""

    def __init__(self, base: nn.Module, shared: SharedRef, r: int, dropout: float = 0.0):
        super().__init__(base, shared, 1.0, dropout)
        self.r = r
        index = {"dtype": torch.long, "device": base.weight.device}
        self.register_buffer("unilora_index_A", torch.zeros(r, self.in_features, **index), persistent=False)
        self.register_buffer("unilora_index_B", torch.zeros(self.out_features, r, **index), persistent=False)

    def factor_inputs(self) -> tuple[Tensor, ...]:
        return (self.shared().unilora_theta,)

    def factors(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        scaled = theta * self.shared().unilora_norm
        return scaled[self.unilora_index_A], scaled[self.unilora_index_B]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}"


def normalise(model: nn.Module) -> None:
    """Set the model's per-slot factors 1/√n_j from the slots its layers read (n_j readers of slot j)."""
    shared = model.lf_shared
    layers = adapter_layers(model)
    slots = torch.cat([t.flatten() for layer in layers for t in (layer.unilora_index_A, layer.unilora_index_B)])
    counts = torch.bincount(slots, minlength=shared.unilora_theta.numel())
    shared.unilora_norm.copy_(counts.clamp_min(1).to(shared.unilora_norm.dtype).rsqrt())


@dataclass
class UniLoRAConfig(VariantConfig):
    r: int = 4
    lr_mult: float = 10.0  # official RoBERTa-base GLUE scripts: 5e-3, LoRA 4e-4–5e-4
    theta_d_length: int = 256
    """d: length of the model's one trainable vector (slots beyond the number of LoRA entries it feeds stay unused)."""
    projection_seed: int = 42
    """Seed of the CPU generator that assigns every LoRA entry its slot of θ."""
    init_theta_bound: float = 0.02
    """θ starts U(-bound, bound); not 0, where A = B = 0 would get no gradient."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.theta_d_length >= 1, f"variant.theta_d_length must be >= 1, got {self.theta_d_length}")
        check(self.init_theta_bound > 0, f"variant.init_theta_bound must be > 0, got {self.init_theta_bound}")


@VARIANTS.register("unilora", config=UniLoRAConfig)
class UniLoRA(SharedStateVariant):
    name = "unilora"
    paper = "Uni-LoRA: One Vector is All You Need (Li et al., arXiv 2506.00799)"
    taxonomy = "rank"
    tags = ("sharing",)
    zero_init = False
    params_formula = "0 per layer; d once per model"
    peft = "UniLoraConfig()"

    def init_shared(self, shared: nn.Module, targets: list[nn.Module]) -> None:
        d = self.cfg.theta_d_length
        factory = {"dtype": targets[0].weight.dtype, "device": targets[0].weight.device}
        bound = self.cfg.init_theta_bound
        shared.unilora_theta = nn.Parameter(nn.init.uniform_(torch.empty(d, **factory), -bound, bound))
        shared.register_buffer("unilora_norm", torch.ones(d, **factory), persistent=False)

    def adapt(self, model: nn.Module, head: Sequence[str] = HEAD_NAMES) -> nn.Module:
        super().adapt(model, head)
        layers = adapter_layers(model)
        indices = [t for layer in layers for t in (layer.unilora_index_A, layer.unilora_index_B)]
        entries = sum(t.numel() for t in indices)
        generator = torch.Generator().manual_seed(self.cfg.projection_seed)
        slots = (torch.randperm(entries, generator=generator) % self.cfg.theta_d_length).split(
            [t.numel() for t in indices]
        )
        for index, chunk in zip(indices, slots, strict=True):
            index.copy_(chunk.view(index.shape))
        normalise(model)
        return model

    def make_layer(self, base: nn.Module) -> UniLoRALinear:
        return UniLoRALinear(base, self.shared, self.cfg.r, self.cfg.dropout)

    def layer_params(self, d_in: int, d_out: int) -> int:
        return 0

    def expected_params(self, model: nn.Module) -> int:
        return self.cfg.theta_d_length

    def peft_config(self, targets: list[str], head: list[str]) -> Any:
        from peft import UniLoraConfig

        return UniLoraConfig(
            r=self.cfg.r,
            theta_d_length=self.cfg.theta_d_length,
            proj_seed=self.cfg.projection_seed,
            init_theta_d_bound=self.cfg.init_theta_bound,
            target_modules=targets,
            modules_to_save=head,
            unilora_dropout=self.cfg.dropout,
        )

    def peft_export(
        self, model: nn.Module, base: nn.Module, targets: list[str], head: list[str]
    ) -> tuple[Any, dict[str, Tensor]] | None:
        config = self.peft_config(targets, head)
        config.save_indices = True  # our slot assignment travels with θ: PEFT's own draw from the seed differs
        norm = model.lf_shared.unilora_norm
        state = peft_layer_state(
            model,
            lambda layer: {
                "unilora_indices_A": layer.unilora_index_A,
                "unilora_indices_B": layer.unilora_index_B,
                "unilora_scales_A": norm[layer.unilora_index_A],
                "unilora_scales_B": norm[layer.unilora_index_B],
            },
        )
        return config, state | {"base_model.unilora_theta_d": model.lf_shared.unilora_theta}
