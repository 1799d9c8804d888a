"""SmolLM2-135M as a causal LM: training-step time of LoRA and DoRA (all-linear) against the frozen model and against
PEFT, greedy generation speed with the adapter merged and unmerged against the base model, and the peak memory of
LoRA, DoRA and full fine-tuning runs against the frozen model's.

    python scripts/bench_nlg.py                                  # all three parts, batch 8 × 256, r 8
    python scripts/bench_nlg.py --parts generation               # one part
    python scripts/bench_nlg.py --model tiny-llama --steps 2     # quick check of the script itself

Steps: "frozen" is the cost no adapter can avoid, every weight frozen and the gradient carried back to the embeddings
(as PEFT's `enable_input_require_grads`); a step is forward (causal-LM loss on every token), backward, AdamW step and
zero_grad; configurations are timed round-robin so drifts in machine load hit them all alike (median of `--steps`).

Generation: `tasks.generation.greedy_generate` (what evaluation runs), `--gen-batch` prompts × `--new-tokens` greedy
tokens with the KV cache, no stop string. The adapters are at their initial point (LoRA's B = 0): every configuration
then writes the same tokens, so the timings compare the same work; an adapter's values do not change its cost.

Memory: peak RSS over `--mem-steps` training steps of a fresh process that builds the model and adapts it (one
process per configuration, so one's peak does not hide the other's; the peak is reset after building, whose own peak,
dequantising the GGUF, would hide every method's).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from lorafactory.config import CONF_DIR
from lorafactory.models import LoadedModel, build_model
from lorafactory.tasks.generation import greedy_generate
from lorafactory.variants import build_variant
from lorafactory.variants.base import find_targets, freeze, merged


def model_config(name: str) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml"), resolve=False)
    cache = Path(os.environ.get("LORAFACTORY_CACHE", Path.home() / ".cache" / "lorafactory"))
    cfg["cache_dir"] = str(cache / "models")
    return cfg


def load(name: str) -> LoadedModel:
    return build_model(OmegaConf.create(model_config(name)), 0, kind="causal-lm")


def frozen(model: nn.Module, loaded: LoadedModel) -> nn.Module:
    freeze(model)
    model.get_input_embeddings().register_forward_hook(lambda module, args, out: out.requires_grad_(True))
    return model


def ours(model: nn.Module, loaded: LoadedModel, variant: str, r: int) -> nn.Module:
    build_variant({"name": variant, "r": r, "alpha": 2 * r, "targets": "all-linear"}).adapt(
        model, head=loaded.not_adapted
    )
    return model


def peft(model: nn.Module, loaded: LoadedModel, variant: str, r: int) -> nn.Module:
    """PEFT's same method with the same settings (`Variant.peft_config`), the output layer left alone as ours is."""
    from peft import get_peft_model

    names = find_targets(model, "all-linear", loaded.not_adapted)
    config = build_variant({"name": variant, "r": r, "alpha": 2 * r, "targets": "all-linear"}).peft_config(names, [])
    return get_peft_model(model, config)


def configurations(loaded: LoadedModel, r: int, with_peft: bool) -> dict[str, Callable[[nn.Module], nn.Module]]:
    out: dict[str, Callable[[nn.Module], nn.Module]] = {"frozen": lambda m: frozen(m, loaded)}
    for variant in ("lora", "dora"):
        out[f"ours {variant}"] = lambda m, v=variant: ours(m, loaded, v, r)
        if with_peft:
            out[f"peft {variant}"] = lambda m, v=variant: peft(m, loaded, v, r)
    out["full"] = lambda m: ours(m, loaded, "full", r)  # the ceiling's cost: every weight, its gradient, Adam moments
    return out


