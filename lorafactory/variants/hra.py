"""HRA — "Bridging The Gap between Low-rank and Orthogonal Adaptation via Householder Reflection Adaptation"
(Yuan, Liu, Xu, NeurIPS 2024, arXiv 2405.17484).

Update rule: the frozen weight is multiplied on the input side by a chain of r Householder reflections,

    W' = W0 H,   H = H_1 H_2 ⋯ H_r,   H_i = I − 2 u_i u_iᵀ / ‖u_i‖²,   u_i ∈ R^{d_in},   y = W' x + b

H is orthogonal for any u (a product of reflections), so W' keeps W0's singular values, while
ΔW = W' − W0 = W0 (H − I) has rank at most r: the bridge between OFT and LoRA the title refers to.
Init: r/2 kaiming-uniform vectors, each used twice in a row (u_1 = u_2, u_3 = u_4, ...): a reflection repeated is the
identity, so H = I and the model equals the base at step 0 (PEFT and the official code do the same). An odd r could
not start at H = I (a product of an odd number of reflections has determinant −1), so r must be even.
Trainable parameters per layer: r · d_in.

Choices where the paper and the code leave room:
- Regulariser: the paper's λ‖I − ÛᵀÛ‖_F on the column-normalised U (Û) keeps the reflections apart. The official
  GLUE runs leave it out (commented out in their trainer) and its LLaMA runs use λ = 1e-4; PEFT has none. Default
  `orth_reg` = 0 (the GLUE setting, PEFT's), added through `aux_loss` when > 0.
- The Gram–Schmidt variant (PEFT's `apply_GS`) is not implemented: with the paired init its second vector is zero
  after orthogonalisation (0/0), and neither the official GLUE configuration nor PEFT's default uses it.
- `variant.dropout` must stay 0 (HRA has no dropout).

Computation: the reflections are applied in compact WY form, H = I − U T Uᵀ with U = [u_1 … u_r] and the r × r upper
triangular T from T⁻¹ = striu(UᵀU) + diag(‖u_i‖²)/2 (Schreiber–Van Loan). The layer rotates its input,
x ↦ x Hᵀ = x − (x U)(U T)ᵀ, two rank-r products per token as in LoRA, and runs the frozen layer on the result; the
reflections' normalisation is inside T, so no step normalises U. PEFT instead multiplies r dense d_in × d_in
updates into H and forms W0 H every step (r·d_in² + d_out·d_in² work). Layers small for the number of tokens
(d_out < ~12r) run one GEMM with W0 H = W0 − (W0 U T) Uᵀ instead (see OFT's `merge_pays`). Merging writes W0 H and
unmerging multiplies by Hᵀ, exact to round-off.

Measured (docs/bench.md: MiniLM-L6, every linear layer, r = 8): a step costs 1.32× the frozen model's forward +
backward, against 2.88× for PEFT's HRA in the same process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lorafactory.errors import check
from lorafactory.variants.base import VARIANTS, Variant, VariantConfig, adapter_layers, kaiming_, peft_layer_state
from lorafactory.variants.oft import RotatedLayer


class HRALinear(RotatedLayer):
    """`base(x Hᵀ)` with H the product of the reflections along the columns of `hra_u` (d_in × r)."""

    def __init__(self, base: nn.Module, r: int):
        super().__init__(base)
        self.r = r
        factory = {"dtype": base.weight.dtype, "device": base.weight.device}
        half = kaiming_(torch.empty(self.in_features, r // 2, **factory))
        self.hra_u = nn.Parameter(half.repeat_interleave(2, dim=1))

    def wy(self) -> tuple[Tensor, Tensor]:
        """(U, V = U T) with H = I − V Uᵀ, in float32 at least."""
        U = self.hra_u.to(torch.promote_types(self.hra_u.dtype, torch.float32))
        with torch.autocast(U.device.type, enabled=False):  # bf16-mixed too: the triangular solve wants float32
            gram = U.t() @ U
            T_inv = gram.triu(1) + torch.diag_embed(gram.diagonal() / 2)
            eye = torch.eye(self.r, dtype=U.dtype, device=U.device)
            return U, U @ torch.linalg.solve_triangular(T_inv, eye, upper=True)

    def rotation_cost(self) -> int:
        return 2 * self.in_features * self.r

    def rotated_forward(self, x: Tensor) -> Tensor:
        U, V = (t.to(x.dtype) for t in self.wy())
        x2 = x.reshape(-1, self.in_features)
        rotated = torch.addmm(x2, x2 @ U, V.t(), alpha=-1)  # x Hᵀ = x − (x U) Vᵀ
        return self.base_forward(rotated.view(x.shape))

    def rotate(self, weight: Tensor, inverse: bool = False) -> Tensor:
        U, V = (t.to(weight.dtype) for t in self.wy())
        if inverse:  # W Hᵀ
            return weight - (weight @ U) @ V.t()
        return weight - (weight @ V) @ U.t()  # W H

    def householder(self) -> Tensor:
        """H as a dense d_in × d_in matrix (for tests and inspection; training never forms it)."""
        U, V = self.wy()
        return torch.eye(self.in_features, dtype=U.dtype, device=U.device) - V @ U.t()

    def orthogonality_penalty(self) -> Tensor:
        """‖I − ÛᵀÛ‖_F with Û the column-normalised U (the paper's regulariser)."""
        U = self.hra_u / self.hra_u.norm(dim=0)
        return (torch.eye(self.r, dtype=U.dtype, device=U.device) - U.t() @ U).norm()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}"


