"""QWHA — "QWHA: Quantization-Aware Walsh-Hadamard Adaptation for Parameter-Efficient Fine-Tuning on Large Language
Models" (Jeon et al., arXiv 2509.17428; official code vantaa89/qwha, where it is called QHFT).

Update rule: a sparse spectrum S ∈ R^{d_out×N} with n trainable entries at fixed positions, mapped to a weight update
by the inverse Walsh–Hadamard transform along the input dimension, on a quantized base:

    y = (Q + ΔW) x + b,    ΔW = c / (√d_out · N) · (S H)[:, :d_in]

H is an N × N Hadamard matrix (H Hᵀ = N I), N ≥ d_in, c the scale (`scale`, not trainable). With H symmetric this is
the official `iwht(S) · c / √d_out`.

Init (`init_from_data`, official `src/init/initialize.py`): E = W0 − Q is the quantization error; `calib_batches`
batches give each layer's input statistics G = XᵀX (+ 1e-4 · mean diag, as the official code). With Φ = H/√N and
Φ_d = Φ[:, :d_in], the full spectrum of row i of E is Φ ê_i (ê zero-padded); each output channel gets a share of the
budget n ∝ ‖row i of E‖ (α = 1; `allocate`), keeps the positions j with the largest
diag(Φ_d G Φ_dᵀ)_j · (Φ ê_i)_j², and fits their values by least squares on the calibration outputs:
min ‖X (e_i − Φ_dᵀ v)‖. The official code quantizes with GPTQ/MagR to 2–4 bits in groups of 64; here Q is the
project's quantized base (NF4, blocks of 64, double quantization), the init being the same for any quantizer. Its
calibration inputs come from the full-precision model; ours from the quantized model at step 0 (ΔW = 0), the model
being quantized at adapt time. Before `init_from_data` the positions are random (seeded by `seed`) and S = 0, so the
model is the quantized base; a run resumed from a checkpoint loads the fitted positions.

Sizes: the official code supports N = 2^k · K for QuaRot's tabulated Hadamard matrices (K ∈ {1, 12, 20, 28, 36, 40,
52, 60, 108, 140, 156, 172}) and fails otherwise. We build H = H_{2^k} (Sylvester) ⊗ H_K with H_K from Paley's
constructions over prime fields (K = q + 1, q ≡ 3 mod 4, or K = 2(q + 1), q ≡ 1 mod 4, q prime, K ≤ 200: 12, 20, 28,
36, 44, 60, 68, 76, 84, 108, 124, 140, ...; 52, 156 and 172 need other constructions), and pad d_in to the smallest
such N (tiny-cnn's 27 → 28, 11008 → 11264), the update using the first d_in columns.

Parameters per layer: n = r · (d_in + d_out) (LoRA parity, the official setting), at most d_out · d_in. k×k convolution
targets keep Q in full precision and are fitted without calibration statistics (G = I): the patches their forward
convolves are not visible to a hook.

Computation: ΔW is formed densely in each forward, as the official code does, and multiplied with the dequantized base
in one GEMM (W + ΔW): with n = r · (d_in + d_out) entries, a sparse product would touch tokens × n values, more than
the one d_out × d_in matrix for every batch of practical size. Merging folds ΔW into the dequantized base.

Learning rate: `lr_mult` = 4, measured on SST-2 (MiniLM-L6, reports/zoo_init, 1 seed): 0.727 at LoRA's rate, 0.798 at
4×, and the selection split still rising at 8× (where the contract tests' toy problem no longer learns), so the
optimum is at or above 4× LoRA's rate.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorafactory import quantize
from lorafactory.errors import ConfigError, check
from lorafactory.variants.base import VARIANTS, AdapterLayer, Variant, VariantConfig, adapter_layers

MAX_FACTOR = 200
DAMPING = 1e-4  # of the mean diagonal of XᵀX (official value for Llama; 1e-2 for Mistral)


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % p for p in range(2, math.isqrt(q) + 1))


def _legendre(q: int) -> Tensor:
    """χ(a) for a = 0..q−1 over the prime field F_q: 0, +1 for squares, −1 otherwise."""
    chi = -torch.ones(q)
    chi[0] = 0
    chi[sorted({a * a % q for a in range(1, q)})] = 1
    return chi


@functools.cache
def paley(K: int) -> Tensor:
    """A K × K Hadamard matrix from Paley's constructions (K = 1 is [1]); KeyError if K is not in `FACTORS`."""
    if K == 1:
        return torch.ones(1, 1)
    construction, q = FACTORS[K]
    idx = torch.arange(q)
    jacobsthal = _legendre(q)[(idx.unsqueeze(1) - idx.unsqueeze(0)) % q]  # Q_ij = χ(i − j)
    ones = torch.ones(q, 1)
    if construction == 1:  # q ≡ 3 mod 4: H = I + [[0, 1ᵀ], [−1, Q]]
        core = torch.cat([torch.cat([torch.zeros(1, 1), ones.t()], 1), torch.cat([-ones, jacobsthal], 1)], 0)
        return torch.eye(q + 1) + core
    # q ≡ 1 mod 4: S = [[0, 1ᵀ], [1, Q]] with 0 → [[1, −1], [−1, −1]] and ±1 → ±[[1, 1], [1, −1]]
    S = torch.cat([torch.cat([torch.zeros(1, 1), ones.t()], 1), torch.cat([ones, jacobsthal], 1)], 0)
    zero_block = torch.tensor([[1.0, -1.0], [-1.0, -1.0]])
    sign_block = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    return torch.kron(S, sign_block) + torch.kron((S == 0).float(), zero_block)


