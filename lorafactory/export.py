"""`python -m lorafactory.export RUN_DIR --merged OUT`: a finished run's model with its update folded into the
weights, saved as a plain transformers model (`AutoModelFor...from_pretrained(OUT)`), with its tokenizer.
`--peft OUT`: the run's adapter as a PEFT adapter (`PeftModel.from_pretrained(base, OUT)`), for the variants whose
state maps one to one onto PEFT's (`PEFT_EXPORT`).

The run folder must hold `result.json` (its resolved config says how the model, task head and variant were built)
and `adapter.pt` (written unless the run said `save_adapter=false`). A variant whose update depends on the input
(MoE-LoRA) has no merged form and is refused in one line, as are models that are not transformers models.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from lorafactory.errors import UserError
from lorafactory.models import build_model, unfreeze
from lorafactory.results.record import RECORD_NAME, read_record
from lorafactory.tasks import get_task
from lorafactory.variants.base import Variant, build_variant, load_adapter_state_dict, merge_and_unload

ADAPTER_NAME = "adapter.pt"


@dataclass
class LoadedRun:
    """A finished run rebuilt: the adapted model with its trained state, in eval mode."""

    model: nn.Module
    preprocessor: Any
    """The tokenizer, or the image spec."""
    variant: Variant
    head: tuple[str, ...]
    """The modules trained in full beside the adapter."""


def load_run(run_dir: str | Path) -> LoadedRun:
    """Rebuild a finished run from its record's resolved config and its `adapter.pt`."""
    run_dir = Path(run_dir)
    if not (run_dir / RECORD_NAME).is_file():
        raise UserError(f"{run_dir} is not a run folder: it has no {RECORD_NAME}")
    record = read_record(run_dir)
    if record.status != "ok":
        raise UserError(f"{run_dir}: the run's status is {record.status!r}; only finished (ok) runs can be exported")
    state_path = run_dir / ADAPTER_NAME
    if not state_path.is_file():
        raise UserError(f"{run_dir} has no {ADAPTER_NAME}: the run was launched with save_adapter=false")
    cfg = OmegaConf.create(record.config)
    task = get_task(cfg.task)
    loaded = build_model(cfg.model, task.num_labels, task_head=cfg.task.get("train_in_full") or (), kind=task.head)
    variant = build_variant(cfg.variant)
    variant.adapt(loaded.module, head=loaded.not_adapted)
    unfreeze(loaded.module, loaded.head)
    load_adapter_state_dict(loaded.module, torch.load(state_path, map_location="cpu", weights_only=True))
    return LoadedRun(loaded.module.eval(), loaded.tokenizer, variant, loaded.head)


PEFT_EXPORT = {
    "lora": {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"},
    "rslora": {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"},
    "loraplus": {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"},
    "dora": {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "magnitude": "lora_magnitude_vector"},
}
"""Per variant, our adapter layer's state keys and PEFT's names for them (PEFT's `LoraConfig` with the variant's own
settings, `Variant.peft_config`). Variants PEFT has with a state of another shape (PiSSA's rewritten base, VeRA's
shared bases, ...) are not exported yet."""


def export_peft(run_dir: str | Path, out: str | Path) -> Path:
    """Write the run's adapter (and trained head, as PEFT's `modules_to_save`) in PEFT's layout into `out`."""
    from safetensors.torch import save_file

    from lorafactory.variants.base import adapter_state_dict, named_adapter_layers

    run = load_run(run_dir)
    model, variant = run.model, run.variant
    keys = PEFT_EXPORT.get(variant.name)
    if keys is None:
        supported = ", ".join(sorted(PEFT_EXPORT))
        raise UserError(f"variant={variant.name} has no PEFT export (it exists for {supported}); use --merged")
    layers = dict(named_adapter_layers(model))
    convs = [name for name, layer in layers.items() if not isinstance(layer.base, nn.Linear)]
    if convs:
        raise UserError(
            f"the PEFT export covers linear layers; '{convs[0]}' is a {type(layers[convs[0]].base).__name__}"
        )
    tensors = {}
    for key, value in adapter_state_dict(model).items():
        layer, _, leaf = key.rpartition(".")
        if layer in layers:
            if leaf not in keys:
                raise UserError(f"variant={variant.name}: no PEFT name for the state '{key}'")
            key = f"{layer}.{keys[leaf]}"
        tensors[f"base_model.model.{key}"] = value.contiguous()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    variant.peft_config(sorted(layers), list(run.head)).save_pretrained(str(out))
    return out


def export_merged(run_dir: str | Path, out: str | Path) -> Path:
    """Fold the run's update into its model and save it with `save_pretrained` (and the tokenizer) into `out`."""
    run = load_run(run_dir)
    model, tokenizer, variant = run.model, run.preprocessor, run.variant
    if not variant.mergeable:
        raise UserError(f"variant={variant.name} has no merged form: its update depends on the input")
    if not hasattr(model, "save_pretrained"):
        raise UserError(f"the run's model ({type(model).__name__}) is not a transformers model: no merged export")
    merged = merge_and_unload(model)
    out = Path(out)
    merged.save_pretrained(out)
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lorafactory.export",
        description="Export a finished run: --merged writes its model with the update folded in, loadable by "
        "transformers' from_pretrained; --peft writes its adapter for PEFT's PeftModel.from_pretrained.",
    )
    parser.add_argument("run_dir", type=Path, help="a run folder (runs/<name>/<model>/<task>/<variant>/<id>)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--merged", type=Path, help="where to write the merged model (transformers from_pretrained)")
    what.add_argument("--peft", type=Path, help="where to write the adapter in PEFT's layout (PeftModel)")
    args = parser.parse_args(argv)
    try:
        out = export_merged(args.run_dir, args.merged) if args.merged else export_peft(args.run_dir, args.peft)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{'merged model' if args.merged else 'PEFT adapter'} written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
