"""ICM-LoRA's generator: a conditional VAE that produces a task's LoRA from its task vector, learnt from the adapters a
sweep saved. `variant=icm_lora` (lorafactory/variants/icm_lora.py) loads what this module fits.

    python -m lorafactory -m variant=lora task=glue/sst2,glue/mrpc,glue/rte optim.lr_scale=0.5,1,2   # 1. adapters
    python -m lorafactory.icm fit runs/default --out generators/minilm.pt          # 2.-3. task vectors, the CVAE
    python -m lorafactory variant=icm_lora variant.generator=generators/minilm.pt task=glue/cola   # 4. generate

Paper: "In-Context Meta LoRA Generation" (Shao et al., IJCAI 2025, arXiv 2501.17635); official code
YihuaJerry/ICM-LoRA, read at commit 0b0057c. The pipeline and where each step comes from:

1. Training data (official `train_lora/train_lora_arg.py`: one LoRA run per task and rank, the checkpoints of epochs
   101-200 kept): here every finished run (`result.json` status ok) of `--variant` under the given folders with an
   `adapter.pt`, each run one sample, of one seed (`--runs-seed`, default the lowest found). A sweep's final adapters
   at several learning rates stand in for the paper's checkpoints along one run. One seed, because a LoRA's A starts
   from its run seed's random draw and B is learnt against that A: runs of one seed share the draw across tasks and
   learning rates (when their models are built alike), as one run's checkpoints do, while runs of other seeds are
   other points in parameter space for the same task, which a CVAE conditioned on the task alone blends (measured on
   tiny-bert, two toy tasks: the generated adapter's loss on its task was 0.29-0.30 from three learning rates of one
   seed, whose trained adapters average 0.27, and 0.39-0.43 from three seeds, the base model being at 0.69). The
   state must be LoRA-shaped (`<layer>.lora_A`, `<layer>.lora_B`, plus the trained head), with the same keys and
   shapes in every run.
2. Task vector (official `ICL/last_time_step_icl.py`: a forward hook on the last decoder layer of Florence-2 keeps
   `output[0][:, -1, :]`, averaged over 30 training examples): `task_vector` averages, over `examples` training
   examples of the task taken through the framework's own data code (`TaskData.init_batches`, the stream a run's
   `init_from_data` gets), the features the task head reads. For a decoder the head reads every position and we take
   the last non-padding token's: the last layer's hidden state at the last time step, as the official code does (HF
   hands the head the final-normed state). An encoder (BERT, ViT) or a conv net has no "last time step": the
   official choice is the position the prediction is read from, and for these that is the summary the head reads
   ([CLS] through BERT's pooler, ViT's [CLS], the conv net's pooled features), so we take the head's input there
   too. Two deviations: the official code runs the task's own fine-tuned LoRA model (line 66-71) and hooks during
   beam-search generation; we run the frozen base model (the adapter of a new task does not exist yet: generating
   it is the point) with one teacher-forced forward pass, in eval mode.
3. Normalisation (official `utils/normalizeLoraWeight_small.py` lines 31-43): every tensor of every adapter is
   standardised by its own mean and (unbiased) standard deviation and the results concatenated in key order; the
   per-tensor (mean, std) are kept. De-normalisation (official `utils/ReconstructLora_cvae.py` lines 126-165) uses the
   statistics of one reference adapter of the target task; a new task has none, so each training task keeps its
   adapters' average statistics and a generated adapter takes those of the training task whose vector is nearest
   (Euclidean): its own for a task seen in training, as officially. The trained task head is part of the vector when
   every run's head has the same keys and shapes (GLUE's 2-label tasks): the generated model then needs no training
   at all; otherwise only the adapter is generated (and said so).
4. CVAE (official `model/CVAE_design.py`): a Conv1d encoder of stride-2 blocks (kernel 7, BatchNorm, LeakyReLU) over
   the zero-padded flat vector, a linear map to the latent, `mu` and `log σ²` from [latent ‖ condition]; a decoder
   from [z ‖ condition] through a linear map and stride-2 ConvTranspose1d blocks (BatchNorm, ELU); loss
   `MSE(recon, x) + 0.005·KL` (`kld_weight`, line 6). Generation draws z ~ N(0, I) and decodes it with the task's
   condition in eval mode (official `ReconstructLora_cvae.py` lines 64, 88-91); here z comes from a seeded generator.
   Sized for a CPU: the official net runs twelve blocks (8-256 channels) at full resolution; on one core a stride-2
   kernel-7 convolution over a 75k-long vector alone takes 0.24 s per 40-sample pass and the whole official-shaped net
   1.3-2 s per step. So the first block is a patch convolution (kernel = stride = `patch`, 128), then `channels` has
   the official stride-2 blocks at 1/128 of the length; and the decoder's last layer gives each output position its
   own weights on the C channel features there (a locally connected layer, `length × C` weights): the decoder must
   reproduce position-specific values (a LoRA's A is random per position), which a shared-weight transposed
   convolution cannot (measured: two random 75k prototypes stayed at 0.83 of their variance after 100 steps; with
   the local layer the reconstruction reaches the noise floor in 150). 40 samples of 73,728 values (MiniLM's attn LoRA
   at r = 8) fit in 25 s on one core with the defaults (300 epochs). After the fit, BatchNorm's running statistics
   are recomputed over the training set (`_recalibrate`).
   Conditions are centred on the training tasks' mean and divided by their spread (one scalar): the official code
   feeds the raw hidden state, whose component common to all tasks can dwarf their differences (tiny-bert's two toy
   tasks: vectors of norm 0.44 that differ by 0.14).
5. The file: the CVAE's weights and sizes, the key layout and shapes, the normalisation statistics, the base model's
   name, r and the source variant's scale s (so a generated B is rescaled to the loading variant's own s), the
   training tasks' names and vectors, `examples`, and the fit's loss curve.

Scale, honestly: the paper learns from 100 checkpoints of one run per task (the released scripts even train one CVAE
per task with a constant condition: `TrainScript_CVAE.py` loads a single task vector for every sample); here from a
sweep's final adapters, a few per task. With a handful of tasks the CVAE mostly memorises each task's adapters and
interpolates between their conditions: a task seen in training gets about its trained adapters' quality, a new task
a mixture of its neighbours'. tests/variants/test_icm_lora.py checks the former (and that another task's generated
adapter does worse); whether new tasks gain over a plain LoRA start needs a study with many tasks.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor, nn

from lorafactory.errors import UserError
from lorafactory.export import ADAPTER_NAME, build_base
from lorafactory.results.aggregate import load_runs
from lorafactory.results.record import RunRecord, read_record
from lorafactory.targets import HEAD_NAMES
from lorafactory.tasks import get_task
from lorafactory.tasks.data import resolve_data_dir
from lorafactory.training.data import TaskData
from lorafactory.variants.base import build_variant
from lorafactory.variants.icm_lora import LORA_SUFFIXES

log = logging.getLogger("lorafactory")
FORMAT = "lorafactory.icm/1"


# --- task vectors ----------------------------------------------------------------------------------------------------


def task_head(model: nn.Module) -> nn.Module:
    """The task head: the outermost module named like one (`classifier`, `score`, `lm_head`)."""
    heads = [(n, m) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in HEAD_NAMES]
    outer = [(n, m) for n, m in heads if not any(n.startswith(o + ".") for o, _ in heads)]
    if len(outer) != 1:
        found = ", ".join(n for n, _ in outer) or "none"
        raise UserError(
            f"ICM-LoRA reads a task vector at the input of the model's task head (a module named one of "
            f"{', '.join(HEAD_NAMES)}); {type(model).__name__} has {found}"
        )
    return outer[0][1]


@torch.no_grad()
def task_vector(model: nn.Module, batches: Iterable[dict[str, Tensor]], examples: int) -> Tensor:
    """The mean over the first `examples` examples of `batches` of the features the task head reads, in eval mode: at
    the last non-padding token where the head reads every position (decoders), else the one vector it reads."""
    head = task_head(model)
    inputs = set(inspect.signature(model.forward).parameters) - {"labels"}
    seen: list[Tensor] = []
    handle = head.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    was_training = model.training
    model.eval()
    rows: list[Tensor] = []
    count = 0
    try:
        for batch in batches:
            seen.clear()
            model(**{k: v for k, v in batch.items() if k in inputs})
            features = seen[0].float()
            if features.dim() == 3:  # (batch, positions, features): the last position that is not padding
                mask = batch.get("attention_mask")
                if mask is None:
                    last = torch.full((len(features),), features.shape[1] - 1)
                else:
                    positions = torch.arange(mask.shape[1], device=mask.device)
                    last = (mask.bool() * (positions + 1)).argmax(dim=1)  # right or left padding alike
                features = features[torch.arange(len(features)), last]
            rows.append(features.reshape(len(features), -1).cpu())
            count += len(features)
            if count >= examples:
                break
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(rows)[:examples].mean(dim=0)


# --- flat vectors ----------------------------------------------------------------------------------------------------


def normalise(state: dict[str, Tensor], keys: Sequence[str]) -> tuple[Tensor, Tensor]:
    """`state`'s tensors in `keys` order, each standardised by its own mean and std, as one flat vector; and their
    (mean, std) as a (len(keys), 2) tensor. A constant tensor (std 0) is divided by 1."""
    parts, stats = [], []
    for key in keys:
        value = state[key].detach().double().flatten()
        mean = value.mean()
        std = value.std() if value.numel() > 1 else value.new_tensor(0.0)
        std = torch.where(std > 0, std, torch.ones_like(std))
        parts.append((value - mean) / std)
        stats.append(torch.stack([mean, std]))
    return torch.cat(parts).float(), torch.stack(stats).float()


def denormalise(
    flat: Tensor, stats: Tensor, keys: Sequence[str], shapes: Sequence[Sequence[int]]
) -> dict[str, Tensor]:
    """The inverse of `normalise`: a state dict from a flat normalised vector and per-tensor (mean, std)."""
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    parts = torch.split(flat[: sum(sizes)].double(), sizes)
    return {
        key: (part * stats[i, 1].double() + stats[i, 0].double()).float().reshape(shapes[i])
        for i, (key, part) in enumerate(zip(keys, parts, strict=True))
    }


# --- the CVAE --------------------------------------------------------------------------------------------------------


@dataclass
class CVAEConfig:
    length: int
    """Length of the flat parameter vector."""
    condition_dim: int
    """Length of the task vector."""
    latent_dim: int = 64
    channels: tuple[int, ...] = (16, 16, 16)
    """Channels of the patch block and of each stride-2 block after it."""
    patch: int = 128
    kernel_size: int = 7
    kld_weight: float = 0.005


class CVAE(nn.Module):
    """The official CVAE's shape at patch resolution, with a locally connected output layer (module docstring)."""

    def __init__(self, cfg: CVAEConfig):
        super().__init__()
        self.cfg = cfg
        ch, k, patch = list(cfg.channels), cfg.kernel_size, cfg.patch
        multiple = patch * 2 ** (len(ch) - 1)
        self.padded = -(-cfg.length // multiple) * multiple
        self.last = self.padded // multiple
        blocks = [nn.Conv1d(1, ch[0], patch, patch), nn.BatchNorm1d(ch[0]), nn.LeakyReLU()]
        for c_in, c_out in zip(ch[:-1], ch[1:], strict=True):
            blocks += [nn.Conv1d(c_in, c_out, k, 2, k // 2), nn.BatchNorm1d(c_out), nn.LeakyReLU()]
        self.encoder = nn.Sequential(*blocks)
        self.to_latent = nn.Linear(self.last * ch[-1], cfg.latent_dim)
        self.fc_mu = nn.Linear(cfg.latent_dim + cfg.condition_dim, cfg.latent_dim)
        self.fc_var = nn.Linear(cfg.latent_dim + cfg.condition_dim, cfg.latent_dim)
        self.to_decode = nn.Linear(cfg.latent_dim + cfg.condition_dim, self.last * ch[-1])
        blocks = []
        for c_in, c_out in zip(ch[:0:-1], ch[-2::-1], strict=True):
            blocks += [
                nn.ConvTranspose1d(c_in, c_out, k, 2, k // 2, output_padding=1),
                nn.BatchNorm1d(c_out),
                nn.ELU(),
            ]
        self.decoder = nn.Sequential(*blocks)
        positions = self.padded // patch
        self.out_weight = nn.Parameter(torch.randn(positions, ch[0], patch) / ch[0] ** 0.5)
        self.out_bias = nn.Parameter(torch.zeros(positions, patch))

    def encode(self, x: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        h = self.encoder(F.pad(x, (0, self.padded - x.shape[-1]))[:, None])
        h = torch.cat([self.to_latent(h.flatten(1)), c], dim=-1)
        return self.fc_mu(h), self.fc_var(h)

    def decode(self, z: Tensor, c: Tensor) -> Tensor:
        h = self.to_decode(torch.cat([z, c], dim=-1)).view(len(z), self.cfg.channels[-1], self.last)
        h = self.decoder(h)  # (batch, channels[0], positions)
        out = torch.einsum("ncp,pck->npk", h, self.out_weight) + self.out_bias
        return out.flatten(1)[:, : self.cfg.length]

    def loss(self, x: Tensor, c: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """MSE(reconstruction, x) + kld_weight · KL of a batch, z drawn by the reparameterisation."""
        mu, log_var = self.encode(x, c)
        noise = torch.randn(mu.shape, generator=generator, dtype=mu.dtype)
        recon = self.decode(mu + noise * torch.exp(0.5 * log_var), c)
        kld = torch.mean(-0.5 * torch.sum(1 + log_var - mu**2 - log_var.exp(), dim=1))
        return F.mse_loss(recon, x) + self.cfg.kld_weight * kld


# --- the generator file ----------------------------------------------------------------------------------------------


@dataclass
class Generator:
    """A fitted CVAE and everything needed to turn a task vector into an adapter state (`generate`)."""

    cvae: CVAE
    keys: list[str]
    shapes: list[tuple[int, ...]]
    head_keys: list[str]
    """The keys that are the trained task head (empty when the training runs' heads differed)."""
    stats: Tensor
    """(tasks, keys, 2): each training task's average per-tensor (mean, std)."""
    tasks: list[str]
    vectors: Tensor
    """(tasks, condition_dim): the training tasks' vectors."""
    model: str
    r: int
    scaling: float
    """The source adapters' s (LoRA: alpha / r): a generated B is rescaled to the loading variant's s."""
    variant: str
    examples: int
    losses: list[float] = field(default_factory=list)

    def condition(self, vector: Tensor) -> Tensor:
        centre = self.vectors.mean(dim=0)
        spread = (self.vectors - centre).std() if len(self.vectors) > 1 else torch.tensor(0.0)
        return (vector.float() - centre) / (spread if spread > 0 else 1.0)

    @torch.no_grad()
    def generate(self, vector: Tensor, seed: int = 0) -> dict[str, Tensor]:
        """The adapter state (and head, when the generator has it) for a task with this vector; z ~ N(0, I) from
        `seed`, de-normalised with the statistics of the nearest training task."""
        if vector.shape != self.vectors.shape[1:]:
            raise UserError(
                f"the task vector has {vector.numel()} values, the generator's {self.vectors.shape[1]}: it was fit "
                f"on runs of {self.model}"
            )
        self.cvae.eval()
        z = torch.randn(1, self.cvae.cfg.latent_dim, generator=torch.Generator().manual_seed(seed))
        flat = self.cvae.decode(z, self.condition(vector)[None])[0]
        return denormalise(flat, self.stats[self.nearest(vector)], self.keys, self.shapes)

    def nearest(self, vector: Tensor) -> int:
        """The training task whose vector is nearest (Euclidean): whose normalisation statistics a generated adapter
        takes."""
        return int(torch.cdist(vector.float()[None], self.vectors)[0].argmin())

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "cvae"}
        data |= {"format": FORMAT, "cvae_config": asdict(self.cvae.cfg), "cvae_state": self.cvae.state_dict()}
        torch.save(data, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Generator:
        path = Path(path)
        if not path.is_file():
            raise UserError(
                f"no generator file at {path}: fit one with `python -m lorafactory.icm fit <runs> --out {path}`"
            )
        data = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise UserError(f"{path} is not an ICM-LoRA generator (written by `python -m lorafactory.icm fit`)")
        cfg = data.pop("cvae_config")
        cvae = CVAE(CVAEConfig(**{**cfg, "channels": tuple(cfg["channels"])}))
        cvae.load_state_dict(data.pop("cvae_state"))
        data.pop("format")
        data["shapes"] = [tuple(s) for s in data["shapes"]]
        return cls(cvae=cvae.eval(), **data)


def fit(
    states: Sequence[dict[str, Tensor]],
    tasks: Sequence[str],
    vectors: dict[str, Tensor],
    *,
    model: str,
    r: int,
    scaling: float,
    variant: str = "lora",
    examples: int = 16,
    epochs: int = 300,
    lr: float = 3e-3,
    batch_size: int = 64,
    seed: int = 0,
    **cvae: Any,
) -> Generator:
    """Fit a generator on adapter states (`states[i]` trained on task `tasks[i]`, whose vector is `vectors[task]`).
    Every state has the same keys and shapes; the keys not ending in `.lora_A`/`.lora_B` are the head."""
    keys = sorted(states[0])
    head_keys = [k for k in keys if not k.endswith(LORA_SUFFIXES)]
    shapes = [tuple(states[0][k].shape) for k in keys]
    flats, stats = zip(*(normalise(s, keys) for s in states), strict=True)
    x = torch.stack(flats)
    names = sorted(set(tasks))
    task_stats = torch.stack(
        [torch.stack([s for s, t in zip(stats, tasks, strict=True) if t == n]).mean(0) for n in names]
    )
    with torch.random.fork_rng():  # seeded init without touching the caller's random state
        torch.manual_seed(seed)
        net = CVAE(CVAEConfig(length=x.shape[1], condition_dim=vectors[names[0]].numel(), **cvae))
    generator = Generator(
        net,
        keys,
        shapes,
        head_keys,
        task_stats,
        names,
        torch.stack([vectors[n].float() for n in names]),
        model,
        r,
        scaling,
        variant,
        examples,
    )
    c = torch.stack([generator.condition(vectors[t]) for t in tasks])
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    draws = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=draws)
        total = 0.0
        for start in range(0, len(x), batch_size):
            batch = order[start : start + batch_size]
            loss = net.loss(x[batch], c[batch], draws)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        schedule.step()
        generator.losses.append(total / len(x))
    _recalibrate(net, x, c, batch_size, draws)
    return generator


@torch.no_grad()
def _recalibrate(net: CVAE, x: Tensor, c: Tensor, batch_size: int, draws: torch.Generator) -> None:
    """Set every BatchNorm's running statistics to the training set's under the final weights (a cumulative average
    over one pass), and leave the net in eval mode. The running averages trail the weights by ~10 steps: measured on
    tiny-bert adapters, they made the eval-mode reconstruction ten times worse than the train-mode one."""
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm1d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    net.train()
    for start in range(0, len(x), batch_size):
        net.loss(x[start : start + batch_size], c[start : start + batch_size], draws)
    for norm in norms:
        norm.momentum = 0.1
    net.eval()


# --- from a sweep's runs ---------------------------------------------------------------------------------------------


@dataclass
class SavedRun:
    path: Path
    record: RunRecord
    state: dict[str, Tensor]


def collect_runs(folders: Sequence[str | Path], variant: str = "lora", seed: int | None = None) -> list[SavedRun]:
    """Every finished run of `variant` and `seed` (default: the lowest seed found) under `folders` (run folders or
    folders above them), with its adapter state; a mistake (nothing found, a run without adapter.pt, mixed models,
    other shapes) is a one-line UserError."""
    runs: list[SavedRun] = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise UserError(f"no such folder: {folder}")
        ok = load_runs(folder).ok
        for path in sorted(set(ok["path"])):
            record = read_record(path)
            if record.variant != variant:
                continue
            adapter = Path(path) / ADAPTER_NAME
            if not adapter.is_file():
                raise UserError(
                    f"{path} has no {ADAPTER_NAME}: the run was launched with save_adapter=false; relaunch it with "
                    "save_adapter=true or leave its folder out"
                )
            runs.append(SavedRun(Path(path), record, torch.load(adapter, map_location="cpu", weights_only=True)))
    if not runs:
        raise UserError(
            f"no finished variant={variant} runs with {ADAPTER_NAME} under {', '.join(map(str, folders))}; "
            "ICM-LoRA learns from the adapters a sweep saved (--variant picks which variant's)"
        )
    seed = min(r.record.seed for r in runs) if seed is None else seed
    kept = [r for r in runs if r.record.seed == seed]
    if not kept:
        raise UserError(
            f"no finished variant={variant} runs of seed {seed}; seeds found: {sorted({r.record.seed for r in runs})}"
        )
    if len(kept) < len(runs):
        log.warning(
            "learning from the %d runs of seed %d; %d runs of other seeds left out",
            len(kept),
            seed,
            len(runs) - len(kept),
        )
    runs = kept
    first = runs[0]
    layout = _lora_layout(first)
    for run in runs[1:]:
        if run.record.model != first.record.model:
            raise UserError(
                f"runs of different models: {run.path} is {run.record.model}, {first.path} is {first.record.model}; "
                "a generator is fit on one model's adapters"
            )
        if _lora_layout(run) != layout:
            raise UserError(
                f"{run.path} has other adapter keys or shapes than {first.path} (another r or targets): a generator "
                "is fit on adapters of one shape; leave the odd runs' folders out"
            )
    return runs


def _lora_layout(run: SavedRun) -> dict[str, tuple[int, ...]]:
    layout = {k: tuple(v.shape) for k, v in run.state.items() if k.endswith(LORA_SUFFIXES)}
    layers = {k.rsplit(".", 1)[0] + "." for k in layout}
    others = [k for k in run.state if k not in layout]  # the head, unless a layer holds more than A and B
    if not layout or any(k.startswith(tuple(layers)) or k.startswith("lf_shared.") for k in others):
        raise UserError(
            f"{run.path}: variant={run.record.variant} saved no plain LoRA state (lora_A, lora_B on an unchanged "
            "base); ICM-LoRA generates LoRA adapters: fit it on lora runs (--variant)"
        )
    return layout


def fit_runs(
    folders: Sequence[str | Path],
    variant: str = "lora",
    examples: int = 16,
    runs_seed: int | None = None,
    **fit_args: Any,
) -> tuple[Generator, list[SavedRun]]:
    """Steps 1-3 of the pipeline on a sweep's runs: collect them, compute a vector per task with the frozen base
    model, fit the CVAE."""
    runs = collect_runs(folders, variant, runs_seed)
    vectors: dict[str, Tensor] = {}
    for run in runs:
        if run.record.task not in vectors:
            vectors[run.record.task] = run_task_vector(run, examples)
    heads = {
        tuple((k, tuple(v.shape)) for k, v in sorted(r.state.items()) if not k.endswith(LORA_SUFFIXES)) for r in runs
    }
    states = [r.state for r in runs]
    if len(heads) > 1:
        log.warning("the runs' task heads differ in shape: the generator makes the adapter only (heads train)")
        states = [{k: v for k, v in s.items() if k.endswith(LORA_SUFFIXES)} for s in states]
    cfg = OmegaConf.create(runs[0].record.config)
    source = build_variant(cfg.variant)
    generator = fit(
        states,
        [r.record.task for r in runs],
        vectors,
        model=runs[0].record.model,
        r=int(cfg.variant.r),
        scaling=float(getattr(source, "scaling", cfg.variant.alpha / cfg.variant.r)),
        variant=variant,
        examples=examples,
        **fit_args,
    )
    return generator, runs


def run_task_vector(run: SavedRun, examples: int) -> Tensor:
    """The task vector of `run`'s task: its first `examples` examples of the stream a run's `init_from_data` gets,
    through the frozen base model the run started from."""
    cfg = OmegaConf.create(run.record.config)
    loaded = build_base(cfg)
    task = get_task(cfg.task)
    data = TaskData(
        task, loaded.tokenizer, cfg.task, Path(cfg.paths.cache_dir), resolve_data_dir(cfg.paths.data_dir), 0
    )
    return task_vector(loaded.module, data.init_batches(), examples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lorafactory.icm",
        description="ICM-LoRA: fit a generator of LoRA adapters (a conditional VAE on task vectors) on the adapters "
        "a sweep saved; `variant=icm_lora variant.generator=<file>` then generates a task's adapter from its vector.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    fit_cmd = commands.add_parser("fit", help="fit a generator on the adapter.pt of finished runs")
    fit_cmd.add_argument("folders", nargs="+", type=Path, help="run folders or sweep folders above them")
    fit_cmd.add_argument("--out", type=Path, required=True, help="the generator file to write (.pt)")
    fit_cmd.add_argument("--variant", default="lora", help="the variant whose runs to learn from (default: lora)")
    fit_cmd.add_argument("--examples", type=int, default=16, help="training examples per task vector (default: 16)")
    fit_cmd.add_argument("--epochs", type=int, default=300, help="CVAE training epochs (default: 300)")
    fit_cmd.add_argument(
        "--runs-seed", type=int, default=None, help="learn from the runs of this seed (default: the lowest found)"
    )
    fit_cmd.add_argument("--seed", type=int, default=0, help="seed of the CVAE's init and draws (default: 0)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    start = time.perf_counter()
    try:
        if args.examples < 1 or args.epochs < 1:
            raise UserError("--examples and --epochs must be >= 1")
        generator, runs = fit_runs(
            args.folders, args.variant, args.examples, args.runs_seed, epochs=args.epochs, seed=args.seed
        )
        generator.save(args.out)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    length = generator.cvae.cfg.length
    head = f"with the task head ({', '.join(generator.head_keys)})" if generator.head_keys else "adapter only"
    print(
        f"fit on {len(runs)} {args.variant} runs of {generator.model}, {len(generator.tasks)} tasks "
        f"({', '.join(generator.tasks)}): {length} values per adapter, {head}; CVAE loss "
        f"{generator.losses[0]:.4g} -> {generator.losses[-1]:.4g} in {time.perf_counter() - start:.1f} s"
    )
    print(f"generator written to {args.out}; use it with variant=icm_lora variant.generator={args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