FACTORS: dict[int, tuple[int, int]] = {}
"""K → (Paley construction, q) for every factor we can build, K ≤ MAX_FACTOR."""
for _q in range(3, MAX_FACTOR):
    if _is_prime(_q) and _q % 4 == 3 and _q + 1 <= MAX_FACTOR:
        FACTORS.setdefault(_q + 1, (1, _q))
    if _is_prime(_q) and _q % 4 == 1 and 2 * (_q + 1) <= MAX_FACTOR:
        FACTORS.setdefault(2 * (_q + 1), (2, _q))


def split_size(n: int) -> tuple[int, int] | None:
    """(2^k, K) with n = 2^k · K and K = 1 or a buildable factor, preferring the smallest K; None if there is none."""
    for K in (1, *sorted(FACTORS)):
        m = n // K
        if n % K == 0 and m & (m - 1) == 0:
            return m, K
    return None


def transform_size(d: int) -> int:
    """The smallest N ≥ d with a Hadamard matrix we can build."""
    n = d
    while split_size(n) is None:
        n += 1
    return n


def hadamard_matrix(n: int) -> Tensor:
    """The N × N matrix `hadamard_transform` applies (for tests and small sizes): H_{2^k} ⊗ H_K."""
    return hadamard_transform(torch.eye(n), n).t()


def hadamard_transform(x: Tensor, n: int, transpose: bool = False) -> Tensor:
    """`x Hᵀ` along the last dimension (of size n), or `x H` with `transpose`, for H = H_{2^k} ⊗ H_K: a fast
    Walsh–Hadamard butterfly over the 2^k part (Sylvester order) and a K × K product, never the N × N matrix."""
    m, K = split_size(n)
    lead = x.shape[:-1]
    y = x.reshape(-1, m, K)
    if K > 1:
        H_K = paley(K).to(x)
        y = y @ (H_K if transpose else H_K.t())
    h = 1
    while h < m:  # H_{2h} = [[H_h, H_h], [H_h, −H_h]], applied to pairs h apart
        y = y.reshape(-1, m // (2 * h), 2, h, K)
        y = torch.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), dim=2)
        h *= 2
    return y.reshape(*lead, n)


