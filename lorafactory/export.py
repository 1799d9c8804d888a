"""`python -m lorafactory.export RUN_DIR --merged OUT`: a finished run's model with its update folded into the
weights, saved as a plain transformers model (`AutoModelFor...from_pretrained(OUT)`), with its tokenizer.

`--peft OUT`: the run's adapter as a PEFT adapter, `PeftModel.from_pretrained(base, OUT)` on the base model the run
started from, for every variant PEFT has (a `peft` twin): each implements `Variant.peft_export`, which maps its trained
state onto PEFT's tensors and config; the trained head goes to PEFT's `modules_to_save`.

- One to one: lora, rslora, loraplus, lora_fa (`LoraConfig`); dora (+ m as `lora_magnitude_vector`); adalora (P, Λ,
  Q; the ranks each layer kept as PEFT's `rank_pattern`); oft (the same generator entries); boft (PEFT's full matrix
  D = 2·our upper triangle, the scales); delora, hira, hra, fourierft (PEFT draws the same frequency locations from
  the seed); and with their model-level tensors in the adapter: vera and randlora (the random bases,
  `save_projection`; RandLoRA's B reordered to PEFT's pairing of columns and terms), vblora (the vector bank),
  unilora (θ with our slot assignment and scales, `save_indices`).
- Converted: the variants that rewrite the base weight at init, pissa, olora and lora_ga (W_res = W0 − s·B0 A0),
  become what PEFT's own conversion of such adapters gives, a plain LoRA of rank 2r on the original W0 with
  A' = [A; A0], B' = [B, −B0] and the same s (B0 A0 from the rank-r SVD of W0 − W_res, see lora.py).
- Refused in one line naming the variant and why: a run whose base is stored in 4 bits (qlora, loftq, any variant
  with `model.quantize`): its adapter was trained on the quantized weights and computes something else on the
  full-precision base a PEFT adapter is loaded on (a low-rank adapter cannot absorb the quantization error exactly);
  settings PEFT cannot hold: BOFT with more than one butterfly factor where PEFT's CUDA kernel does not build (PEFT
  then builds one), a BOFT layer that fell back to another block size for its width, VB-LoRA widths its
  `vector_length` does not divide, RandLoRA layers with different numbers of bases; convolutions (linear layers
  only); variants PEFT lacks (use `--merged`).

Nothing wrong is written: the export builds PEFT's model on a fresh base, checks that the state fills exactly PEFT's
adapter tensors (names and shapes), saves it to a staging folder, loads that back with `PeftModel.from_pretrained` on
another fresh base and compares its outputs with the run's on a fixed input (`PEFT_TOLERANCE`); only then are the
files moved into OUT.

The run folder must hold `result.json` (its resolved config says how the model, task head and variant were built)
and `adapter.pt` (written unless the run said `save_adapter=false`). A variant whose update depends on the input
(MoE-LoRA) has no merged form and is refused in one line, as are models that are not transformers models.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from lorafactory import quantize
from lorafactory.errors import UserError
from lorafactory.models import ImageSpec, LoadedModel, build_model, unfreeze
from lorafactory.results.record import RECORD_NAME, read_record
from lorafactory.tasks import get_task
from lorafactory.variants.base import (
    VARIANTS,
    Variant,
    build_variant,
    load_adapter_state_dict,
    merge_and_unload,
    named_adapter_layers,
)

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
    config: Any
    """The run's resolved config."""


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
    loaded = build_base(cfg)
    variant = build_variant(cfg.variant)
    variant.adapt(loaded.module, head=loaded.not_adapted)
    unfreeze(loaded.module, loaded.head)
    load_adapter_state_dict(loaded.module, torch.load(state_path, map_location="cpu", weights_only=True))
    return LoadedRun(loaded.module.eval(), loaded.tokenizer, variant, loaded.head, cfg)


def build_base(cfg: Any) -> LoadedModel:
    """The run's model as built before the variant adapted it (same config, same deterministic weights)."""
    task = get_task(cfg.task)
    return build_model(cfg.model, task.num_labels, task_head=cfg.task.get("train_in_full") or (), kind=task.head)


PEFT_TOLERANCE = 1e-3
"""Largest difference between PEFT's outputs and the run's, relative to the largest output, that the export accepts:
float32 round-off of the two computation orders stays well below (~1e-5 on tiny models with large updates), while a
wrong mapping moves the outputs by about as much as the adapter does."""


def peft_variants() -> list[str]:
    """The variants PEFT has (a `peft` twin), which `--peft` exports."""
    return sorted(name for name in VARIANTS.names() if VARIANTS.get(name).peft)


