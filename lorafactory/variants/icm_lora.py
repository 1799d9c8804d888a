"""ICM-LoRA — "In-Context Meta LoRA Generation" (Shao et al., IJCAI 2025, arXiv 2501.17635); official code
YihuaJerry/ICM-LoRA.

Update rule: LoRA's, `y = W0 x + b + s · B A x` (s = alpha / r), with (A, B) — and the task head, when the generator
has it — not drawn at random but generated for the task: a conditional VAE decodes z ~ N(0, I) together with the
task's vector into a flat, normalised LoRA, which is de-normalised and written into the layers,

    (A, B, head) = denormalise(Decoder(z, c)),   c = mean over k examples of the features the task head reads.

Training then continues as LoRA from that point. The paper's use, generate and evaluate with no fine-tuning, is a run
of zero steps: `task.max_steps=0` (docs/decisions.md, "ICM-LoRA"). Init: the generated adapter (so `zero_init` is
False: the method exists to start away from the base model). Trainable parameters per layer: r · (d_in + d_out),
LoRA's.

The generator is fit once, outside training, on the adapters a sweep saved: `python -m lorafactory.icm fit
runs/<sweep> --out gen.pt`, then `variant=icm_lora variant.generator=gen.pt`. lorafactory/icm.py holds the pipeline
and every choice made against the paper and its official code (task vector, normalisation, CVAE, how z is drawn,
the scale at which this can work); this file only loads the generator into a LoRA model:

- `init_from_data` computes the current task's vector from the training batches it is given (the same
  `icm.task_vector` the fit used, with the generator's `examples`, through the adapted model while B = 0, i.e. the
  frozen base model), generates the state with `variant.sample_seed`, rescales B from the source adapters' scale to
  this variant's (s_source / s), and loads it. A generator fit on another model, targets, r or head shape is refused
  in one line, as is a missing `variant.generator`.
- Taxonomy `initialization`: the method decides where a LoRA starts (the paper's "meta" generation replaces training
  from a random init); the layers, their parameters and their training are LoRA's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from lorafactory.errors import ConfigError
from lorafactory.variants.base import VARIANTS, VariantConfig
from lorafactory.variants.lora import LoRA

LORA_SUFFIXES = (".lora_A", ".lora_B")
"""How a LoRA layer's tensors end in a state dict; every other key of an adapter state is the task head."""


@dataclass
class ICMLoRAConfig(VariantConfig):
    generator: str | None = None
    """The generator file `python -m lorafactory.icm fit <runs> --out <file>` wrote; required to initialise."""
    sample_seed: int = 0
    """Seed of the latent draw z ~ N(0, I) the adapter is decoded from (the official code draws it unseeded)."""


@VARIANTS.register("icm_lora", config=ICMLoRAConfig)
class ICMLoRA(LoRA):
    name = "icm_lora"
    paper = "In-Context Meta LoRA Generation (Shao et al., IJCAI 2025, arXiv 2501.17635)"
    taxonomy = "initialization"
    tags = ("generated", "meta")
    zero_init = False
    peft = None
    memory_note = "init only: the generator (CVAE) and one forward pass over k examples for the task vector"

    def __init__(self, cfg: ICMLoRAConfig):
        super().__init__(cfg)
        self._summary: dict[str, Any] = {}

    def init_from_data(self, model: nn.Module, batches: Iterable[dict[str, Tensor]], loss_fn: Any) -> None:
        if not self.cfg.generator:
            raise ConfigError(
                "variant.generator is not set: icm_lora generates its adapter with a generator fit on a sweep's "
                "adapters; run `python -m lorafactory.icm fit runs/<sweep> --out gen.pt`, then set "
                "variant.generator=gen.pt"
            )
        # Imported here: lorafactory.icm reads runs (export, results), which import this package while it registers.
        from lorafactory import icm

        generator = icm.Generator.load(self.cfg.generator)
        self._check_fits(model, generator)
        vector = icm.task_vector(model, batches, generator.examples)
        state = generator.generate(vector, self.cfg.sample_seed)
        ratio = generator.scaling / self.scaling
        state = {k: v * ratio if k.endswith(".lora_B") else v for k, v in state.items()}
        model.load_state_dict(state, strict=False)
        self._summary = {
            "generator": self.cfg.generator,
            "generator_tasks": list(generator.tasks),
            "statistics_of": generator.tasks[generator.nearest(vector)],
            "generated_head": bool(generator.head_keys),
        }

    def _check_fits(self, model: nn.Module, generator: Any) -> None:
        """Refuse, in one line, a generator whose adapters do not have this model's keys and shapes."""
        own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        theirs = dict(zip(generator.keys, generator.shapes, strict=True))
        adapter = {k for k in own if k.endswith(LORA_SUFFIXES)}
        wrong = sorted(adapter ^ {k for k in theirs if k.endswith(LORA_SUFFIXES)})
        wrong += sorted(k for k, shape in theirs.items() if own.get(k) != shape and k not in wrong)
        if wrong:
            key = wrong[0]
            raise ConfigError(
                f"variant.generator={self.cfg.generator} was fit on {generator.variant} adapters of {generator.model} "
                f"(r={generator.r}) that do not fit this model: '{key}' is {theirs.get(key, 'absent')} there and "
                f"{own.get(key, 'absent')} here; fit a generator on runs of this model, targets, r and head"
            )

    def summary(self, model: nn.Module) -> dict[str, Any]:
        return dict(self._summary)