@dataclass
class HRAConfig(VariantConfig):
    # The official GLUE scripts (DeBERTaV3-base, r = 8) train HRA at 8e-4–3e-3, 1e-3 on most tasks: about twice the
    # 4e-4–5e-4 the LoRA paper uses on GLUE (RoBERTa-base).
    lr_mult: float = 2.0
    orth_reg: float = 0.0
    """λ of the regulariser λ·Σ_layers ‖I − ÛᵀÛ‖_F (0: off, the paper's GLUE runs; 1e-4 in its LLaMA runs)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(
            self.r % 2 == 0,
            f"variant.r must be even for HRA (its init pairs equal reflections), got {self.r}",
        )
        check(self.orth_reg >= 0, f"variant.orth_reg must be >= 0, got {self.orth_reg}")
        check(self.dropout == 0, f"variant.dropout must be 0 (HRA has no dropout), got {self.dropout}")


@VARIANTS.register("hra", config=HRAConfig)
class HRA(Variant):
    name = "hra"
    paper = (
        "Bridging The Gap between Low-rank and Orthogonal Adaptation via Householder Reflection Adaptation "
        "(Yuan et al., NeurIPS 2024, arXiv 2405.17484)"
    )
    taxonomy = "rank"
    tags = ("multiplicative", "orthogonal")
    params_formula = "r·d_in"
    peft = "HRAConfig(r=r)"

    def make_layer(self, base: nn.Module) -> HRALinear:
        return HRALinear(base, self.cfg.r)

    def layer_params(self, d_in: int, d_out: int) -> int:
        return self.cfg.r * d_in

    def aux_loss(self, model: nn.Module) -> Tensor | None:
        if self.cfg.orth_reg == 0:
            return None
        return (
            self.cfg.orth_reg * torch.stack([layer.orthogonality_penalty() for layer in adapter_layers(model)]).sum()
        )

    def peft_config(self, targets: list[str], head: list[str]) -> Any:
        from peft import HRAConfig as PeftHRAConfig

        return PeftHRAConfig(r=self.cfg.r, target_modules=targets, modules_to_save=head)

    def peft_export(
        self, model: nn.Module, base: nn.Module, targets: list[str], head: list[str]
    ) -> tuple[Any, dict[str, Tensor]] | None:
        return self.peft_config(targets, head), peft_layer_state(model, lambda layer: {"hra_u": layer.hra_u})