class QWHALinear(AdapterLayer):
    """A quantized base plus `spectrum` (n values) at positions (`rows`, `cols`) of a d_out × N spectrum."""

    def __init__(self, base: nn.Module, r: int, scale: float, seed: int):
        if isinstance(base, nn.Conv2d) and base.groups > 1:
            raise ConfigError(
                "variant=qwha cannot adapt grouped or depthwise convolutions (its weight view mixes groups)"
            )
        super().__init__(base)
        d_in, d_out = self.in_features, self.out_features
        self.n_transform = transform_size(d_in)
        self.n = min(r * (d_in + d_out), d_in * d_out)
        self.scaling = scale / (math.sqrt(d_out) * self.n_transform)
        weight = self.weight
        W = weight.to(torch.promote_types(weight.dtype, torch.float32))
        q = quantize.quantize_matrix(self.base.weight)
        if quantize.quantizable(base):
            quantize.install_(base, q)
        else:
            self.write_weight(q.dequantize())
        # Kept until init_from_data fits the spectrum to it (a plain attribute: never saved or counted).
        self.quant_error = W - self.weight.to(W.dtype)
        g = torch.Generator().manual_seed(seed)
        flat = torch.randperm(d_out * d_in, generator=g)[: self.n]  # official start: random positions, S = 0
        self.register_buffer("rows", flat // d_in)
        self.register_buffer("cols", flat % d_in)
        self.spectrum = nn.Parameter(torch.zeros(self.n, dtype=weight.dtype, device=weight.device))

    def delta_weight(self) -> Tensor:
        dense = torch.zeros(
            self.out_features, self.n_transform, dtype=self.spectrum.dtype, device=self.spectrum.device
        )
        dense = dense.index_put((self.rows, self.cols), self.spectrum)
        return self.scaling * hadamard_transform(dense, self.n_transform, transpose=True)[:, : self.in_features]

    def adapter_forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight + self.delta_weight().to(x.dtype), self.bias)

    @torch.no_grad()
    def fit(self, gram: Tensor | None) -> None:
        """The data-aware init (see the module docstring); `gram` = XᵀX of the calibration inputs, or None (G = I)."""
        E = self.quant_error.double()
        d_in, N = self.in_features, self.n_transform
        G = torch.eye(d_in, dtype=E.dtype) if gram is None else gram.double()
        G = G + DAMPING * G.diagonal().mean().clamp_min(1e-12) * torch.eye(d_in, dtype=E.dtype)
        phi_d = hadamard_transform(torch.eye(d_in, N, dtype=E.dtype), N).t() / math.sqrt(N)  # Φ[:, :d_in], N × d_in
        full = hadamard_transform(F.pad(E, (0, N - d_in)), N) / math.sqrt(N)  # row i: Φ ê_i
        phi_g = phi_d @ G  # N × d_in
        basis_norm = (phi_g * phi_d).sum(dim=1)  # ‖X φ_j‖² for every position j
        counts = allocate(full.norm(dim=1), self.n, d_in)
        rows, cols, values = [], [], []
        for k in counts.unique().tolist():
            if k == 0:
                continue
            channels = (counts == k).nonzero().squeeze(1)
            picked = (basis_norm * full[channels].square()).topk(k, dim=1).indices  # (c, k)
            M = phi_g[picked] @ phi_d[picked].transpose(1, 2)  # Φ_J G Φ_Jᵀ, (c, k, k)
            rhs = (phi_g[picked] @ E[channels].unsqueeze(2)).squeeze(2)  # Φ_J G e_i
            v = torch.linalg.lstsq(M, rhs.unsqueeze(2)).solution.squeeze(2)
            rows.append(channels.unsqueeze(1).expand(-1, k).reshape(-1))
            cols.append(picked.reshape(-1))
            values.append(v.reshape(-1))
        # Row i of ΔW is vᵀ Φ_d = vᵀ H[:, :d_in] / √N and also scaling · S_i H[:, :d_in]: S_i = v / (scaling · √N).
        self.rows = torch.cat(rows).to(self.rows)
        self.cols = torch.cat(cols).to(self.cols)
        self.spectrum.copy_((torch.cat(values) / (self.scaling * math.sqrt(N))).to(self.spectrum.dtype))
        self.quant_error = None


