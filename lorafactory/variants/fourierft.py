"""FourierFT — "Parameter-Efficient Fine-Tuning with Discrete Fourier Transform" (Gao et al., ICML 2024,
arXiv 2405.03003).

Update rule: the update is the real part of the 2-D inverse DFT of a sparse spectrum,

    ΔW = c · Re(IFFT2(S)),   y = (W0 + ΔW) x + b,
    ΔW_jk = c/(d_out·d_in) · Σ_l a_l cos(2π (j u_l / d_out + k v_l / d_in))

where S ∈ R^{d_out × d_in} is zero except at n entries (u_l, v_l) that hold the trainable coefficients a_l, and
IFFT2 carries torch's (and numpy's) 1/(d_out·d_in) normalisation. c is `scaling`.
Locations: n distinct entries of the d_out × d_in grid, the first n of a permutation seeded with `seed` (the paper's
"shared entry" setting and PEFT's `random_loc_seed`): every layer of the same shape uses the same frequencies. They are
regenerated from the config, not saved, and computed once per shape.
Trainable parameters per layer: n (min(n, d_out·d_in) on a layer with fewer entries, see below).

Choices where the paper and PEFT differ or leave room:
- Init: the official code and PEFT (`init_weights=False`) draw a ~ N(0, 1), so ΔW ≠ 0 at step 0, by an amount that
  depends on the layer's shape (entries of size c·√(n/2)/(d_out·d_in): 0.006 on a 768² RoBERTa layer at c = 150,
  3.3 on a 32² one). Default here: a = 0 (PEFT's `init_weights=True`), so every run starts at the pretrained model;
  `init: gaussian` gives the paper's init (the variant then reports `zero_init = False`).
- A layer with fewer than n entries (tiny-cnn's stem, 8 × 27 = 216) trains every frequency: n = d_out·d_in. (Real
  coefficients under Re(IFFT2) only reach matrices with ΔW_jk = ΔW_{−j,−k} (indices mod the sizes), so even then
  ΔW is not arbitrary.) PEFT refuses such layers.
- Learning rates: the official GLUE scripts train the spectrum at 0.05–0.12 (RoBERTa-base, c = 29–151) and the head
  at 0.001–0.011, LoRA's range. The spectrum's rate is the run's (`lr_mult` × the task's LoRA rate); the head keeps
  the task's LoRA rate (`param_groups`), as in the official two-rate setup.
- `variant.r` is not used (the budget is n); FourierFT has no dropout, so `variant.dropout` must stay 0.

Computation: the method defines ΔW densely, so each step forms it (a d_out × d_in scatter and inverse FFT, in
float32: torch's FFT has no half-precision CPU kernel) and the layer runs one GEMM with W0 + ΔW. Its backward is
the input gradient and the dense ∂L/∂ΔW = gᵀx that the spectrum's gradient (a forward FFT of it, read at the n
locations) needs: three GEMMs per step against PEFT's five (PEFT runs the base layer and x ΔWᵀ as two GEMMs forward,
two input gradients and the same gᵀx backward).

Measured (docs/bench.md: MiniLM-L6, every linear layer, n = 1,000): a step costs 1.47× the frozen model's
forward + backward, against 2.22× for PEFT's FourierFT in the same process.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorafactory.errors import check
from lorafactory.variants.base import VARIANTS, AdapterLayer, Variant, VariantConfig, adapter_layers, peft_layer_state


@cache
def spectral_locations(d_out: int, d_in: int, n: int, seed: int) -> Tensor:
    """(2, n) row and column indices of the trainable frequencies: the first n entries of a seeded permutation of the
    d_out·d_in grid (row-major), as PEFT draws them. Cached: every layer of a shape shares one tensor."""
    flat = torch.randperm(d_out * d_in, generator=torch.Generator().manual_seed(seed))[:n]
    return torch.stack([flat // d_in, flat % d_in])


class FourierFTLinear(AdapterLayer):
    """`(W0 + c·Re(IFFT2(S))) x + b`; the parameter `spectrum` (n) holds S's entries at the buffer `indices`."""

    def __init__(self, base: nn.Module, n_frequency: int, scaling: float, seed: int, gaussian: bool = False):
        super().__init__(base)
        self.scaling = scaling
        n = min(n_frequency, self.out_features * self.in_features)
        indices = spectral_locations(self.out_features, self.in_features, n, seed)
        self.register_buffer("indices", indices.to(base.weight.device), persistent=False)
        spectrum = torch.randn(n) if gaussian else torch.zeros(n)
        self.spectrum = nn.Parameter(spectrum.to(dtype=base.weight.dtype, device=base.weight.device))

    def delta_weight(self) -> Tensor:
        dtype = torch.promote_types(self.spectrum.dtype, torch.float32)
        dense = self.spectrum.new_zeros(self.out_features, self.in_features, dtype=dtype)
        dense = dense.index_put((self.indices[0], self.indices[1]), self.spectrum.to(dtype))
        return torch.fft.ifft2(dense).real * self.scaling

    def adapter_forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight + self.delta_weight().to(self.weight.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, n_frequency={self.spectrum.numel()}, scaling={self.scaling:g}"


@dataclass
class FourierFTConfig(VariantConfig):
    # The official GLUE runs train the spectrum at 0.05–0.12 (RoBERTa-base, c ≈ 100–150) where LoRA trains at ~5e-4,
    # two orders of magnitude above, on 768-wide layers. That ratio does not carry across widths: an Adam step moves
    # each weight entry by about lr·c·√n/(d_out·d_in). At MiniLM's 384 width the official step per entry is reached
    # at ~10× the task's LoRA rate; 3× is half that step and is what the tiny test models (32 wide) still tolerate.
    lr_mult: float = 3.0
    n_frequency: int = 1000
    """n, the trainable frequencies per layer (the paper's and PEFT's default)."""
    scaling: float = 150.0
    """c, the scale of ΔW (PEFT's default; the paper uses 100–150 for RoBERTa, 300 for LLaMA and ViT)."""
    seed: int = 777
    """Seed of the frequency locations, shared by every layer (PEFT's `random_loc_seed`)."""
    init: str = "zeros"
    """`zeros` (ΔW = 0 at step 0, the default) or `gaussian` (a ~ N(0, 1): the official code and PEFT's default)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.n_frequency >= 1, f"variant.n_frequency must be >= 1, got {self.n_frequency}")
        check(self.scaling > 0, f"variant.scaling must be > 0, got {self.scaling}")
        check(self.init in ("zeros", "gaussian"), f"variant.init must be zeros or gaussian, got '{self.init}'")
        check(self.dropout == 0, f"variant.dropout must be 0 (FourierFT has no dropout), got {self.dropout}")


@VARIANTS.register("fourierft", config=FourierFTConfig)
class FourierFT(Variant):
    name = "fourierft"
    paper = "Parameter-Efficient Fine-Tuning with Discrete Fourier Transform (Gao et al., ICML 2024, arXiv 2405.03003)"
    taxonomy = "rank"
    tags = ("frequency",)
    params_formula = "n  (n_frequency; min(n, d_in·d_out))"
    peft = "FourierFTConfig(n_frequency=n, scaling=c, init_weights=True)"
    memory_note = "forms the dense ΔW (d_out × d_in, fp32) of each adapted layer every step"

    def __init__(self, cfg: FourierFTConfig):
        super().__init__(cfg)
        self.zero_init = cfg.init == "zeros"

    def make_layer(self, base: nn.Module) -> FourierFTLinear:
        cfg = self.cfg
        return FourierFTLinear(base, cfg.n_frequency, cfg.scaling, cfg.seed, gaussian=cfg.init == "gaussian")

    def layer_params(self, d_in: int, d_out: int) -> int:
        return min(self.cfg.n_frequency, d_in * d_out)

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        spectra = [layer.spectrum for layer in adapter_layers(model)]
        ids = {id(p) for p in spectra}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        groups = [{"params": spectra, "lr": lr, "name": "spectrum"}]
        if rest:  # the task head, at the task's LoRA rate
            groups.append({"params": rest, "lr": lr / self.cfg.lr_mult, "name": "head"})
        return groups

    def peft_config(self, targets: list[str], head: list[str]) -> Any:
        from peft import FourierFTConfig as PeftFourierFTConfig

        return PeftFourierFTConfig(
            n_frequency=self.cfg.n_frequency,
            scaling=self.cfg.scaling,
            random_loc_seed=self.cfg.seed,
            init_weights=self.cfg.init == "zeros",
            target_modules=targets,
            modules_to_save=head,
        )

    def peft_export(
        self, model: nn.Module, base: nn.Module, targets: list[str], head: list[str]
    ) -> tuple[Any, dict[str, Tensor]] | None:
        # PEFT draws the frequency locations from `random_loc_seed` as we do: only the spectra are saved.
        state = peft_layer_state(model, lambda layer: {"fourierft_spectrum": layer.spectrum})
        return self.peft_config(targets, head), state
