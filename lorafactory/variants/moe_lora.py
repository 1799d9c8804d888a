"""MoE-LoRA — a router over LoRA experts in every adapted layer, in three published forms:

- `hydralora` (default): "HydraLoRA: An Asymmetric LoRA Architecture for Efficient Fine-Tuning" (Tian et al.,
  NeurIPS 2024, arXiv 2404.19245): one shared A, N heads B_i, dense soft routing.
- `molora`: "Pushing Mixture of Experts to the Limit: Extremely Parameter Efficient MoE for Instruction Tuning"
  (Zadouri et al., ICLR 2024, arXiv 2309.05444): N full experts (A_i, B_i), dense soft routing.
- `mixlora`: "MixLoRA: Enhancing Large Language Models Fine-Tuning with LoRA-based Mixture of Experts" (Li et al.,
  arXiv 2404.15159): N full experts, top-k routing and a Switch-style load-balancing loss.

Update rule: for a frozen linear `y = W0 x + b`, with router W_g ∈ R^{N×d_in} and g = softmax(W_g x) per token,

    hydralora:          y = W0 x + b + s · Σ_i g_i(x) · B_i A x
    molora, mixlora:    y = W0 x + b + s · Σ_i g̃_i(x) · B_i A_i x,     s = alpha / r

where g̃ = g for MoLoRA and, for MixLoRA, g kept on the top-k experts, renormalised to sum 1, and 0 elsewhere. The
router sees the input before LoRA dropout (as HydraLoRA's code). MixLoRA adds `balance_coef · mean over layers of
N · Σ_i f_i P_i` to the loss (`aux_loss`), with P_i the mean router probability of expert i over the batch's tokens
and f_i the share of the batch's top-k assignments that went to expert i (Σ f_i = 1), so a perfectly balanced router
scores 1 whatever k. Mixtral's and m-LoRA's function counts f_i per token slot (Σ f_i = k) and so scores k at
balance: their coefficient c corresponds to balance_coef = c·k here; we keep MixLoRA's 0.001 on our normalisation.
Padding tokens count (the layer does not see the attention mask).

Init, as each official code does (HydraLoRA `peft/tuners/lora.py`; MoLoRA `src/molora.py`, `configs/molora.gin`;
MixLoRA `mixlora/config.py`, `lora_linear.py`): B_i = 0, so the model equals the base at step 0; A kaiming-uniform
(HydraLoRA, MixLoRA) or N(0, 0.02²) (MoLoRA); router kaiming-uniform (HydraLoRA) or N(0, 0.02²) (MoLoRA, MixLoRA),
no bias. Official expert counts: HydraLoRA's script 4, MoLoRA's configs 10, MixLoRA's README 8; default 4 here.
Trainable parameters per layer: HydraLoRA r·d_in + N·r·d_out + N·d_in; MoLoRA/MixLoRA N·r·(d_in + d_out) + N·d_in.
With N = 1 the router is constant (softmax of one logit), so none is made and the layer is exactly LoRA.

Choices where the papers leave room: MixLoRA routes once per FFN block (one router shared by gate/up/down, plain LoRA
on attention); here every adapted linear has its own router, as HydraLoRA and MoLoRA do. Router jitter noise (off in
MixLoRA's defaults) is not implemented, so train and eval compute the same function.

Computation: the experts' factors are stored side by side (`lora_A`: the A_i stacked, (N or 1)·r × d_in; `lora_B`:
the B_i next to each other, d_out × N·r), so a layer costs two GEMMs whatever N: h = A x (rank r, or N·r), the
gates scale h per expert block, and one GEMM with [B_1 … B_N] adds the mixture to the base output. Top-k experts are
computed densely and masked by exact zeros in the gates (no token dispatch): with N·r ≪ d that is cheaper than
gathering tokens per expert. The update depends on the input, so there is no ΔW to merge (`mergeable = False`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorafactory.errors import check
from lorafactory.variants.base import VARIANTS, AdapterLayer, Variant, VariantConfig, adapter_layers, kaiming_

FORMS = ("hydralora", "molora", "mixlora")
OFFICIAL_INIT_STD = 0.02  # MoLoRA's A and router, MixLoRA's router (`router_init_range`)


def balance_loss(probs: Tensor, chosen: Tensor) -> Tensor:
    """Switch-style load balance N · Σ_i f_i P_i of one layer's routing: `probs` (tokens, N) the router's softmax,
    `chosen` (tokens, k) the experts each token was sent to. 1 when routing is uniform, N when it collapses."""
    experts = probs.shape[-1]
    counts = torch.zeros(experts, dtype=probs.dtype, device=probs.device)
    counts.index_add_(0, chosen.reshape(-1), torch.ones(chosen.numel(), dtype=probs.dtype, device=probs.device))
    share = counts / chosen.numel()  # f_i: a count, no gradient (as in Switch)
    return experts * (share * probs.mean(dim=0)).sum()


class MoELoRALinear(AdapterLayer):
    """`base(x) + s · [B_1 … B_N] (g(x) ⊗ A x)`: `lora_A` ((1 or N)·r × d_in), `lora_B` (d_out × N·r), `router`
    (N × d_in, absent when N = 1)."""

    def __init__(
        self,
        base: nn.Module,
        r: int,
        scaling: float,
        experts: int,
        form: str = "hydralora",
        top_k: int = 0,
        dropout: float = 0.0,
    ):
        super().__init__(base)
        self.r, self.scaling, self.experts, self.form = r, scaling, experts, form
        self.top_k = top_k if form == "mixlora" else 0  # 0: every expert, soft
        factory = {"dtype": base.weight.dtype, "device": base.weight.device}
        a_blocks = 1 if form == "hydralora" else experts
        self.lora_A = nn.Parameter(torch.empty(a_blocks * r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, experts * r, **factory))
        self.router = nn.Parameter(torch.empty(experts, self.in_features, **factory)) if experts > 1 else None
        with torch.no_grad():
            if form == "molora":
                self.lora_A.normal_(std=OFFICIAL_INIT_STD)
            else:
                kaiming_(self.lora_A)  # stacked rows keep fan_in = d_in: each A_i gets LoRA's bound
            if self.router is not None:
                if form == "hydralora":
                    kaiming_(self.router)
                else:
                    self.router.normal_(std=OFFICIAL_INIT_STD)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        # The last training forward's balance loss (MixLoRA), collected and cleared by `MoELoRA.aux_loss`.
        self.balance: Tensor | None = None

    def gates(self, x: Tensor) -> Tensor:
        """Routing weights per token, (tokens, N): each row sums to 1; with top-k, zero off the chosen experts."""
        x = x.reshape(-1, self.in_features)
        if self.router is None:
            return x.new_ones(x.shape[0], 1)
        probs = F.linear(x, self.router).float().softmax(dim=-1)  # softmax in fp32, as HydraLoRA and MixLoRA
        if not self.top_k:
            return probs.to(x.dtype)
        top, chosen = probs.topk(self.top_k, dim=-1)
        if self.training:
            self.balance = balance_loss(probs, chosen)
        weights = torch.zeros_like(probs).scatter_(1, chosen, top / top.sum(dim=-1, keepdim=True))
        return weights.to(x.dtype)

    def adapter_forward(self, x: Tensor) -> Tensor:
        out = self.base_forward(x)
        gates = self.gates(x)
        if self.dropout is not None:
            x = self.dropout(x)
        tokens = gates.shape[0]
        h = F.linear(x, self.lora_A).reshape(tokens, -1, self.r)  # (tokens, 1 or N, r)
        mixed = (gates.unsqueeze(-1) * h).reshape(tokens, self.experts * self.r)  # g_i · A_i x, side by side
        out2 = out.reshape(tokens, self.out_features)
        return torch.addmm(out2, mixed, self.lora_B.t(), alpha=self.scaling).view(out.shape)

    def delta_weight(self) -> Tensor:
        raise RuntimeError("moe_lora routes each token through its own mix of experts: there is no single ΔW to merge")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, form={self.form}, experts={self.experts}, r={self.r}, top_k={self.top_k}"


@dataclass
class MoELoRAConfig(VariantConfig):
    form: str = "hydralora"
    """`hydralora` (shared A, N heads B_i), `molora` (N full experts, soft routing) or `mixlora` (N full experts,
    top-k routing and a load-balancing loss)."""
    experts: int = 4
    """N, the number of LoRA experts (B heads for HydraLoRA) per layer."""
    top_k: int = 2
    """MixLoRA only: experts each token is routed to (MixLoRA's default 2)."""
    balance_coef: float = 0.001
    """MixLoRA only: weight of the load-balancing loss (MixLoRA's `router_aux_loss_coef` default)."""
    # lr_mult stays 1: HydraLoRA, MoLoRA and MixLoRA train at their LoRA baselines' learning rates.

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.form in FORMS, f"variant.form must be one of {', '.join(FORMS)}, got '{self.form}'")
        check(self.experts >= 1, f"variant.experts must be >= 1, got {self.experts}")
        if self.form == "mixlora":
            check(
                1 <= self.top_k <= self.experts,
                f"variant.top_k must be in [1, variant.experts={self.experts}], got {self.top_k}",
            )
            check(self.balance_coef >= 0, f"variant.balance_coef must be >= 0, got {self.balance_coef}")


