"""LoRA-GA — "LoRA-GA: Low-Rank Adaptation with Gradient Approximation" (Wang, Yu, Li, NeurIPS 2024,
arXiv 2407.05000).

Update rule: LoRA's, `y = W_res x + b + s · B A x` (s = alpha / r), initialised so that LoRA's first step follows
the full fine-tuning gradient. With G = ∂L/∂W0 averaged over `init_batches` training batches and its (randomized,
q = min(4r, d), 4 subspace iterations) SVD `G ≈ U S Vᵀ`, the default direction `ArB2r` takes

    A = ζ · V[:, :r]ᵀ,    B = ζ · U[:, r:2r],    ζ = d_out^{1/4} / √γ  (scale `stable`, γ = `stable_gamma`)

and rewrites the base to W_res = W0 − s · B A, so the model equals the base at step 0. Then LoRA's first gradient
step moves s·B A by −η·s²(B Bᵀ G + G Aᵀ A): the best rank-2r approximation of G, exactly with scale `gd` (ζ = 1/s),
its two halves weighted by s²ζ² otherwise. Other directions: `ArBr` (A the odd, B the even components of the first 2r),
`A2rBr` (A the second r, B the first r). Other scales: `gd` (ζ = 1/s), `unit` (ζ = 1).
Trainable parameters per layer: r · (d_in + d_out).

Choices: the paper and its official code (Outsider565/LoRA-GA, `lora_ga_init`) use the orthonormal singular vectors and
scale both A and B by ζ (`convention="official"`, the default). PEFT 0.21's `lora_ga_init` differs: B carries the
gradient's singular values (B = U[:, r:2r] diag(S[r:2r])) and `stable` scales B alone; `convention="peft"` reproduces
it (the parity test checks it against PEFT). When min(d_in, d_out) < 2r there are fewer than 2r singular triplets: the
factor rows or columns of the missing ones are zero (they start as LoRA's B does); the official code does not handle
it. The gradient is estimated in training mode, as both implementations do. Learning rate: our companion study
(LoRAFactory, arXiv 2601.22708) finds LoRA-GA's best rate about 18× below LoRA's (the paper itself trains both at the
same rate); `lr_mult` = 1/3 goes that way as far as the toy contract problem allows (there the task head trains at the
same scaled rate, and on tiny-cnn nothing below ~1e-2 learns in 25 steps). It will be re-set from our own sweeps.

Memory (init only): `weight_gradients` makes the adapted layers' base weights require grad for the duration of the
estimation (everything else frozen, flags restored after) and moves each weight's gradient into an fp32 d_out × d_in
sum in host memory as soon as it is complete (a post-accumulate-grad hook), so the device holds at most one layer's
dense gradient at a time; host memory holds one fp32 sum per adapted layer (the adapted weights' size in fp32) until
the SVDs are done. Training costs what LoRA costs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lorafactory.errors import ConfigError, check
from lorafactory.variants.base import VARIANTS, AdapterLayer, VariantConfig, adapter_layers
from lorafactory.variants.lora import LoRA, LoRALinear

DIRECTIONS = ("ArB2r", "A2rBr", "ArBr")
SCALES = ("stable", "gd", "unit")
CONVENTIONS = ("official", "peft")


def weight_gradients(
    model: nn.Module,
    layers: Sequence[AdapterLayer],
    batches: Iterable[dict[str, Tensor]],
    loss_fn: Callable[[nn.Module, dict[str, Tensor]], Tensor],
    num_batches: int,
) -> list[Tensor]:
    """Σ over the next `num_batches` batches of ∂loss/∂W0 for each layer's frozen base weight, as fp32 d_out × d_in
    matrices in host memory, one per layer.

    Only the layers' base weights require grad during the passes (so backward does no other parameter's work), and
    each one's gradient leaves the device as soon as autograd has accumulated it; requires_grad flags and the model's
    train/eval mode are restored afterwards, and no `.grad` is left behind."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    was_training = model.training
    weights = [layer.base.weight for layer in layers]
    sums = [torch.zeros(layer.out_features, layer.in_features, dtype=torch.float32) for layer in layers]

    def collect(index: int) -> Callable[[Tensor], None]:
        def hook(weight: Tensor) -> None:
            sums[index].add_(weight.grad.detach().reshape(sums[index].shape).to("cpu", torch.float32))
            weight.grad = None

        return hook

    handles = []
    try:
        for p in params:
            p.requires_grad_(False)
        for index, weight in enumerate(weights):
            weight.requires_grad_(True)
            handles.append(weight.register_post_accumulate_grad_hook(collect(index)))
        model.train()
        stream = iter(batches)
        for _ in range(num_batches):
            loss_fn(model, next(stream)).backward()
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
        for weight in weights:  # only left behind if a pass failed
            weight.grad = None
        model.train(was_training)
    return sums


