"""AdaLoRA — "AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning" (Zhang, Chen, Bukharin,
Karampatziakis, He, Cheng, Chen, Zhao; ICLR 2023, arXiv 2303.10512).

Update rule: an SVD-shaped update whose rank components (triplets) compete for a global budget,

    y = W0 x + b + s · P diag(Λ) Q x,    P ∈ R^{d_out×R}, Λ ∈ R^R, Q ∈ R^{R×d_in}, s = alpha / R

with R = `init_r` components per layer (stored as `lora_B` = P, `gate` = Λ, `lora_A` = Q) and an orthogonality
penalty orth_reg_weight · mean over matrices of ‖QQᵀ − I‖_F and ‖PᵀP − I‖_F added to the loss. After every
optimizer step (using that step's gradients) each entry θ of P, Λ, Q updates its sensitivity I = |θ·∇θ|, smoothed
Ī ← β1·Ī + (1−β1)·I, and uncertainty Ū ← β2·Ū + (1−β2)·|I − Ī|; a triplet scores
S_i = s(Λ_i) + mean_j s(Q_ij) + mean_j s(P_ji) with s = Ī·Ū. The total budget b(t) (triplets kept in the model) is
R·n for the first t_i steps, falls cubically to the target r·n at T − t_f,

    b(t) = r·n + (R − r)·n · (1 − (t − t_i)/(T − t_f − t_i))³   (floored),

and every `mask_interval` steps the Λ entries of the lowest-scoring triplets are zeroed so that b(t) remain
(masked triplets may come back at the next allocation). At T − t_f the allocation is fixed and re-applied after every
later step. At the end of training the masked triplets are deleted (`on_train_end`), as PEFT does when it saves an
AdaLoRA adapter: each layer keeps its allocated rank.

Init: Λ = 0, P and Q ~ N(0, 0.02) (the model equals the base at step 0).
Trainable parameters per layer: R·(d_in + d_out + 1); Σ r_l·(d_in + d_out + 1) after the final deletion.

Choices (PEFT 0.21 `tuners/adalora` is the reference, and the official QingruZhang/AdaLoRA scripts for defaults):
- The allocator is PEFT's `RankAllocator` step for step: budget, masking threshold (k-th smallest score, ties masked
  together), fixed final pattern; tests check it against PEFT on the same gradient sequence.
- s = alpha / R exactly (PEFT divides by R + 1e-5).
- `r` is the target average rank (PEFT `target_r`, default 8); `init_r` defaults to ⌈1.5·r⌉ (the paper's
  b(0) = 1.5·b(T); PEFT's defaults 12 → 8).
- The phases are fractions of the run: the official GLUE scripts spend 9–18% of the steps at the initial budget and
  44–58% at the final one (e.g. SST-2 6000 and 22000 of 50.5k steps), hence 0.1 and 0.5; masking every step
  (PEFT's deltaT = 1, the scripts' choice for their short runs). orth_reg_weight 0.1 is the scripts' value for most
  tasks (PEFT's default is 0.5).
- The schedule needs the run's length T: the training loop gives it (`on_train_start`, the optimizer steps the
  learning-rate schedule is built for); `variant.total_steps` overrides it. Used outside a training loop without
  either, the schedule assumes `ASSUMED_TOTAL_STEPS` and warns; the summary records where T came from.

Computation: Λ is folded into P (d_out × R, cheap) before the rank-R products, so the layer runs LoRA's two paths
(lora.py), merged-weight GEMM included. The importance scores need the step's gradients after the optimizer step:
the variant keeps references to them from `on_before_optimizer_step` to `on_train_batch_end` (the loop zeroes
gradients by setting them to None, which leaves those tensors alone).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lorafactory.errors import check
from lorafactory.variants.base import VARIANTS, Variant, VariantConfig, named_adapter_layers, peft_layer_state
from lorafactory.variants.sora import GatedLoRALinear, gated_layers

ASSUMED_TOTAL_STEPS = 1000
"""The run length a schedule assumes when `variant.total_steps` is not set: about this project's GLUE budgets
(140–800 steps with the default task configs)."""


class RunLength:
    """The length T of the run a variant's schedule is laid out over: `total_steps` when given, else
    ASSUMED_TOTAL_STEPS with a warning (once)."""

    def __init__(self, total_steps: int, variant: str):
        self.given = total_steps > 0
        self.source = "variant.total_steps" if self.given else "assumed"
        self._total = total_steps if self.given else ASSUMED_TOTAL_STEPS
        self._variant = variant
        self._warned = self.given

    def from_run(self, total_steps: int) -> None:
        """The training loop's length, unless `variant.total_steps` set one."""
        if not self.given and total_steps > 0:
            self.given, self.source, self._total, self._warned = True, "run", total_steps, True

    @property
    def total(self) -> int:
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"the run's length is unknown: {self._variant}'s schedule assumes {self._total} steps; "
                "set variant.total_steps to the run's number of optimizer steps",
                stacklevel=3,
            )
        return self._total

    def summary(self) -> dict[str, Any]:
        return {"total_steps": self._total, "total_steps_given": self.given, "total_steps_from": self.source}