def export_peft(run_dir: str | Path, out: str | Path) -> Path:
    """Write the run's adapter (and trained head, as PEFT's `modules_to_save`) as a PEFT adapter into `out`, after
    checking that PEFT loads it back and computes what the run computes."""
    from peft import PeftModel

    run = load_run(run_dir)
    model, name = run.model, run.variant.name
    _check_peft_exportable(run)
    base = build_base(run.config).module.eval()
    exported = run.variant.peft_export(model, base, [n for n, _ in named_adapter_layers(model)], list(run.head))
    if exported is None:
        raise _no_peft(name)
    config, state = exported
    for module in run.head:
        state |= {f"base_model.model.{module}.{k}": v for k, v in model.get_submodule(module).state_dict().items()}
    batch = probe_batch(run.preprocessor, model)
    with torch.no_grad():
        ours = _logits(model(**batch))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as staging:
        with _peft_refusals(name):
            _save_peft(base, config, state, staging, name)
            del base  # PEFT's model took it over: free it before building the next one
            reloaded = PeftModel.from_pretrained(build_base(run.config).module, staging).eval()
            with torch.no_grad():
                theirs = _logits(reloaded(**batch))
        error, scale = (theirs - ours).abs().max().item(), ours.abs().max().item()
        if not error <= PEFT_TOLERANCE * max(scale, 1e-6):
            raise UserError(
                f"variant={name}: PEFT's model loaded from the exported adapter computes something else than the run "
                f"(max |difference| {error:.2e} on outputs up to {scale:.2e}); nothing written"
            )
        out.mkdir(exist_ok=True)
        for path in Path(staging).iterdir():
            shutil.move(str(path), str(out / path.name))
    return out


def _no_peft(name: str) -> UserError:
    return UserError(f"variant={name} has no PEFT export (it exists for {', '.join(peft_variants())}); use --merged")


def _check_peft_exportable(run: LoadedRun) -> None:
    """Refuse in one line what no PEFT adapter can reproduce, before building anything else."""
    name = run.variant.name
    if not run.variant.peft:
        raise _no_peft(name)
    if any(quantize.is_quantized(m) for m in run.model.modules()):
        raise UserError(
            f"variant={name}: the run's base is stored in 4 bits and its adapter was trained on those weights; on the "
            "full-precision base a PEFT adapter is loaded on it computes something else; use --merged"
        )
    convs = [(n, layer.base) for n, layer in named_adapter_layers(run.model) if not isinstance(layer.base, nn.Linear)]
    if convs:
        where, module = convs[0]
        raise UserError(
            f"variant={name}: the PEFT export covers linear layers; '{where}' is a {type(module).__name__}; "
            "use --merged"
        )


def _save_peft(base: nn.Module, config: Any, state: dict[str, torch.Tensor], where: str, name: str) -> None:
    """PEFT's model on `base` with `state` in it, saved by PEFT into `where`; `state` must fill exactly PEFT's adapter
    tensors (none missing, none extra, the same shapes)."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    twin = get_peft_model(base, config)
    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(twin).items()}
    given = {k: tuple(v.shape) for k, v in state.items()}
    if given != expected:
        raise UserError(
            f"variant={name}: the exported state does not fit PEFT's adapter: {_mismatch(given, expected)}"
        )
    set_peft_model_state_dict(twin, {k: v.detach().contiguous() for k, v in state.items()})
    twin.save_pretrained(where)


@contextmanager
def _peft_refusals(name: str) -> Iterator[None]:
    """PEFT rejecting the config or the state (a width its method does not take, ...) as a one-line UserError."""
    try:
        yield
    except UserError:
        raise
    except (ValueError, RuntimeError, TypeError, KeyError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"variant={name}: PEFT cannot take this run's adapter: {reason}") from err


def _mismatch(given: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> str:
    missing = sorted(set(expected) - set(given))
    extra = sorted(set(given) - set(expected))
    shapes = sorted(k for k in set(given) & set(expected) if given[k] != expected[k])
    parts = [f"missing {missing[:2]}" if missing else "", f"unexpected {extra[:2]}" if extra else ""]
    parts += [f"{k} is {given[k]} where PEFT has {expected[k]}" for k in shapes[:1]]
    return ", ".join(p for p in parts if p)


def probe_batch(preprocessor: Any, model: nn.Module) -> dict[str, torch.Tensor]:
    """A fixed input for the model: two random images of its size, or two rows of random token ids (one of them
    padded) within its vocabulary."""
    g = torch.Generator().manual_seed(0)
    if isinstance(preprocessor, ImageSpec):
        size = preprocessor.size
        return {"pixel_values": torch.randn(2, preprocessor.channels, size, size, generator=g)}
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or len(preprocessor)
    ids = torch.randint(0, vocab, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _logits(output: Any) -> torch.Tensor:
    return (output.logits if hasattr(output, "logits") else output).float()


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