class LoRAGALinear(LoRALinear):
    """LoRA whose factors and base weight are set from a gradient (`init_from_gradient`); until then, LoRA's init."""

    saves_base = True

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float = 0.0):
        super().__init__(base, r, scaling, dropout)
        if r > min(self.in_features, self.out_features):
            raise ConfigError(
                f"variant.r={r} exceeds the rank of a {self.out_features}×{self.in_features} weight; LoRA-GA needs "
                f"r <= {min(self.in_features, self.out_features)}"
            )

    @torch.no_grad()
    def init_from_gradient(self, grad: Tensor, direction: str, scale: str, gamma: float, convention: str) -> None:
        weight = self.weight
        G = grad.to(weight.device, torch.float32)
        r, k = self.r, min(G.shape)
        U, S, V = torch.svd_lowrank(G, q=min(4 * r, k), niter=4)
        m = min(2 * r, S.shape[0])
        U, S, Vh = U[:, :m], S[:m], V[:, :m].t()
        if direction == "ArB2r":
            a_idx, b_idx = torch.arange(0, r), torch.arange(r, 2 * r)
        elif direction == "A2rBr":
            a_idx, b_idx = torch.arange(r, 2 * r), torch.arange(0, r)
        else:  # ArBr
            a_idx, b_idx = torch.arange(1, 2 * r, 2), torch.arange(0, 2 * r, 2)
        A = self._take(Vh, a_idx, dim=0)
        B = self._take(U, b_idx, dim=1)
        if convention == "peft":
            B = B * self._take(S, b_idx, dim=0)
        zeta = {"stable": self.out_features**0.25 / gamma**0.5, "gd": 1 / self.scaling, "unit": 1.0}[scale]
        if convention == "official" or scale == "gd":
            A = A * zeta
        B = B * zeta
        self.lora_A.copy_(A)
        self.lora_B.copy_(B)
        dtype = torch.promote_types(weight.dtype, torch.float32)
        self.write_weight(weight.to(dtype) - self.delta_weight().to(dtype))  # from the rounded factors

    @staticmethod
    def _take(t: Tensor, idx: Tensor, dim: int) -> Tensor:
        """`t.index_select(dim, idx)` with zeros where an index is past the available triplets."""
        size, idx = t.shape[dim], idx.to(t.device)
        picked = t.index_select(dim, idx.clamp_max(size - 1))
        shape = [1] * t.dim()
        shape[dim] = len(idx)
        return picked * (idx < size).to(t.dtype).view(shape)


@dataclass
class LoRAGAConfig(VariantConfig):
    lr_mult: float = 1 / 3  # LoRAFactory (arXiv 2601.22708): ~1/18 of LoRA's; see the module docstring
    init_batches: int = 4
    """Training batches the gradient is averaged over (the official default is 128 samples: 4 batches of 32)."""
    direction: str = "ArB2r"
    """Which gradient singular components A and B take: `ArB2r`, `A2rBr` or `ArBr`."""
    scale: str = "stable"
    """`stable` (ζ = d_out^{1/4}/√γ), `gd` (ζ = 1/s) or `unit` (ζ = 1)."""
    stable_gamma: float = 16.0
    """γ of the `stable` scale."""
    convention: str = "official"
    """`official` (paper and official code: orthonormal factors, both scaled) or `peft` (PEFT 0.21: B carries the
    singular values, `stable` scales B only)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.init_batches >= 1, f"variant.init_batches must be >= 1, got {self.init_batches}")
        check(self.direction in DIRECTIONS, f"variant.direction must be one of {DIRECTIONS}, got '{self.direction}'")
        check(self.scale in SCALES, f"variant.scale must be one of {SCALES}, got '{self.scale}'")
        check(self.stable_gamma > 0, f"variant.stable_gamma must be > 0, got {self.stable_gamma}")
        check(
            self.convention in CONVENTIONS,
            f"variant.convention must be one of {CONVENTIONS}, got '{self.convention}'",
        )


@VARIANTS.register("lora_ga", config=LoRAGAConfig)
class LoRAGA(LoRA):
    name = "lora_ga"
    paper = "LoRA-GA: Low-Rank Adaptation with Gradient Approximation (Wang et al., NeurIPS 2024, arXiv 2407.05000)"
    taxonomy = "initialization"
    tags = ("svd", "gradient")
    peft = 'LoraConfig(init_lora_weights="lora_ga") + preprocess_loraga'
    quantized_base = "its init needs the full-precision gradient of every target weight W0 and rewrites W0"
    memory_note = "init only: one fp32 d_out×d_in gradient sum per adapted layer in host memory"

    def make_layer(self, base: nn.Module) -> LoRAGALinear:
        return LoRAGALinear(base, self.cfg.r, self.scaling, self.cfg.dropout)

    def init_from_data(self, model: nn.Module, batches: Iterable[dict[str, Tensor]], loss_fn: Any) -> None:
        layers = adapter_layers(model)
        sums = weight_gradients(model, layers, batches, loss_fn, self.cfg.init_batches)
        cfg = self.cfg
        for layer, total in zip(layers, sums, strict=True):
            layer.init_from_gradient(
                total / cfg.init_batches, cfg.direction, cfg.scale, cfg.stable_gamma, cfg.convention
            )

    def peft_config(self, targets: list[str], head: list[str]) -> Any:
        from peft import LoraConfig, LoraGAConfig

        scale = {"stable": "stable", "gd": "gd_scale", "unit": "unit"}[self.cfg.scale]
        return LoraConfig(
            r=self.cfg.r,
            lora_alpha=self.cfg.alpha,
            lora_dropout=self.cfg.dropout,
            target_modules=targets,
            modules_to_save=head,
            init_lora_weights="lora_ga",
            lora_ga_config=LoraGAConfig(
                direction=self.cfg.direction, scale=scale, stable_gamma=int(self.cfg.stable_gamma)
            ),
        )