@dataclass(frozen=True)
class BudgetSchedule:
    """AdaLoRA's budget: how many triplets the whole model keeps after step t, and whether step t reallocates."""

    initial: int
    """R·n: every triplet of every layer."""
    target: int
    """r·n."""
    total: int
    tinit: int
    tfinal: int
    interval: int

    @property
    def final_step(self) -> int:
        """T − t_f: the step that fixes the allocation."""
        return self.total - self.tfinal

    def __call__(self, step: int) -> tuple[int, bool]:
        if step <= self.tinit:
            return self.initial, False
        if step > self.final_step:
            return self.target, True
        progress = 1 - (step - self.tinit) / (self.final_step - self.tinit)
        return int((self.initial - self.target) * progress**3 + self.target), step % self.interval == 0


class SVDLinear(GatedLoRALinear):
    """P diag(Λ) Q with P = `lora_B`, Λ = `gate`, Q = `lora_A`; Λ starts at 0, P and Q ~ N(0, 0.02)."""

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float = 0.0):
        super().__init__(base, r, scaling, dropout)
        with torch.no_grad():
            self.lora_A.normal_(0.0, 0.02)
            self.lora_B.normal_(0.0, 0.02)


def orthogonality_penalty(layers: list[GatedLoRALinear]) -> Tensor:
    """mean over every Q and P of ‖QQᵀ − I‖_F and ‖PᵀP − I‖_F (AdaLoRA's and IncreLoRA's regulariser)."""
    terms = []
    for layer in layers:
        for gram in (layer.lora_A @ layer.lora_A.t(), layer.lora_B.t() @ layer.lora_B):
            eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
            terms.append(torch.linalg.matrix_norm(gram - eye))
    return torch.stack(terms).mean()


