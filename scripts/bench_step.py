"""Median training-step time of our adapters vs the frozen model's forward+backward and vs PEFT, in one process;
for vision models also inference with the adapters merged vs the base model.

    python scripts/bench_step.py                                   # MiniLM, 32 × 64 tokens, lora+dora, attn+all-linear
    python scripts/bench_step.py --model efficientnet-lite0        # 32 images at its default size, pointwise convs
    python scripts/bench_step.py --model tiny-bert --steps 10      # quick check
    python scripts/bench_step.py --model efficientnet-lite0 --threads 1 --clock cpu   # on a machine others load
    python scripts/bench_step.py --model efficientnet-lite0 --set channels_last=false  # a model config field
    python scripts/bench_step.py --quantize nf4 --variants lora,qlora  # adds rows on a base stored in NF4

"Frozen" is the cost no adapter can avoid: the same model with every weight frozen but the task head, and the
gradient carried back through every layer to the input (as PEFT's `enable_input_require_grads` does). A step is
forward, backward, optimizer step and zero_grad; ours with every hook the training loop calls and the variant's own
optimizer (PEFT's twin runs plain AdamW: its special optimizers, e.g. LoRA-FA's, cost the same per step). The
configurations are timed round-robin, one step each in turn, so
drifts in machine load hit them all alike; the table shows the median of `--steps` steps per configuration.
`--clock cpu` times the process's CPU time instead of the wall clock: with one thread, what a step costs however many
other processes share the cores (with several threads it would count their spin-waits too).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from lorafactory.config import CONF_DIR, group_options
from lorafactory.errors import ConfigError
from lorafactory.models import LoadedModel, build_model, unfreeze
from lorafactory.training.optim import build_optimizer, carry_over_state
from lorafactory.variants import VARIANTS, build_variant
from lorafactory.variants.base import find_targets, freeze, merge_and_unload, replace_module

OPTIM = OmegaConf.create(
    {"lr": 1e-5, "weight_decay": 0.0, "optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True}}
)

MODELS = [m for m in group_options("model") if m != "hub"]
PLAIN_FULL = "plain full fine-tuning"
FORWARD: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
"""The context every forward runs in: bf16 autocast with `--precision bf16-mixed`, as Lightning runs training_step
(the backward and the optimizer step run outside it)."""
"""The twin `ours full/...` is compared with: PEFT has no full fine-tuning."""


def frozen(model: nn.Module, head: tuple[str, ...], modality: str) -> nn.Module:
    freeze(model)
    unfreeze(model, head)
    if modality == "text":  # vision batches carry the input gradient themselves (`make_step`)
        model.get_input_embeddings().register_forward_hook(lambda module, args, out: out.requires_grad_(True))
    return model


VARIANT_SET: dict[str, Any] = {}
"""`--variant-set` options, given to every variant that has the field (icm_lora's `generator`)."""


def variant_config(variant: str, targets: str, r: int) -> dict[str, Any]:
    fields = VARIANTS.config_cls(variant).__dataclass_fields__
    extra = {k: v for k, v in VARIANT_SET.items() if k in fields}
    return {"name": variant, "r": r, "alpha": 2 * r, "targets": targets, **extra}


def ours(model: nn.Module, head: tuple[str, ...], variant: str, targets: str, r: int) -> nn.Module:
    build_variant(variant_config(variant, targets, r)).adapt(model, head=head)
    unfreeze(model, head)
    return model


def our_step(
    model: nn.Module, head: tuple[str, ...], variant: str, targets: str, r: int, batch: dict[str, torch.Tensor]
) -> Callable[[], None]:
    """Our training step as the recipe runs it: the variant's optimizer and parameter groups, its data-driven
    initialisation, auxiliary loss and every per-step hook (gradient edits, rank reallocations...)."""
    v = build_variant(variant_config(variant, targets, r))
    v.adapt(model, head=head)
    unfreeze(model, head)
    model.train()
    v.init_from_data(model, iter([batch] * 64), lambda m, b: m(**b).loss)
    v.on_train_start(model, 10_000)
    optimizer = build_optimizer(OPTIM, v, model)
    count = 0

    def step() -> None:
        nonlocal optimizer, count
        with FORWARD():
            loss = model(**batch).loss
        aux = v.aux_loss(model)
        (loss if aux is None else loss + aux).backward()
        v.on_after_backward(model)
        v.on_before_optimizer_step(model, optimizer)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        count += 1
        if v.on_train_batch_end(model, count):
            new = build_optimizer(OPTIM, v, model)
            carry_over_state(optimizer, new)
            optimizer = new

    return step


def plain_full(model: nn.Module) -> nn.Module:
    """Full fine-tuning as plain PyTorch does it, no framework: every weight trains (the anchor of our `full`)."""
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def has_peft_twin(variant: str) -> bool:
    return VARIANTS.get(variant).peft is not None


def peft(model: nn.Module, head: tuple[str, ...], variant: str, targets: str, r: int) -> nn.Module:
    """PEFT's same method with the same settings (`Variant.peft_config`)."""
    from peft import get_peft_model

    names = find_targets(model, targets, head)
    v = build_variant({"name": variant, "r": r, "alpha": 2 * r, "targets": targets})
    v.on_train_start(model, 10_000)
    config = v.peft_config(names, list(head))
    if "quantization" in v.tags:
        to_4bit(model, names, getattr(v.cfg, "double_quant", True))
        config.init_lora_weights = True
    return get_peft_model(model, config)


def to_4bit(model: nn.Module, names: list[str], double_quant: bool) -> None:
    """Replace the named linears by bitsandbytes' NF4 `Linear4bit` (float32 compute), as transformers loads a 4-bit
    model; PEFT then wraps them with its bitsandbytes LoRA layer."""
    import bitsandbytes as bnb

    for name in names:
        linear = model.get_submodule(name)
        q = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=torch.float32,
            compress_statistics=double_quant,
            quant_type="nf4",
        )
        q.weight = bnb.nn.Params4bit(
            linear.weight.data.clone(),
            requires_grad=False,
            compress_statistics=double_quant,
            quant_type="nf4",
            blocksize=64,
        )
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
        replace_module(model, name, q.to("cpu"))  # `.to` quantizes the Params4bit
    model.is_loaded_in_4bit = True