@VARIANTS.register("moe_lora", config=MoELoRAConfig)
class MoELoRA(Variant):
    name = "moe_lora"
    paper = (
        "HydraLoRA: An Asymmetric LoRA Architecture for Efficient Fine-Tuning (Tian et al., NeurIPS 2024, "
        "arXiv 2404.19245); options MoLoRA (Zadouri et al., ICLR 2024, arXiv 2309.05444) and MixLoRA "
        "(Li et al., arXiv 2404.15159)"
    )
    taxonomy = "moe"
    tags = ("routing",)
    mergeable = False
    params_formula = "HydraLoRA: r·d_in + N·r·d_out + N·d_in; MoLoRA/MixLoRA: N·r·(d_in + d_out) + N·d_in"

    def make_layer(self, base: nn.Module) -> MoELoRALinear:
        cfg = self.cfg
        return MoELoRALinear(base, cfg.r, cfg.alpha / cfg.r, cfg.experts, cfg.form, cfg.top_k, cfg.dropout)

    def layer_params(self, d_in: int, d_out: int) -> int:
        r, n = self.cfg.r, self.cfg.experts
        a_blocks = 1 if self.cfg.form == "hydralora" else n
        return a_blocks * r * d_in + n * r * d_out + (n * d_in if n > 1 else 0)

    def aux_loss(self, model: nn.Module) -> Tensor | None:
        if self.cfg.form != "mixlora" or self.cfg.balance_coef == 0:
            return None
        losses = []
        for layer in adapter_layers(model):
            if layer.balance is not None:
                losses.append(layer.balance)
                layer.balance = None  # each forward's routing is counted once
        if not losses:
            return None
        return self.cfg.balance_coef * torch.stack(losses).mean()
