"""IncreLoRA — "IncreLoRA: Incremental Parameter Allocation Method for Parameter-Efficient Fine-tuning" (Zhang, Li,
Qiu, Gu; arXiv 2308.12043).

Update rule: AdaLoRA's SVD-shaped update, whose rank grows during training instead of being pruned:

    y = W0 x + b + (alpha / r_l) · P diag(Λ) Q x,    P = [P_act | P_res], Λ = [Λ_act | ε·1], Q = [Q_act ; Q_res]

Each layer starts at rank `init_r` with `incre_rank_num` reserve components (ε = 1e-5: "advance learning", their P
and Q train before they count). After every step a module's importance is Σ|ΔW ⊙ ∂L/∂ΔW| / √(d_out·d_in), smoothed
into sensitivity × uncertainty EMAs as in AdaLoRA (β1 = β2 = 0.85). After `init_warmup` steps, every `incre_interval`
steps the `top_h` highest-scoring layers turn their reserve components into active ones (their Λ starts at ε and
trains; r_l grows, so the scale alpha / r_l of the layer's whole update shrinks, as in the official code) and get a
fresh reserve. When the total rank reaches the budget r·n (n adapted layers), the reserves are zeroed and deleted and
scoring stops. An orthogonality penalty on P and Q is added to the loss (weight 0.1).

Init: Λ_act = 0, P and Q ~ N(0, 0.02), reserve Λ = ε: the model starts O(ε·alpha) away from the base (not exactly it).
Trainable parameters per layer: (init_r + incre_rank_num)·(d_in + d_out) + init_r at the start; the total active rank
never exceeds r·n and ends at r_l·(d_in + d_out + 1) per layer once the budget is spent.

Choices, checked against the official code (FeiyuZhang98/IncreLoRA: loralib/loralib/increlora.py, the NLU trainer
and scripts):
- Growth adds parameters mid-run: `on_train_batch_end` returns True and the loop rebuilds the optimizer. The grown
  P, Q, Λ are new tensors; they inherit the Adam moments of the entries they were made of (the optimizer seen in
  `on_before_optimizer_step` hands them over), new entries start at zero moments with the tensor's step count (the
  official code adds new parameter groups with fresh state).
- The official allocator picks k = min(top_h, budget left) layers and adds incre_rank_num to each, which can overshoot
  the budget; here the best layers take components until the budget is spent, so it never exceeds r·n. Ties are
  broken by layer order (the official `>=` threshold grows every tied layer).
- Schedule points are fractions of the run (`total_steps`, see adalora.py `RunLength`): the scripts grow every 1000
  steps after 1000 of ~50k (2%). Steps count from 1 here (the official loop counts from 0).
- The penalty covers each layer's whole P and Q, reserves included (the official trainer's `compute_svd_orth_regu`),
  averaged over matrices.
- Defaults from the rank-8 GLUE scripts: init_r = 1, top_h = 6, incre_rank_num = r/2 (their table {2:1, 4:2, 6:3,
  8:4}), alpha = 16, orth_reg_weight = 0.1.

Computation: while scoring, the layer needs the dense ∂L/∂ΔW (d_out × d_in), as the official code does: it runs the
merged weight W0 + ΔW in one GEMM and a hook on ΔW reads the gradient, which costs what full fine-tuning of the layer
costs. Once the budget is spent it runs LoRA's rank-r paths (see sora.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorafactory.errors import check
from lorafactory.variants.adalora import RunLength, orthogonality_penalty
from lorafactory.variants.base import VARIANTS, Variant, VariantConfig, named_adapter_layers
from lorafactory.variants.sora import GatedLoRALinear

RESERVE_GATE = 1e-5
"""Λ of a reserve component (the official advance-learning value)."""


class IncreLoRALinear(GatedLoRALinear):
    """Active components (`gate` = Λ_act, the first r rows of `lora_A` / columns of `lora_B`) followed by reserve ones
    (the buffer `reserve_gate`); `score` is the importance of the last backward pass."""

    resizable = ("lora_A", "lora_B", "gate", "reserve_gate")

    def __init__(self, base: nn.Module, r: int, reserve: int, alpha: float, dropout: float = 0.0):
        super().__init__(base, r + reserve, alpha / r, dropout)
        self.alpha = alpha
        with torch.no_grad():
            self.lora_A.normal_(0.0, 0.02)
            self.lora_B.normal_(0.0, 0.02)
        self.gate = nn.Parameter(self.gate.new_zeros(r))
        self.register_buffer("reserve_gate", self.gate.new_full((reserve,), RESERVE_GATE))
        self.score = 0.0

    @property
    def scoring(self) -> bool:
        """Still growing: reserves exist and the importance is measured."""
        return self.reserve_gate.numel() > 0

    def gate_vector(self) -> Tensor:
        return torch.cat([self.gate, self.reserve_gate])

    def forward(self, x: Tensor) -> Tensor:
        if self.merged or not self.scoring or not torch.is_grad_enabled():
            return super().forward(x)
        delta = self.delta_weight()
        if delta.requires_grad:
            delta.register_hook(self._scorer(delta.detach()))
        if self.kind == "conv":
            weight = (self.weight + delta.to(self.weight.dtype)).view(self.base.weight.shape)
            return torch.func.functional_call(self.base, {"weight": weight}, (x,))
        inputs = x.movedim(1, -1) if self.kind == "pointwise" else x
        if self.dropout is None:
            out = F.linear(inputs, self.weight + delta.to(self.weight.dtype), self.bias)
        else:  # ΔW sees the dropped input, W0 the clean one
            out = self.base_forward(inputs) + F.linear(self.dropout(inputs), delta.to(inputs.dtype))
        return out.movedim(-1, 1) if self.kind == "pointwise" else out

    def _scorer(self, delta: Tensor) -> Any:
        def hook(grad: Tensor) -> None:
            with torch.no_grad():
                self.score = float((delta * grad).abs().sum() / delta.numel() ** 0.5)

        return hook

    @torch.no_grad()
    def grow(self, n: int, generator: torch.Generator) -> None:
        """Turn the first n reserve components into active ones and append n fresh reserve components, drawn from
        `generator` (CPU)."""
        factory = {"dtype": self.lora_A.dtype, "device": self.lora_A.device}
        rows = torch.empty(n, self.in_features).normal_(0.0, 0.02, generator=generator).to(**factory)
        cols = torch.empty(self.out_features, n).normal_(0.0, 0.02, generator=generator).to(**factory)
        self.lora_A = nn.Parameter(torch.cat([self.lora_A, rows]))
        self.lora_B = nn.Parameter(torch.cat([self.lora_B, cols], dim=1))
        self.gate = nn.Parameter(torch.cat([self.gate, self.reserve_gate[:n]]))
        self.reserve_gate = torch.cat([self.reserve_gate[n:], self.reserve_gate.new_full((n,), RESERVE_GATE)])
        self.scaling = self.alpha / self.r

    @torch.no_grad()
    def drop_reserve(self) -> None:
        """The budget is spent: delete the reserve components (the official code zeroes their Λ)."""
        r = self.r
        self.lora_A = nn.Parameter(self.lora_A[:r].clone())
        self.lora_B = nn.Parameter(self.lora_B[:, :r].clone())
        self.reserve_gate = self.reserve_gate[:0].clone()

    def _load_from_state_dict(self, state_dict: dict[str, Tensor], prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.scaling = self.alpha / self.r


def incre_layers(model: nn.Module) -> list[tuple[str, IncreLoRALinear]]:
    return [(n, m) for n, m in named_adapter_layers(model) if isinstance(m, IncreLoRALinear)]


def carry_moments(optimizer: torch.optim.Optimizer, old: Tensor, new: Tensor, dim: int, keep: int) -> None:
    """Give `new` the optimizer state of `old`'s first `keep` entries along `dim`, zeros for the rest (moments of
    a tensor that grew or shrank); state that is not shaped like the parameter (Adam's step count) is kept."""
    state = optimizer.state.get(old)
    if not state:
        return
    carried = {}
    for key, value in state.items():
        if isinstance(value, Tensor) and value.shape == old.shape:
            value = value.narrow(dim, 0, keep)
            pad = list(new.shape)
            pad[dim] -= keep
            value = torch.cat([value, value.new_zeros(pad)], dim=dim)
        carried[key] = value
    optimizer.state[new] = carried


@dataclass
class IncreLoRAConfig(VariantConfig):
    # Official GLUE scripts (DeBERTaV3) train at 5e-4–2.2e-3, median 9e-4, where LoRA's GLUE rates are 4e-4–5e-4.
    lr_mult: float = 2.0
    init_r: int = 1
    """Rank every layer starts with; `r` is the average rank the budget allows (total r·n)."""
    incre_rank_num: int = 0
    """Components a selected layer gains per growth step (and the size of its reserve); 0: r // 2 (at least 1)."""
    top_h: int = 6
    """Layers selected per growth step."""
    init_warmup: float = 0.02
    """Share of the run before the first growth step."""
    incre_interval: float = 0.02
    """Share of the run between two growth steps."""
    beta1: float = 0.85
    """EMA coefficient of the sensitivity."""
    beta2: float = 0.85
    """EMA coefficient of the uncertainty."""
    orth_reg_weight: float = 0.1
    """Weight of the orthogonality penalty on P and Q."""
    total_steps: int = 0
    """The run's length in optimizer steps, over which the schedule is laid out; 0: the training loop's
    (`on_train_start`)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.incre_rank_num == 0:
            self.incre_rank_num = max(1, self.r // 2)
        check(1 <= self.init_r < self.r, f"variant.init_r must be in [1, variant.r), got {self.init_r}")
        check(self.incre_rank_num >= 1, f"variant.incre_rank_num must be >= 1, got {self.incre_rank_num}")
        check(self.top_h >= 1, f"variant.top_h must be >= 1, got {self.top_h}")
        for name in ("init_warmup", "incre_interval"):
            value = getattr(self, name)
            check(0 <= value < 1, f"variant.{name} must be in [0, 1), got {value}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            check(0 < value < 1, f"variant.{name} must be in (0, 1), got {value}")
        check(self.orth_reg_weight >= 0, f"variant.orth_reg_weight must be >= 0, got {self.orth_reg_weight}")
        check(self.total_steps >= 0, f"variant.total_steps must be >= 0, got {self.total_steps}")


@VARIANTS.register("increlora", config=IncreLoRAConfig)
class IncreLoRA(Variant):
    name = "increlora"
    paper = (
        "IncreLoRA: Incremental Parameter Allocation Method for Parameter-Efficient Fine-tuning "
        "(Zhang et al., arXiv 2308.12043)"
    )
    taxonomy = "rank"
    tags = ("budgeting", "svd")
    zero_init = False
    params_formula = "(init_r + incre_rank_num)·(d_in + d_out) + init_r; grows to Σ r_l·(d_in + d_out + 1) = budget"
    memory_note = "while growing, the dense ∂L/∂ΔW of every adapted layer (as full fine-tuning)"

    def __init__(self, cfg: IncreLoRAConfig):
        super().__init__(cfg)
        self.run = RunLength(cfg.total_steps, self.name)
        self.ema_ipt: dict[str, float] = {}
        self.ema_unc: dict[str, float] = {}
        self.growth: list[dict[str, Any]] = []
        """Every growth step: the step and the layers that grew."""
        self.seed = torch.initial_seed()
        """Fresh reserve components are drawn from (seed, step, layer): a resumed run draws what it would have."""
        self._optimizer: torch.optim.Optimizer | None = None

    def make_layer(self, base: nn.Module) -> IncreLoRALinear:
        return IncreLoRALinear(base, self.cfg.init_r, self.cfg.incre_rank_num, self.cfg.alpha, self.cfg.dropout)

    def layer_params(self, d_in: int, d_out: int) -> int:
        return (self.cfg.init_r + self.cfg.incre_rank_num) * (d_in + d_out) + self.cfg.init_r

    def budget(self, model: nn.Module) -> int:
        return self.cfg.r * len(incre_layers(model))

    def aux_loss(self, model: nn.Module) -> Tensor | None:
        if self.cfg.orth_reg_weight == 0:
            return None
        return self.cfg.orth_reg_weight * orthogonality_penalty([layer for _, layer in incre_layers(model)])

    def on_before_optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self._optimizer = optimizer  # growth hands the moments of the old tensors to the new ones through it

    def update_importance(self, layers: list[tuple[str, IncreLoRALinear]]) -> None:
        b1, b2 = self.cfg.beta1, self.cfg.beta2
        for name, layer in layers:
            avg = b1 * self.ema_ipt.get(name, 0.0) + (1 - b1) * layer.score
            self.ema_unc[name] = b2 * self.ema_unc.get(name, 0.0) + (1 - b2) * abs(layer.score - avg)
            self.ema_ipt[name] = avg

    def is_growth_step(self, step: int) -> bool:
        total = self.run.total
        warmup, interval = round(self.cfg.init_warmup * total), max(1, round(self.cfg.incre_interval * total))
        return step > warmup and step % interval == 0

    def on_train_start(self, model: nn.Module, total_steps: int) -> None:
        self.run.from_run(total_steps)

    def on_train_batch_end(self, model: nn.Module, step: int) -> bool | None:
        layers = incre_layers(model)
        if not any(layer.scoring for _, layer in layers):
            return None
        self.update_importance(layers)
        if not self.is_growth_step(step):
            return None
        left = self.budget(model) - sum(layer.r for _, layer in layers)
        ranked = sorted(layers, key=lambda item: -self.ema_ipt[item[0]] * self.ema_unc[item[0]])
        position = {name: i for i, (name, _) in enumerate(layers)}
        grown = []
        for name, layer in ranked[: self.cfg.top_h]:
            n = min(self.cfg.incre_rank_num, left)
            if n == 0:
                break
            generator = torch.Generator().manual_seed(hash((self.seed, step, position[name])) % 2**63)
            self.replace(
                layer, lambda layer=layer, n=n, g=generator: layer.grow(n, g), keep=(layer.lora_A.shape[0], layer.r)
            )
            grown.append(name)
            left -= n
        if left == 0:
            for _, layer in layers:
                self.replace(layer, layer.drop_reserve, keep=(layer.r, layer.r))
        self.growth.append({"step": step, "layers": grown})
        return True

    def replace(self, layer: IncreLoRALinear, change: Any, keep: tuple[int, int]) -> None:
        """Run `change` (which replaces the layer's tensors) and carry the optimizer state over: `keep` = (components
        of A/B, gates) whose moments survive."""
        old = (layer.lora_A, layer.lora_B, layer.gate)
        change()
        if self._optimizer is not None:
            carry_moments(self._optimizer, old[0], layer.lora_A, 0, keep[0])
            carry_moments(self._optimizer, old[1], layer.lora_B, 1, keep[0])
            carry_moments(self._optimizer, old[2], layer.gate, 0, keep[1])

    def summary(self, model: nn.Module) -> dict[str, Any]:
        layers = incre_layers(model)
        return {
            "ranks": {name: layer.r for name, layer in layers},
            "budget": self.budget(model),
            "total_rank": sum(layer.r for _, layer in layers),
            "growth": self.growth,
            **self.run.summary(),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"ema_ipt": self.ema_ipt, "ema_unc": self.ema_unc, "growth": self.growth, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any], model: nn.Module) -> None:
        self.ema_ipt = dict(state.get("ema_ipt", {}))
        self.ema_unc = dict(state.get("ema_unc", {}))
        self.growth = list(state.get("growth", []))
        self.seed = state.get("seed", self.seed)