def allocate(weights: Tensor, n: int, cap: int) -> Tensor:
    """Entries per output channel: ∝ `weights`, at most `cap` each, summing to n. As the official allocation: floor
    of the proportional share, capped; the remainder then goes one at a time to the smallest shares (the official
    code first spreads it evenly, which can exceed the cap)."""
    counts = (weights / weights.sum().clamp_min(1e-30) * n).floor().long().clamp_max(cap)
    while int(counts.sum()) < n:
        room = (counts < cap).nonzero().squeeze(1)
        smallest = room[counts[room].argsort(stable=True)][: n - int(counts.sum())]
        counts[smallest] += 1
    return counts


@dataclass
class QWHAConfig(VariantConfig):
    targets: Any = "all-linear"
    scale: float = 150.0
    """c: the update's scale (official QHFTConfig default 150; its training scripts sweep it)."""
    calib_batches: int = 8
    """Batches whose inputs give each layer's XᵀX for the init."""
    seed: int = 777
    """Seed of the positions before the init (official `random_loc_seed`)."""
    lr_mult: float = 4.0  # measured (reports/zoo_init): ×4 LoRA's rate; see the module docstring

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.scale > 0, f"variant.scale must be > 0, got {self.scale}")
        check(self.calib_batches >= 1, f"variant.calib_batches must be >= 1, got {self.calib_batches}")


@VARIANTS.register("qwha", config=QWHAConfig)
class QWHA(Variant):
    name = "qwha"
    paper = (
        "QWHA: Quantization-Aware Walsh-Hadamard Adaptation for Parameter-Efficient Fine-Tuning on Large Language "
        "Models (Jeon et al., arXiv 2509.17428)"
    )
    taxonomy = "initialization"
    tags = ("quantization", "frequency", "sparsity")
    zero_init = False
    params_formula = "min(r·(d_in + d_out), d_in·d_out)"
    memory_note = "until init_from_data, each target keeps its quantization error (d_out × d_in, fp32)"
    quantized_base = "its init fits the quantization error W0 − Q, so it quantizes the targets itself from W0"

    def make_layer(self, base: nn.Module) -> QWHALinear:
        return QWHALinear(base, self.cfg.r, self.cfg.scale, self.cfg.seed)

    def layer_params(self, d_in: int, d_out: int) -> int:
        return min(self.cfg.r * (d_in + d_out), d_in * d_out)

    def init_from_data(self, model: nn.Module, batches: Iterable[dict[str, Tensor]], loss_fn: Any) -> None:
        layers = [m for m in adapter_layers(model) if isinstance(m, QWHALinear) and m.quant_error is not None]
        if not layers:
            return
        grams = {id(m): torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for m in layers}

        def accumulate(layer: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            if layer.kind == "pointwise":
                x = x.movedim(1, -1)
            x = x.reshape(-1, layer.in_features).double()
            grams[id(layer)] += x.t() @ x

        hooks = [m.register_forward_pre_hook(accumulate) for m in layers if m.kind != "conv"]
        was_training = model.training
        model.eval()  # as the official calibration: no dropout, and no trace left (BatchNorm statistics)
        try:
            with torch.no_grad():
                for _, batch in zip(range(self.cfg.calib_batches), batches, strict=False):
                    loss_fn(model, batch)
        finally:
            for hook in hooks:
                hook.remove()
            model.train(was_training)
        for layer in layers:
            layer.fit(None if layer.kind == "conv" else grams[id(layer)])