def training_batch(loaded: LoadedModel, batch: int, seq: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    vocab = loaded.module.get_input_embeddings().num_embeddings
    ids = torch.randint(1000, min(vocab, 20000), (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def make_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5) if params else None  # frozen: forward and backward only

    def step() -> None:
        model(**batch).loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


def bench_steps(args: argparse.Namespace, loaded: LoadedModel) -> dict[str, float]:
    batch = training_batch(loaded, args.batch, args.seq)
    steps = {
        name: make_step(make(copy.deepcopy(loaded.module)), batch)
        for name, make in configurations(loaded, args.r, not args.no_peft).items()
    }
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(args.warmup + args.steps):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    print(
        f"\n## Training step: {args.model}, batch {args.batch} × {args.seq}, r {args.r}, all-linear, "
        f"median of {args.steps} steps, {torch.get_num_threads()} threads\n"
    )
    print(f"| {'configuration':<12} | {'s/step':>7} | {'× frozen':>8} | {'× PEFT':>6} |")
    print("|---|---:|---:|---:|")
    for name, t in median.items():
        peer = name.replace("ours", "peft")
        vs_peft = f"{t / median[peer]:.2f}" if name.startswith("ours") and peer in median else ""
        print(f"| {name:<12} | {t:7.2f} | {t / median['frozen']:8.2f} | {vs_peft:>6} |")
    return median


def bench_generation(args: argparse.Namespace, loaded: LoadedModel) -> dict[str, float]:
    tok = loaded.tokenizer
    foods = ["French", "Italian", "Indian", "English", "Chinese", "Japanese", "Fast food", "Thai"]
    prompts = [
        tok(
            f"Meaning representation: name[The Place {i}], eatType[restaurant], food[{foods[i % 8]}], "
            f"priceRange[{'cheap' if i % 2 else 'high'}], area[riverside]\nRestaurant description:",
            add_special_tokens=False,
        )["input_ids"]
        for i in range(args.gen_batch)
    ]
    base = loaded.module.eval()
    lora = ours(copy.deepcopy(base), loaded, "lora", args.r).eval()
    dora = ours(copy.deepcopy(base), loaded, "dora", args.r).eval()
    runs: dict[str, Callable[[], object]] = {
        "base": lambda: greedy_generate(base, tok, prompts, args.new_tokens, batch_size=args.gen_batch),
        "lora merged": lambda: _merged(lora, tok, prompts, args),
        "lora unmerged": lambda: greedy_generate(lora, tok, prompts, args.new_tokens, batch_size=args.gen_batch),
        "dora merged": lambda: _merged(dora, tok, prompts, args),
        "dora unmerged": lambda: greedy_generate(dora, tok, prompts, args.new_tokens, batch_size=args.gen_batch),
    }
    speeds: dict[str, list[float]] = {name: [] for name in runs}
    tokens: dict[str, int] = {}
    for _ in range(args.gen_repeats):
        for name, run in runs.items():
            out = run()
            speeds[name].append(out.tokens_per_s)
            tokens[name] = sum(out.tokens)
    median = {name: statistics.median(s) for name, s in speeds.items()}
    print(
        f"\n## Greedy generation: {args.model}, {args.gen_batch} prompts × up to {args.new_tokens} new tokens, "
        f"KV cache, batch {args.gen_batch}, median of {args.gen_repeats}\n"
    )
    print(f"| {'configuration':<13} | {'tokens/s':>8} | {'× base':>6} | {'tokens':>6} |")
    print("|---|---:|---:|---:|")
    for name, s in median.items():
        print(f"| {name:<13} | {s:8.1f} | {s / median['base']:6.2f} | {tokens[name]:>6} |")
    return median


def _merged(model: nn.Module, tok: object, prompts: list, args: argparse.Namespace) -> object:
    with torch.no_grad(), merged(model):
        return greedy_generate(model, tok, prompts, args.new_tokens, batch_size=args.gen_batch)


def peak_memory_mb(args: argparse.Namespace, name: str) -> float:
    """Peak RSS (MB) of a fresh process that builds the model as `name` and takes `--mem-steps` training steps."""
    cmd = [sys.executable, __file__, "--model", args.model, "--batch", str(args.batch), "--seq", str(args.seq)]
    cmd += ["--r", str(args.r), "--mem-steps", str(args.mem_steps), "--memory-of", name]
    cmd += ["--threads", str(args.threads)] if args.threads else []
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]  # over the training steps only


def rss_status(field: str) -> float | None:
    """`VmRSS` (now) or `VmHWM` (peak since the last reset) of this process in MB, where /proc has them (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Start the peak-RSS count afresh (Linux: `5` to /proc/self/clear_refs resets VmHWM)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def memory_child(args: argparse.Namespace) -> None:
    """Loading SmolLM2 from its GGUF peaks far above training (dequantising every tensor), and that peak would hide
    every method's own: the peak is counted from after the model is built and adapted, over the training steps only."""
    loaded = load(args.model)
    model = configurations(loaded, args.r, True)[args.memory_of](loaded.module)
    step = make_step(model, training_batch(loaded, args.batch, args.seq))
    gc.collect()
    before = rss_status("VmRSS")
    fresh = reset_peak_rss()
    for _ in range(args.mem_steps):
        step()
    peak = rss_status("VmHWM") if fresh else None
    if peak is None:  # no /proc: the process's lifetime peak, load included
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_mb": peak, "before_mb": before}))


def bench_memory(args: argparse.Namespace) -> dict[str, float]:
    peaks = {name: peak_memory_mb(args, name) for name in ("frozen", "ours lora", "ours dora", "full")}
    print(f"\n## Peak memory: {args.model}, batch {args.batch} × {args.seq}, {args.mem_steps} steps, one process each")
    print()
    print(f"| {'configuration':<12} | {'peak RSS MB':>11} | {'× frozen':>8} |")
    print("|---|---:|---:|")
    for name, mb in peaks.items():
        print(f"| {name:<12} | {mb:11.0f} | {mb / peaks['frozen']:8.2f} |")
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", choices=["smollm2-135m", "tiny-llama"])
    parser.add_argument("--parts", default="steps,generation,memory")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--no-peft", action="store_true")
    parser.add_argument("--gen-batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--gen-repeats", type=int, default=3)
    parser.add_argument("--mem-steps", type=int, default=3)
    parser.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)  # the child process of `memory`
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.memory_of:
        memory_child(args)
        return
    parts = args.parts.split(",")
    if "steps" in parts or "generation" in parts:
        loaded = load(args.model)
        if "steps" in parts:
            bench_steps(args, loaded)
        if "generation" in parts:
            bench_generation(args, loaded)
    if "memory" in parts:
        bench_memory(args)


if __name__ == "__main__":
    main()
