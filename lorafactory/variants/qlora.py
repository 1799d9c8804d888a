"""QLoRA — "QLoRA: Efficient Finetuning of Quantized LLMs" (Dettmers, Pagnoni, Holtzman, Zettlemoyer, NeurIPS 2023,
arXiv 2305.14314).

Update rule: LoRA on a frozen base stored in 4-bit NormalFloat,

    y = dequant(NF4(W0)) x + b + s · B A dropout(x),    s = alpha / r

where NF4 quantizes W0 in blocks of 64 values against the absmax of each block with the 16-value NormalFloat
codebook, and the block scales are quantized again (8-bit, blocks of 256: "double quantization"). The variant turns
the quantized base on for its targets (`lorafactory.quantize`, bitsandbytes' kernels); with `model.quantize` the
targets are already quantized and stay as they are.

Init: LoRA's (A kaiming-uniform, B = 0): the adapted model equals the *quantized* base at step 0, not the
full-precision one (so `zero_init` is False; tests/variants/test_qlora.py checks the former).
Trainable parameters per layer: r · (d_in + d_out).

Paper settings used as defaults: r = 64, alpha = 16, LoRA on every linear layer ("all-linear"), NF4 with double
quantization. Dropout stays 0 as for every variant here (the contract compares train and eval, and 1×1 convolutions
with linears, in train mode); the paper's 0.1 (models up to 13B) is `variant.dropout=0.1`. Not reproduced: paged
optimizers (a GPU unified-memory feature) and the bf16 compute dtype (we compute in the model's dtype, float32 on
CPU). k×k convolutions among the targets stay in full precision: bitsandbytes and PEFT quantize linear layers only,
and their adapters run the convolution with W0 + ΔW anyway.

Computation: the base is dequantized in the forward and again in the backward (`quantize.quantized_linear`), never
kept alive between them, and LoRA runs as its two-branch form `W0 x + s·B (A x)`; LoRA's merged-weight path
(lora.py) would keep a dequantized copy of every layer alive until the backward, the memory QLoRA exists to save.
Merging dequantizes the layer for good (`AdapterLayer.write_weight`). PEFT's equivalent is LoRA on bitsandbytes'
`Linear4bit` base; the parity test builds that twin on CPU and compares outputs and gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from lorafactory import quantize
from lorafactory.errors import check
from lorafactory.variants.base import VARIANTS, VariantConfig
from lorafactory.variants.lora import LoRA, LoRALinear


class QuantizedLoRALinear(LoRALinear):
    """LoRA that runs its two-branch form on a quantized base (see "Computation"); LoftQ and LQ-LoRA share it."""

    def adapter_forward(self, x: Tensor) -> Tensor:
        if quantize.is_quantized(self.base):
            return self.add_lora(self.base_forward(x), x)
        return super().adapter_forward(x)  # a full-precision base (a k×k convolution, or merged then unmerged)


class QLoRALinear(QuantizedLoRALinear):
    """LoRA whose frozen base is stored in NF4 (when the base is a linear or 1×1 convolution)."""

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float, quant: quantize.QuantizeConfig):
        if quantize.quantizable(base):
            quantize.quantize_(base, quant)
        super().__init__(base, r, scaling, dropout)


@dataclass
class QLoRAConfig(VariantConfig):
    r: int = 64
    alpha: float = 16.0
    targets: Any = "all-linear"
    lr_mult: float = 1.0  # QLoRA's 2e-4 for 7B/13B models (paper, Table 9) is the usual LoRA rate at that scale
    block_size: int = 64
    """NF4 block size (values per absmax scale)."""
    double_quant: bool = True
    """Quantize the block scales too (8-bit, blocks of 256)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(
            self.block_size in (32, 64, 128, 256, 512, 1024, 2048, 4096),
            f"variant.block_size must be a power of two in [32, 4096], got {self.block_size}",
        )


@VARIANTS.register("qlora", config=QLoRAConfig)
class QLoRA(LoRA):
    name = "qlora"
    paper = (
        "QLoRA: Efficient Finetuning of Quantized LLMs (Dettmers, Pagnoni, Holtzman, Zettlemoyer, NeurIPS 2023, "
        "arXiv 2305.14314)"
    )
    # The study's four axes have no "memory" axis: QLoRA keeps LoRA's structure and init and changes how training
    # runs (4-bit frozen base, paged optimizer), so it sits with the optimization methods, tagged quantization.
    taxonomy = "optimization"
    tags = ("quantization",)
    zero_init = False
    peft = "LoraConfig() on a bitsandbytes Linear4bit base (nf4, double quant)"

    def make_layer(self, base: nn.Module) -> QLoRALinear:
        quant = quantize.QuantizeConfig(block_size=self.cfg.block_size, double_quant=self.cfg.double_quant)
        return QLoRALinear(base, self.cfg.r, self.scaling, self.cfg.dropout, quant)