@dataclass
class AdaLoRAConfig(VariantConfig):
    # Official GLUE scripts (DeBERTaV3) train at 5e-4–2.2e-3, median 8e-4, where LoRA's GLUE rates are 4e-4–5e-4.
    lr_mult: float = 2.0
    init_r: int = 0
    """R, the rank every layer starts with; 0: ⌈1.5·r⌉. `r` is the target average rank."""
    total_steps: int = 0
    """The run's length T in optimizer steps, over which the budget schedule is laid out; 0: the training loop's
    (`on_train_start`)."""
    tinit_fraction: float = 0.1
    """t_i / T: the share of the run trained at the initial budget before pruning starts."""
    tfinal_fraction: float = 0.5
    """t_f / T: the share of the run at the end trained with the final allocation fixed."""
    mask_interval: int = 1
    """Steps between two reallocations while the budget falls (PEFT's deltaT)."""
    beta1: float = 0.85
    """EMA coefficient of the sensitivity."""
    beta2: float = 0.85
    """EMA coefficient of the uncertainty."""
    orth_reg_weight: float = 0.1
    """Weight of the orthogonality penalty on P and Q."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_r == 0:
            self.init_r = math.ceil(1.5 * self.r)
        check(self.init_r >= self.r, f"variant.init_r must be >= variant.r (the target rank), got {self.init_r}")
        check(self.total_steps >= 0, f"variant.total_steps must be >= 0, got {self.total_steps}")
        fractions = (self.tinit_fraction, self.tfinal_fraction)
        check(
            min(fractions) >= 0 and sum(fractions) < 1,
            f"variant.tinit_fraction and variant.tfinal_fraction must be >= 0 and sum to < 1, got {fractions}",
        )
        check(self.mask_interval >= 1, f"variant.mask_interval must be >= 1, got {self.mask_interval}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            check(0 < value < 1, f"variant.{name} must be in (0, 1), got {value}")
        check(self.orth_reg_weight >= 0, f"variant.orth_reg_weight must be >= 0, got {self.orth_reg_weight}")


PARTS = ("lora_A", "gate", "lora_B")


@VARIANTS.register("adalora", config=AdaLoRAConfig)
class AdaLoRA(Variant):
    name = "adalora"
    paper = (
        "AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning "
        "(Zhang et al., ICLR 2023, arXiv 2303.10512)"
    )
    taxonomy = "rank"
    tags = ("budgeting", "svd")
    params_formula = "init_r·(d_in + d_out + 1); allocated r_l·(d_in + d_out + 1) after training"
    peft = "AdaLoraConfig(...)"
    memory_note = "importance EMAs of every adapter entry: 2× the adapter parameters"

    def __init__(self, cfg: AdaLoRAConfig):
        super().__init__(cfg)
        self.run = RunLength(cfg.total_steps, self.name)
        self.step = 0
        """Optimizer steps taken (the last `on_train_batch_end`)."""
        self.ema: dict[str, dict[str, Tensor]] = {}
        """Per layer: the sensitivity (`ipt_<part>`) and uncertainty (`unc_<part>`) EMAs of P, Λ and Q."""
        self.masks: dict[str, Tensor] = {}
        """Per layer: the triplets kept by the last allocation."""
        self.fixed = False
        """The allocation is final (step T − t_f passed)."""
        self._grads: dict[str, tuple[Tensor, ...]] = {}

    def schedule(self, n_layers: int) -> BudgetSchedule:
        total = self.run.total
        return BudgetSchedule(
            initial=self.cfg.init_r * n_layers,
            target=self.cfg.r * n_layers,
            total=total,
            tinit=round(self.cfg.tinit_fraction * total),
            tfinal=round(self.cfg.tfinal_fraction * total),
            interval=self.cfg.mask_interval,
        )

    def make_layer(self, base: nn.Module) -> SVDLinear:
        return SVDLinear(base, self.cfg.init_r, self.cfg.alpha / self.cfg.init_r, self.cfg.dropout)

    def layer_params(self, d_in: int, d_out: int) -> int:
        return self.cfg.init_r * (d_in + d_out + 1)

    def aux_loss(self, model: nn.Module) -> Tensor | None:
        if self.cfg.orth_reg_weight == 0:
            return None
        return self.cfg.orth_reg_weight * orthogonality_penalty([layer for _, layer in gated_layers(model)])

    def on_before_optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        # The scores use these gradients with the parameters the optimizer is about to produce. References, not
        # copies: Lightning clips the gradients in place after this hook, and zeroing sets them to None.
        if self.fixed:
            return
        self._grads = {}
        for name, layer in gated_layers(model):
            grads = [getattr(layer, part).grad for part in PARTS]
            if all(g is not None for g in grads):
                self._grads[name] = tuple(g.detach() for g in grads)

    @torch.no_grad()
    def update_importance(self, model: nn.Module) -> None:
        b1, b2 = self.cfg.beta1, self.cfg.beta2
        for name, layer in gated_layers(model):
            if name not in self._grads:
                continue
            ema = self.ema.setdefault(name, {})
            for part, grad in zip(PARTS, self._grads[name], strict=True):
                param = getattr(layer, part)
                ipt = (param * grad).abs()
                avg = ema.get(f"ipt_{part}", torch.zeros_like(param)) * b1 + (1 - b1) * ipt
                unc = ema.get(f"unc_{part}", torch.zeros_like(param)) * b2 + (1 - b2) * (ipt - avg).abs()
                ema[f"ipt_{part}"], ema[f"unc_{part}"] = avg, unc
        self._grads = {}

    def triplet_scores(self, name: str, layer: GatedLoRALinear) -> Tensor:
        ema = self.ema.get(name)
        if ema is None:  # never scored (no gradient reached it): loses every comparison
            return torch.zeros(layer.r, device=layer.gate.device)
        score = {part: ema[f"ipt_{part}"] * ema[f"unc_{part}"] for part in PARTS}
        return score["gate"] + score["lora_A"].mean(dim=1) + score["lora_B"].mean(dim=0)

    @torch.no_grad()
    def allocate(self, model: nn.Module, budget: int, initial: int) -> None:
        """Keep the `budget` best-scoring triplets of the model: zero Λ of the others."""
        layers = gated_layers(model)
        scores = {name: self.triplet_scores(name, layer) for name, layer in layers}
        if initial - budget <= 0:
            self.masks = {name: torch.ones_like(s, dtype=torch.bool) for name, s in scores.items()}
            return
        threshold = torch.kthvalue(torch.cat(list(scores.values())), initial - budget).values
        self.masks = {name: s > threshold for name, s in scores.items()}
        self.apply_masks(model)

    @torch.no_grad()
    def apply_masks(self, model: nn.Module) -> None:
        for name, layer in gated_layers(model):
            if name in self.masks and layer.r == self.masks[name].numel():
                layer.gate.masked_fill_(~self.masks[name].to(layer.gate.device), 0.0)

    def on_train_start(self, model: nn.Module, total_steps: int) -> None:
        self.run.from_run(total_steps)

    def on_train_batch_end(self, model: nn.Module, step: int) -> bool | None:
        self.step = step
        schedule = self.schedule(len(gated_layers(model)))
        if step < schedule.final_step:
            self.update_importance(model)
            budget, reallocate = schedule(step)
            if reallocate:
                self.allocate(model, budget, schedule.initial)
        elif not self.fixed:
            self.allocate(model, schedule.target, schedule.initial)
            self.fixed, self.ema = True, {}
        else:
            self.apply_masks(model)
        return None

    def on_train_end(self, model: nn.Module) -> None:
        # Between two reallocations masked Λ entries drift off 0: the deployed adapter is the masked one.
        self.apply_masks(model)
        for name, layer in gated_layers(model):
            if name in self.masks and layer.r == self.masks[name].numel():
                layer.prune(self.masks[name].to(layer.gate.device), fold=False)

    def ranks(self, model: nn.Module) -> dict[str, int]:
        """Triplets each layer keeps: its last allocation (or all of them before any)."""
        ranks = {}
        for name, layer in gated_layers(model):
            mask = self.masks.get(name)
            ranks[name] = int(mask.sum()) if mask is not None and mask.numel() == layer.r else layer.r
        return ranks

    def summary(self, model: nn.Module) -> dict[str, Any]:
        schedule = self.schedule(len(gated_layers(model)))
        return {
            "ranks": self.ranks(model),
            "init_r": self.cfg.init_r,
            "target_r": self.cfg.r,
            "budget": schedule(self.step)[0],
            "tinit": schedule.tinit,
            "tfinal": schedule.tfinal,
            "allocation_fixed": self.fixed,
            **self.run.summary(),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "fixed": self.fixed, "ema": self.ema, "masks": self.masks}

    def load_state_dict(self, state: dict[str, Any], model: nn.Module) -> None:
        self.step = state.get("step", 0)
        self.fixed = state.get("fixed", False)
        self.ema = {name: dict(parts) for name, parts in state.get("ema", {}).items()}
        self.masks = dict(state.get("masks", {}))

    def peft_config(self, targets: list[str], head: list[str]) -> Any:
        from peft import AdaLoraConfig

        schedule = self.schedule(1)
        return AdaLoraConfig(
            init_r=self.cfg.init_r,
            target_r=self.cfg.r,
            lora_alpha=self.cfg.alpha,
            lora_dropout=self.cfg.dropout,
            tinit=schedule.tinit,
            tfinal=schedule.tfinal,
            deltaT=self.cfg.mask_interval,
            beta1=self.cfg.beta1,
            beta2=self.cfg.beta2,
            orth_reg_weight=self.cfg.orth_reg_weight,
            total_step=schedule.total,
            target_modules=targets,
            modules_to_save=head,
        )

    def peft_export(
        self, model: nn.Module, base: nn.Module, targets: list[str], head: list[str]
    ) -> tuple[Any, dict[str, Tensor]] | None:
        with warnings.catch_warnings():  # the budget schedule's length: irrelevant to a trained adapter
            warnings.simplefilter("ignore")
            config = self.peft_config(targets, head)
        config.lora_alpha *= (self.cfg.init_r + 1e-5) / self.cfg.init_r  # PEFT divides by init_r + 1e-5, we by init_r
        layers = named_adapter_layers(model)
        if any(layer.r != self.cfg.init_r for _, layer in layers):
            # PEFT builds init_r triplets and deletes those its `rank_pattern` masks out on load, keeping the scale
            # alpha / init_r, as ours: which ones it names does not matter, ours are already deleted.
            config.rank_pattern = {
                f"{name}.lora_E": [i < layer.r for i in range(self.cfg.init_r)] for name, layer in layers
            }
        state = peft_layer_state(
            model, lambda layer: {"lora_A": layer.lora_A, "lora_B": layer.lora_B, "lora_E": layer.gate.unsqueeze(1)}
        )
        return config, state