def make_step(model: nn.Module, batch: dict[str, torch.Tensor], input_grad: bool = False) -> Callable[[], None]:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)

    def step() -> None:
        inputs = batch
        if input_grad:
            inputs = {**batch, "pixel_values": batch["pixel_values"].detach().requires_grad_(True)}
        with FORWARD():
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def make_inference(model: nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def step() -> None:
        with torch.no_grad(), FORWARD():
            model(**inputs)

    return step


def make_batch(loaded: LoadedModel, batch_size: int, seq: int) -> dict[str, torch.Tensor]:
    num_labels = loaded.module.config.num_labels
    labels = torch.randint(0, num_labels, (batch_size,))
    if loaded.modality == "vision":
        spec = loaded.tokenizer
        return {"pixel_values": torch.randn(batch_size, spec.channels, spec.size, spec.size), "labels": labels}
    vocab = loaded.module.get_input_embeddings().num_embeddings
    return {
        "input_ids": torch.randint(1000, min(vocab, 20000), (batch_size, seq)),
        "attention_mask": torch.ones(batch_size, seq, dtype=torch.long),
        "labels": labels,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm-l6", choices=MODELS)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64, help="tokens per example (text models)")
    parser.add_argument("--variants", default="lora,dora", help="comma-separated, or `all` (every registered variant)")
    parser.add_argument("--targets", default=None, help="default: attn,all-linear (text), the model's `targets`")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-peft", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a model config field")
    parser.add_argument(
        "--variant-set", action="append", default=[], metavar="KEY=VALUE", help="a variant option (generator=gen.pt)"
    )
    parser.add_argument("--quantize", default=None, help="also time ours on a base stored in this format (nf4)")
    precisions = ("32-true", "bf16-mixed")
    parser.add_argument("--precision", choices=precisions, default="32-true", help="bf16-mixed: forward in autocast")
    args = parser.parse_args()
    global FORWARD
    if args.precision == "bf16-mixed":
        FORWARD = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    if args.threads:
        torch.set_num_threads(args.threads)
    VARIANT_SET.update(OmegaConf.to_container(OmegaConf.from_dotlist(args.variant_set)))
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    torch.manual_seed(0)

    model_cfg = OmegaConf.merge(
        OmegaConf.load(CONF_DIR / "model" / f"{args.model}.yaml"), OmegaConf.from_dotlist(args.set)
    )
    loaded = build_model(model_cfg, num_labels=2)
    base, head, vision = loaded.module, loaded.head, loaded.modality == "vision"
    batch = make_batch(loaded, args.batch, args.seq)
    targets = args.targets or ("attn,all-linear" if not vision else model_cfg.get("targets", "pointwise"))

    steps: dict[str, Callable[[], None]] = {
        "frozen": make_step(frozen(copy.deepcopy(base), head, loaded.modality), batch, input_grad=vision)
    }
    failures: list[str] = []
    variants = VARIANTS.names() if args.variants == "all" else args.variants.split(",")
    if "full" in variants:
        steps[PLAIN_FULL] = make_step(plain_full(copy.deepcopy(base)), batch, input_grad=vision)
    for target in targets.split(","):
        for variant in VARIANTS.names() if args.variants == "all" else args.variants.split(","):
            key = f"{variant}/{target}"
            try:
                steps[f"ours {key}"] = our_step(copy.deepcopy(base), head, variant, target, args.r, batch)
            except ConfigError as err:  # an option it needs and was not given (icm_lora's generator)
                failures.append(f"ours {key}: {err} (--variant-set)")
                continue
            if not args.no_peft and has_peft_twin(variant):
                try:
                    steps[f"peft {key}"] = make_step(peft(copy.deepcopy(base), head, variant, target, args.r), batch)
                except Exception as err:  # PEFT's limits: EfficientNet-Lite's convolutions, VB-LoRA's vector length
                    failures.append(f"peft {key}: {type(err).__name__} {str(err)[:100]}".strip())
    if args.quantize:  # every linear layer outside the head stored quantized, as QLoRA does
        qcfg = OmegaConf.merge(model_cfg, {"quantize": {"format": args.quantize, "layers": "all-linear"}})
        qbase = build_model(qcfg, num_labels=2).module
        steps[f"frozen {args.quantize}"] = make_step(frozen(copy.deepcopy(qbase), head, loaded.modality), batch)
        for target in targets.split(","):
            for variant in VARIANTS.names() if args.variants == "all" else args.variants.split(","):
                if VARIANTS.get(variant).quantized_base:  # it quantizes its targets itself, or cannot (full)
                    continue
                step = our_step(copy.deepcopy(qbase), head, variant, target, args.r, batch)
                steps[f"ours {variant}/{target} {args.quantize}"] = step
    if vision:  # merged adapters must cost nothing at inference: time the base model against merged copies
        steps["base inference"] = make_inference(copy.deepcopy(base), batch)
        for variant in VARIANTS.names() if args.variants == "all" else args.variants.split(","):
            if VARIANTS.get(variant).mergeable:
                model = ours(copy.deepcopy(base), head, variant, targets.split(",")[0], args.r)
                steps[f"merged {variant} inference"] = make_inference(merge_and_unload(model), batch)

    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(args.warmup + args.steps):
        for name, step in steps.items():
            t0 = clock()
            step()
            if i >= args.warmup:
                times[name].append(clock() - t0)

    median = {name: statistics.median(ts) for name, ts in times.items()}
    shape = f"{batch['pixel_values'].shape[-1]} px" if vision else f"{args.seq} tokens"
    print(
        f"{args.model}, batch {args.batch} × {shape}, r={args.r}, {torch.get_num_threads()} threads, "
        f"{args.precision}, median {args.clock} time of {args.steps} steps{''.join(f', {s}' for s in args.set)}"
    )
    print(f"{'configuration':<30} {'ms/step':>9} {'× frozen':>9} {'× twin':>8} {'× base':>7}")
    for name, t in median.items():
        if name.endswith("inference"):
            print(f"{name:<30} {1000 * t:9.1f} {'':>9} {'':>8} {t / median['base inference']:7.2f}")
            continue
        peer = PLAIN_FULL if name.startswith("ours full/") else name.replace("ours", "peft")
        vs_peft = f"{t / median[peer]:.2f}" if name.startswith("ours") and peer in median else ""
        print(f"{name:<30} {1000 * t:9.1f} {t / median['frozen']:9.2f} {vs_peft:>8}")
    print("× twin: ours over PEFT's same method; for full, over plain PyTorch full fine-tuning")
    for failure in failures:
        print(f"{failure} (not timed)")


if __name__ == "__main__":
    main()
