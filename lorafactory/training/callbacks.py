"""Callbacks: `VariantHooks` bridges Lightning's hooks to the variant's; `RunStats` measures what a run costs;
`DivergenceGuard` stops a run whose loss ran away; `SignalCheckpoint` turns SIGTERM / SIGUSR1 into a checkpoint and
an `interrupted` record."""

from __future__ import annotations

import math
import os
import resource
import signal
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lorafactory.errors import Diverged
from lorafactory.variants.base import Variant, count_trainable


class VariantHooks(L.Callback):
    """Calls every variant hook at its place in the loop; the loop itself never asks which variant it runs."""

    def __init__(
        self, variant: Variant, init_batches: Callable[[], Iterable[dict[str, torch.Tensor]]], resuming: bool = False
    ):
        self.variant = variant
        self.init_batches = init_batches
        self.resuming = resuming

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Before configure_optimizers, so an initialisation may still change which parameters exist. A resumed run
        # gets its state from the checkpoint instead.
        self._model = pl_module.model
        if stage == "fit" and not self.resuming:
            self.variant.init_from_data(
                pl_module.model, self.init_batches(), lambda model, batch: pl_module(batch).loss
            )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.variant.on_train_start(pl_module.model, int(trainer.estimated_stepping_batches))

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.variant.on_after_backward(pl_module.model)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self.variant.on_before_optimizer_step(pl_module.model, optimizer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.variant.on_train_batch_end(pl_module.model, trainer.global_step):
            pl_module.rebuild_optimizer()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.variant.on_train_end(pl_module.model)

    # The variant's own progress (phase, counters) travels in Lightning's checkpoints as this callback's state.
    def state_dict(self) -> dict[str, Any]:
        return {"variant": self.variant.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores the model, then the callbacks, then builds the optimizer: the variant can still decide
        # which parameters train before the optimizer sees them.
        self.variant.load_state_dict(state_dict.get("variant", {}), self._model)


def current_rss_mb() -> float:
    """Resident memory of this process now (Linux /proc), falling back to the lifetime peak elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class SavedActivations:
    """Bytes of the tensors autograd keeps for the backward pass while active (unique storages, the model's own
    parameters and buffers excluded): the activation memory a method costs, independent of the allocator."""

    def __init__(self, model: torch.nn.Module):
        self.exclude = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
        self.storages: dict[int, int] = {}
        self._context: Any = None

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.exclude:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    def __enter__(self) -> SavedActivations:
        self._context = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._context.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._context.__exit__(*exc)

    @property
    def mb(self) -> float:
        return sum(self.storages.values()) / 2**20


class RunStats(L.Callback):
    """What the training loop costs, summed over every attempt of a resumed run: median step time, throughput, wall
    time, and memory two ways — the activations saved for backward plus the trained state (parameters, gradients,
    optimizer state), measured on the first step, which compare methods; and the process's peak RSS."""

    def __init__(self, variant: Variant, attempt_start: float | None = None) -> None:
        self.variant = variant
        self.adapter_params_start: int | None = None
        self.step_times: list[float] = []
        self.samples = 0
        self.peak_mb = 0.0
        self.activation_mb: float | None = None
        self.train_state_mb: float | None = None
        self.earlier_wall_s = 0.0
        """Wall time of earlier attempts, up to the checkpoint this attempt resumed from."""
        self.resumed = 0
        self._t0 = 0.0
        self._attempt_start = time.perf_counter() if attempt_start is None else attempt_start
        self._activations: SavedActivations | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.adapter_params_start is None:
            self.adapter_params_start = count_trainable(self.variant.trained_parameters(pl_module.model))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, *args: Any) -> None:
        if self.activation_mb is None and self._activations is None:
            self._activations = SavedActivations(pl_module.model).__enter__()
        self._t0 = time.perf_counter()

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        if self._activations is not None:  # the forward is done: everything backward needs is saved
            self._activations.__exit__(None, None, None)
            self.activation_mb = self._activations.mb
            self._activations = None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, *args: Any
    ) -> None:
        self.step_times.append(time.perf_counter() - self._t0)
        self.samples += len(batch["labels"]) * trainer.world_size  # every rank's share of the batch
        if self.train_state_mb is None:
            self.train_state_mb = train_state_bytes(pl_module.model, trainer.optimizers[0]) / 2**20
        if torch.cuda.is_available():
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            # Sampled per step: the process may be a pooled worker whose lifetime peak belongs to earlier runs.
            self.peak_mb = max(self.peak_mb, current_rss_mb())

    def state_dict(self) -> dict[str, Any]:
        return {
            "adapter_params_start": self.adapter_params_start,
            "step_times": self.step_times,
            "samples": self.samples,
            "peak_mb": self.peak_mb,
            "activation_mb": self.activation_mb,
            "train_state_mb": self.train_state_mb,
            "wall_s": self.wall_s,
            "resumed": self.resumed,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.adapter_params_start = state_dict["adapter_params_start"]
        self.step_times = list(state_dict["step_times"])
        self.samples = state_dict["samples"]
        self.peak_mb = state_dict["peak_mb"]
        self.activation_mb = state_dict["activation_mb"]
        self.train_state_mb = state_dict["train_state_mb"]
        self.earlier_wall_s = state_dict["wall_s"]
        self.resumed = state_dict["resumed"] + 1

    @property
    def wall_s(self) -> float:
        return self.earlier_wall_s + time.perf_counter() - self._attempt_start

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"adapter_params_start": self.adapter_params_start, "resumed": self.resumed}
        if not self.step_times:
            return out
        return {
            **out,
            "step_time_s": statistics.median(self.step_times),
            "throughput": self.samples / sum(self.step_times),
            "peak_memory_mb": round(self.peak_mb, 1),
            "memory_kind": "cuda" if torch.cuda.is_available() else "rss",
            "activation_mb": None if self.activation_mb is None else round(self.activation_mb, 2),
            "train_state_mb": None if self.train_state_mb is None else round(self.train_state_mb, 3),
        }


def train_state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of what training keeps besides activations: trainable parameters, their gradients, optimizer state."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = sum(p.numel() * p.element_size() * 2 for p in params)  # the parameter and its gradient
    for state in optimizer.state.values():
        total += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v) and v.dim() > 0)
    return total


class DataProgress(L.Callback):
    """Where training is in its data, and the random state, in every checkpoint, so that a resumed run continues with
    the batch the uninterrupted run would have taken next and the same dropout masks. Listed before the checkpointing
    callbacks, so the position they save counts the step just taken."""

    def __init__(self, loader: Any):
        self.loader = loader
        self.epoch = 0
        self.batches_done = 0
        self._rng: dict[str, Any] | None = None
        self._before_fit = _rng_state()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.world_size > 1:
            # Lightning's DDP seeds every rank again as it connects them: the run goes on from the random state it had
            # (a data-driven initialisation and the dropout masks then draw what one process would have drawn).
            torch.set_rng_state(self._before_fit["torch"])
            if self._before_fit["cuda"] is not None:
                torch.cuda.set_rng_state_all(self._before_fit["cuda"])

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.epoch, self.batches_done = trainer.current_epoch, args[-1] + 1  # args: outputs, batch, batch_idx

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if self._rng is not None:  # as late as possible: nothing between here and the forward draws random numbers
            torch.set_rng_state(self._rng["torch"])
            if torch.cuda.is_available() and self._rng.get("cuda") is not None:
                torch.cuda.set_rng_state_all(self._rng["cuda"])
            self._rng = None

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches_done": self.batches_done, **_rng_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epoch, self.batches_done = state_dict["epoch"], state_dict["batches_done"]
        self.loader.resume(self.epoch, self.batches_done)
        self._rng = {"torch": state_dict["torch"], "cuda": state_dict.get("cuda")}


def _rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


class DivergenceGuard(L.Callback):
    """Records a run whose loss ran away as `diverged` instead of `ok` with a terrible score: the mean training loss
    over the last `window` steps above `factor` × the mean of the first `reference_steps` steps, or a validation loss
    above `eval_factor` × that reference (NaN/inf losses are caught in the training step itself)."""

    def __init__(self, factor: float = 3.0, window: int = 50, reference_steps: int = 1, eval_factor: float = 10.0):
        self.factor = factor
        self.window = window
        self.reference_steps = reference_steps
        self.eval_factor = eval_factor
        self.first: list[float] = []
        self.recent: deque[float] = deque(maxlen=window)

    @property
    def reference(self) -> float | None:
        return statistics.fmean(self.first) if len(self.first) >= self.reference_steps else None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *args: Any) -> None:
        # The loss over every rank's share of the batch (`AdapterModule.training_step`): the ranks decide alike.
        if isinstance(outputs, dict):
            loss = float(outputs.get("mean_loss", outputs["loss"]))
        else:
            loss = float(outputs)
        if len(self.first) < self.reference_steps:
            self.first.append(loss)
        self.recent.append(loss)
        reference = self.reference
        if reference is not None and len(self.recent) == self.window:
            mean = statistics.fmean(self.recent)
            if mean > self.factor * reference:
                raise Diverged(
                    f"training loss ran away: mean {mean:.4g} over the last {self.window} steps is more than "
                    f"{self.factor:g}× its first {self.reference_steps} steps' mean {reference:.4g} (step "
                    f"{trainer.global_step}; trainer.divergence.* sets the rule)"
                )

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        history = getattr(pl_module, "history", None)
        reference = self.reference
        if not history or reference is None or trainer.sanity_checking:
            return
        loss = history[-1].get("loss", math.nan)
        if not math.isfinite(loss) or loss > self.eval_factor * reference:
            raise Diverged(
                f"validation loss exploded: {loss:.4g} at step {trainer.global_step}, more than "
                f"{self.eval_factor:g}× the first training steps' mean {reference:.4g} "
                "(trainer.divergence.eval_factor)"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"first": self.first, "recent": list(self.recent)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.first = list(state_dict["first"])
        self.recent = deque(state_dict["recent"], maxlen=self.window)


class Interrupted(Exception):
    """Training stopped on a signal (SIGTERM: scancel, preemption, `timeout`; SIGUSR1: SLURM's warning before a time
    limit), after saving a checkpoint to resume from."""

    def __init__(self, signum: int, checkpoint: Path | None, finished: bool = False):
        self.signum = signum
        self.checkpoint = checkpoint
        self.finished = finished
        """The signal came after training: the run finished and is recorded `ok`; only what came next is stopped."""
        name = signal.Signals(signum).name
        if finished:
            super().__init__(f"interrupted by {name} after the run had finished training (recorded ok); stopping")
            return
        where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint"
        super().__init__(f"interrupted by {name} ({where}); launch again to resume")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __reduce__(self) -> tuple[Any, ...]:  # a rank hands it to the process that launched it (`spawn_ranks`)
        return type(self), (self.signum, self.checkpoint, self.finished)


class SignalCheckpoint(L.Callback):
    """On SIGTERM or SIGUSR1, finish the current step (or validation), save `path`, and raise `Interrupted`.

    Lightning's own SIGTERM handling raises `SystemExit(0)` between epochs or in the middle of validation, which
    looks like success to schedulers; this callback takes SIGTERM over: it lets validation end, saves a checkpoint at
    the next step boundary, and the recipe records the run as `interrupted`.

    With several ranks, a signal to any of them stops all of them at the same step boundary: they agree on it after
    every step (one small all-reduce), save the checkpoint together and raise together. Lightning's handler is not
    installed then: it broadcasts from inside the handler, a collective at an arbitrary point of rank 0 that the
    other ranks do not match."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, path: Path):
        self.path = path
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> SignalCheckpoint:
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = self.signum or signum

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.world_size > 1:  # before the trainer registers its handlers (see the class docstring)
            trainer._signal_connector.register_signal_handlers = lambda: None

    def _agreed(self, trainer: L.Trainer) -> int | None:
        """The signal to stop on, the same on every rank (the largest number any rank received)."""
        if trainer.world_size == 1:
            return self.signum
        flag = torch.tensor(float(self.signum or 0), device=trainer.strategy.root_device)
        self.signum = int(trainer.strategy.reduce(flag, reduce_op="max")) or None
        return self.signum

    def on_validation_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self.signum is not None:
            # Lightning would raise SystemExit before the next validation batch; validation is short, let it end and
            # stop at the next step boundary, where a checkpoint resumes exactly.
            trainer._signal_connector.received_sigterm = False

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self._agreed(trainer) is not None:
            trainer._signal_connector.received_sigterm = False
            trainer.save_checkpoint(self.path)
            raise Interrupted(self.signum, self.path)

    def on_validation_end(self, trainer: L.Trainer, *args: Any) -> None:
        # A signal after the last validation batch's hook: Lightning would raise SystemExit (exit 0) at epoch end.
        if self.signum is not None:
            trainer._signal_connector.received_sigterm = False

    def on_train_epoch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self.signum is not None:
            trainer._signal_connector.received_sigterm = False
