"""The recipe: build model, adapt it with the variant, train, evaluate, record. Read it top to bottom."""

from __future__ import annotations

import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from lorafactory.config import check_launch, settings_drift
from lorafactory.errors import ConfigError, Diverged, UserError
from lorafactory.models import MODELS, build_model, check_head_kind, model_modality, unfreeze
from lorafactory.quantize import parameter_count
from lorafactory.results.record import RECORD_NAME, RunRecord, read_record, write_record
from lorafactory.runlock import RunLock, RunningElsewhere, owner
from lorafactory.schema import validate
from lorafactory.slots import DeviceSlot, pin_to_cpu_share, slot_folder
from lorafactory.tasks import Evaluation, get_task
from lorafactory.tasks.data import resolve_data_dir
from lorafactory.training import distributed
from lorafactory.training.callbacks import (
    DataProgress,
    DivergenceGuard,
    Interrupted,
    RunStats,
    SignalCheckpoint,
    VariantHooks,
)
from lorafactory.training.data import TaskData
from lorafactory.training.evaluation import Evaluator
from lorafactory.training.loggers import keep_rows_up_to
from lorafactory.training.module import AdapterModule
from lorafactory.training.optim import build_optimizer
from lorafactory.variants.base import VARIANTS, adapter_parameters, adapter_state_dict, build_variant, count_trainable

log = logging.getLogger("lorafactory")
CHECKPOINT = Path("checkpoints") / "last.ckpt"
"""Where a run folder keeps the checkpoint a relaunch resumes from."""
RANK_TOLERANCE = 1e-4
"""Largest relative difference between the ranks' adapters at the end of a DDP run that is taken for round-off (GPU
kernels need not give the same bits twice); the CPU's ranks agree exactly."""


def run(cfg: DictConfig, run_dir: str | os.PathLike, overrides: list[str] | None = None) -> RunRecord | None:
    """Train and evaluate one configuration into `run_dir`, and write its `result.json`.

    The folder has one owner at a time (`RunLock`; a second launch raises `RunningElsewhere`). A folder that already
    holds an `ok` record is not trained again; one with a checkpoint resumes from it; a failed, diverged or interrupted
    record is kept aside (`result.<status>-<n>.json`) and the run goes on. A signal (SIGTERM, SIGUSR1) stops training
    at the next step boundary with a checkpoint and an `interrupted` record, and `Interrupted` is raised.

    A run on several devices (`training.distributed`) is owned by its launching process or its rank 0, which does all
    of the above; the other ranks train beside it and return None: they take no lock and write nothing."""
    run_dir = Path(run_dir)
    ranks = distributed.detect(cfg.trainer)
    if ranks.launch == "external":
        distributed.connect(ranks, cfg.trainer.accelerator)
    if ranks.rank != 0:
        return _follow(cfg, run_dir, ranks)
    try:
        with RunLock(run_dir):
            return _own(cfg, run_dir, overrides or [], ranks)
    except RunningElsewhere:
        distributed.agree(ranks, "elsewhere")  # the other ranks of the run give way as well
        raise


def _own(cfg: DictConfig, run_dir: Path, overrides: list[str], ranks: distributed.Ranks) -> RunRecord:
    previous = _previous_record(run_dir, cfg)
    if previous is not None and previous.status == "ok":
        log.info("Already done, skipping: %s", run_dir)
        distributed.agree(ranks, "done")
        return previous
    started, t0 = datetime.now(UTC), time.perf_counter()
    base = _identity(cfg, run_dir, overrides)
    stopped: BaseException | None = None
    late_signal: int | None = None
    try:
        check_launch(cfg, _multirun(), ranks)  # the other ranks check it too, and stop alike
        resume = _checkpoint(run_dir / CHECKPOINT, run_dir)
        distributed.agree(ranks, "train")
        with _device_slot(cfg) as device:
            if ranks.launch == "spawn":
                threads = distributed.threads_per_rank(cfg.get("threads"), ranks.world_size)
                args = (_resolved(cfg), run_dir, base, t0, resume)
                record, late_signal = distributed.spawn_ranks(ranks, cfg.trainer.accelerator, threads, _train, *args)
            else:
                record, late_signal = _train(ranks, cfg, run_dir, base, t0, resume, device)
    except Diverged as err:
        record = RunRecord(**base, status="diverged", error=str(err))
    except Interrupted as err:
        record, stopped = RunRecord(**base, status="interrupted", error=str(err)), err
    except Exception as err:  # recorded, so a sweep goes on; the CLI decides what the user sees
        detail = str(err) if isinstance(err, UserError) else "".join(traceback.format_exception_only(err)).strip()
        record, stopped = RunRecord(**base, status="failed", error=detail), err
    record.started_at, record.finished_at = started.isoformat(), datetime.now(UTC).isoformat()
    if record.wall_time_s is None:
        record.wall_time_s = time.perf_counter() - t0
    write_record(run_dir, record)
    if stopped is not None:
        raise stopped
    if late_signal is not None:  # training was over when it came: the run is done and recorded
        raise Interrupted(late_signal, None, finished=True)
    return record


def _follow(cfg: DictConfig, run_dir: Path, ranks: distributed.Ranks) -> None:
    """A rank other than 0 trains beside rank 0, which owns the folder; rank 0 records what becomes of the run."""
    check_launch(cfg, _multirun(), ranks)
    decision = distributed.agree(ranks)
    if decision == "done":
        return None
    if decision == "elsewhere":
        raise RunningElsewhere(run_dir, owner(run_dir))
    checkpoint = run_dir / CHECKPOINT  # rank 0 has set an unreadable one aside already
    try:
        _train(ranks, cfg, run_dir, {}, time.perf_counter(), checkpoint if checkpoint.is_file() else None)
    except Diverged:  # every rank saw it (the ranks share the loss); rank 0 records it
        pass
    return None


def _resolved(cfg: DictConfig) -> DictConfig:
    """`cfg` with its interpolations resolved, for a process that has no Hydra context (`${hydra:...}`); as it is
    if it cannot be (the run then fails on it as it would have)."""
    try:
        return OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    except Exception:  # any unresolvable value: the run reports it
        return cfg


def _multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@contextmanager
def _device_slot(cfg: DictConfig) -> Iterator[str | None]:
    """With `trainer.device_slots=N`: hold a free slot of this node for the run (`lorafactory.slots`) and say which
    device it is (`gpu:<i>`, or `cpu:<cores>` once the process is pinned to its share); else nothing."""
    n = cfg.trainer.get("device_slots")
    if not n:
        yield None
        return
    with DeviceSlot(slot_folder(cfg.paths.runs), int(n)) as slot:
        if cfg.trainer.accelerator in ("gpu", "cuda"):
            yield f"gpu:{slot.index}"
        else:
            cores = pin_to_cpu_share(slot.index, int(n))
            torch.set_num_threads(len(cores))
            yield "cpu:" + ",".join(map(str, cores))


def _train(
    ranks: distributed.Ranks,
    cfg: DictConfig,
    run_dir: Path,
    base: dict[str, Any],
    t0: float,
    resume: Path | None,
    device: str | None = None,
) -> tuple[RunRecord | None, int | None]:
    """The run itself, as rank `ranks.rank` of its ranks, on `device` (a slot of `_device_slot`, or the trainer's
    devices), resuming from `resume` if set: its record, and the signal that came after training was over, if any
    (rank 0; the other ranks return Nones once training is over)."""
    # Every value checked before anything heavy is built (the CLI has checked them already; sweeps reach here too).
    validate(cfg)
    cache_dir = writable_dir(Path(cfg.paths.cache_dir), "paths.cache_dir (LORAFACTORY_CACHE)")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    # A CPU slot sets its own share, and so does `spawn_ranks` for the ranks it starts.
    if cfg.get("threads") and not (device or "").startswith("cpu:") and ranks.launch != "spawned":
        torch.set_num_threads(int(cfg.threads))

    # What to train: task, model and variant. The task decides the model's head (classification or causal LM).
    task = get_task(cfg.task)
    modality = model_modality(cfg.model)
    if modality != task.modality:
        raise UserError(f"model {cfg.model.name} takes {modality} input; task {task.name} is a {task.modality} task")
    check_head_kind(cfg.model.name, MODELS.get(cfg.model.builder), task.head, task.name)
    variant = build_variant(cfg.variant)
    loaded = build_model(cfg.model, task.num_labels, task_head=cfg.task.get("train_in_full") or (), kind=task.head)
    model = loaded.module
    total_params = parameter_count(model)  # a base stored quantized (model.quantize) counts its weights' values
    data_dir = resolve_data_dir(cfg.paths.data_dir)
    data = TaskData(task, loaded.tokenizer, cfg.task, cache_dir, data_dir, cfg.seed)

    # Tasks with a final evaluation of their own (generation, option scoring) also evaluate the untuned model, before
    # any adapter exists: the baseline the run must beat, and the held-out loss that forgetting is measured from.
    evaluator = Evaluator(task, data, merge=variant.mergeable)
    # Only the record needs it: rank 0's (an evaluation draws nothing from the global random stream, so the ranks'
    # adapters still start from the same random state).
    untuned = evaluator.untuned(model, cfg.model, cache_dir, data_dir) if ranks.rank == 0 else None

    variant.adapt(model, head=loaded.not_adapted)
    unfreeze(model, loaded.head)
    # A method that trains the task head alone has nothing to train with a causal LM's head (pretrained, frozen for
    # every method): its floor is the untuned model, which every run of such a task records (`untuned_metric`).
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(
            f"variant={cfg.variant.name} trains no parameter of {cfg.model.name} on {task.name}: the task uses the "
            f"model's own pretrained {loaded.kind} head, which stays frozen; that floor is the untuned model, "
            "recorded as untuned_metric in every run of this task"
        )
    model.train()  # from_pretrained returns eval mode; fine-tuning keeps the base model's dropout, as usual

    # Each rank trains on its share of every batch of `task.batch_size`, the global batch (`TaskData.train_loader`).
    train_loader = data.train_loader(rank=ranks.rank, world_size=ranks.world_size)
    eval_loader = partial(data.eval_loader, ranks.rank, ranks.world_size)
    module = AdapterModule(
        model,
        task,
        make_optimizer=partial(build_optimizer, cfg.optim, variant, model),
        make_scheduler=instantiate(cfg.scheduler),
        aux_loss=variant.aux_loss,
        evaluate=evaluator if evaluator.has_test else None,
    )

    # Checkpoints: every `ckpt_every_n_steps`, and on a signal; a relaunch resumes from the last one, exactly.
    ckpt_dir = (run_dir / CHECKPOINT).parent
    stats, signals = RunStats(variant, attempt_start=t0), SignalCheckpoint(run_dir / CHECKPOINT)
    callbacks = [
        DataProgress(train_loader),  # first: the position the checkpoints save must count the step just taken
        VariantHooks(variant, data.init_batches, resuming=resume is not None),
        DivergenceGuard(**cfg.trainer.divergence),
        stats,
        signals,
        ModelCheckpoint(
            dirpath=ckpt_dir, save_last=True, save_top_k=0, every_n_train_steps=cfg.trainer.ckpt_every_n_steps
        ),
    ]
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=[int(device[4:])] if device and device.startswith("gpu:") else cfg.trainer.devices,
        num_nodes=cfg.trainer.get("num_nodes") or 1,
        strategy=distributed.strategy(ranks, cfg.trainer.accelerator),
        use_distributed_sampler=False,  # the loaders shard themselves, so that the ranks batch as one process would
        precision=cfg.trainer.precision,
        max_epochs=cfg.task.epochs,
        max_steps=-1 if cfg.task.max_steps is None else cfg.task.max_steps,  # 0 trains nothing, evaluates
        **_validation_schedule(cfg, len(train_loader)),
        gradient_clip_val=cfg.trainer.gradient_clip_val,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        enable_progress_bar=cfg.trainer.progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        logger=_logger(cfg, run_dir, resume, trim=ranks.rank == 0),
        default_root_dir=run_dir,
        callbacks=callbacks,
    )
    # Until the run is recorded, a signal is ours: during training it stops at the next step with a checkpoint; once
    # training is over (the last validation, the final evaluation) the run finishes and records itself, and the
    # signal stops what comes after it (`run` raises it then: a sweep must not start its next run).
    signals.install()
    try:
        try:
            trainer.fit(module, train_loader, eval_loader(), ckpt_path=resume, weights_only=True)
            if not module.history or module.history[-1]["step"] != trainer.global_step:
                trainer.validate(module, eval_loader(), verbose=False)
        except SIGTERMException as err:  # Lightning's own stop, where no hook of ours could take it first
            if signals.signum is None:
                raise
            last = ckpt_dir / "last.ckpt"
            raise Interrupted(signals.signum, last if last.is_file() else None) from err
        spread = distributed.rank_divergence(adapter_state_dict(model)) if ranks.distributed else None
        if spread is not None and spread > RANK_TOLERANCE:  # the same number on every rank: they all stop
            raise UserError(
                f"the ranks ended training with different adapters (largest relative difference {spread:.2g}): "
                f"variant={cfg.variant.name} keeps state DDP does not synchronise; train it on one device"
            )
        if ranks.rank != 0:  # what follows is rank 0's alone: the final evaluation and the record
            return None, None

        # The final evaluation on the test subset, for tasks that have one (generation, option scoring): merged when
        # the variant merges, so it costs what the base model costs.
        test = evaluator(model, "test")
        selection = module.score(data.selection_loader()) if data.selection is not None else None
    finally:
        signals.uninstall()

    # Record: final metrics (the test evaluation's, else the last validation's) and the best validation, by the
    # task's declared primary metric and direction.
    history = module.history
    key = task.primary_metric
    pick = max if task.direction == "max" else min
    best = pick(history, key=lambda h: h[key])
    final = test.metrics if test is not None else {k: v for k, v in history[-1].items() if k != "step"}
    chance = test.chance if test is not None and test.chance else module.chance
    if cfg.save_adapter:
        torch.save(adapter_state_dict(model), run_dir / "adapter.pt")
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    record = RunRecord(
        **base,
        status="ok",
        final=final,
        final_source="validation" if test is None else "test",
        best={k: v for k, v in best.items() if k != "step"},
        final_metric=final[key],
        best_metric=best[key],
        best_step=int(best["step"]),
        history=history,
        chance_metric=chance.get(key),
        **_selection_fields(selection, history, test, key, data),
        eval_examples=(task.example_outputs(module.last_outputs) or {}) if test is None else test.examples,
        **_evaluation_fields(untuned, test, key),
        trainable_params=count_trainable(model.parameters()),
        adapter_params=count_trainable(variant.trained_parameters(model)),
        variant_summary=variant.summary(model),
        total_params=total_params + sum(p.numel() for p in adapter_parameters(model)),
        steps=trainer.global_step,
        train_samples=len(data.train),
        eval_samples=len(data.eval),
        device=device,
        world_size=ranks.world_size,
        global_batch=int(cfg.task.batch_size),
        rank_divergence=spread,
        wall_time_s=stats.wall_s,
        **stats.summary(),
    )
    return record, signals.signum


def _validation_schedule(cfg: DictConfig, batches_per_epoch: int) -> dict[str, Any]:
    """Lightning's validation schedule: every `task.eval_every_n_steps` optimizer steps when the task sets it (budgets
    in steps, shorter than an epoch), else `trainer.evals_per_epoch` times per epoch."""
    every = cfg.task.get("eval_every_n_steps")
    if every:
        return {"val_check_interval": int(every), "check_val_every_n_epoch": None}
    return {"val_check_interval": 1.0 / cfg.trainer.evals_per_epoch}


def _selection_fields(
    selection: dict[str, float] | None,
    history: list[dict[str, float]],
    test: Evaluation | None,
    key: str,
    data: TaskData,
) -> dict[str, Any]:
    """What a sweep chooses learning rates on: the held-out training examples (`task.selection_samples`) when the
    task has them; the last validation when results are reported on a test set; else nothing (a report then chooses
    on the reported split, and says so)."""
    if selection is not None:
        return {
            "selection": selection,
            "selection_metric": selection[key],
            "selection_source": "held-out training examples",
            "selection_samples": len(data.selection),
        }
    if test is not None and key in history[-1]:
        last = {k: v for k, v in history[-1].items() if k != "step"}
        return {"selection": last, "selection_metric": last[key], "selection_source": "validation"}
    return {}


def _evaluation_fields(untuned: Evaluation | None, test: Evaluation | None, key: str) -> dict[str, Any]:
    """What a task's own evaluation adds to the record: the untuned model's test metrics, forgetting (held-out text
    loss after minus before training), the evaluation's cost and details (rule counts, sample outputs)."""
    if test is None:
        return {}
    before = untuned.heldout_ce if untuned is not None else None
    out: dict[str, Any] = {
        "untuned": dict(untuned.metrics) if untuned is not None else {},
        "untuned_metric": untuned.metrics.get(key) if untuned is not None else None,
        "heldout_ce": {"before": before, "after": test.heldout_ce},
        "forgetting": test.heldout_ce - before if test.heldout_ce is not None and before is not None else None,
        "eval_cost": dict(test.cost),
        "eval_details": dict(test.details),
    }
    if untuned is not None:
        out["eval_cost"]["untuned_eval_s"] = untuned.cost.get("eval_s")
    return out


def writable_dir(path: Path, what: str) -> Path:
    """`path`, created if needed, after checking a file can be written in it (one line naming `what` if not)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        raise UserError(
            f"{what} {path} is not writable ({err.strerror or err}); point it somewhere writable"
        ) from None
    return path


def _logger(cfg: DictConfig, run_dir: Path, resume: Path | None, trim: bool = True) -> Any:
    """The configured metric logger; a resumed run keeps the rows logged up to its checkpoint (`trim`: rank 0
    edits the log, the process that writes it)."""
    if not cfg.logger:
        return False
    if resume is not None and trim:
        keep_rows_up_to(run_dir / "logs" / "metrics.csv", _checkpoint_step(resume))
    return instantiate(cfg.logger)


def _identity(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """Everything a record says about a run before it trains (so failed runs are described too)."""
    variant_cls = VARIANTS.get(cfg.variant.name) if cfg.variant.name in VARIANTS else None
    try:
        task = get_task(cfg.task)
    except UserError:  # an unknown task or impossible task fields: the failure this record describes
        task = None
    try:
        config = OmegaConf.to_container(cfg, resolve=True)
        lr = float(cfg.optim.lr)
    except Exception:  # an unresolvable config is itself the failure to record
        config, lr = OmegaConf.to_container(cfg, resolve=False), float("nan")
    return {
        "name": cfg.name,
        "model": cfg.model.name,
        "task": cfg.task.name,
        "variant": cfg.variant.name,
        "seed": int(cfg.seed),
        "lr": lr,
        "taxonomy": getattr(variant_cls, "taxonomy", ""),
        "tags": list(getattr(variant_cls, "tags", ())),
        "mergeable": getattr(variant_cls, "mergeable", None),
        "primary_metric": task.primary_metric if task else "",
        "direction": task.direction if task else "max",
        "data_note": task.split_note if task else None,
        "run_dir": str(run_dir),
        "overrides": list(overrides),
        "config": config,
        "versions": _versions(),
        "git_commit": _git_commit(),
    }


def _previous_record(run_dir: Path, cfg: DictConfig) -> RunRecord | None:
    """The folder's record; one that is not `ok` (or unreadable) is moved aside as `result.<status>-<n>.json`.

    So is one trained with settings the configuration no longer resolves to (`config_drift`: a default changed since,
    e.g. a variant's `lr_mult`), as `result.stale-<n>.json`, with its checkpoint: the run starts over, and None is
    returned."""
    path = run_dir / RECORD_NAME
    if not path.exists():
        return None
    try:
        record = read_record(path)
    except (OSError, ValueError, TypeError) as err:
        log.warning("Unreadable record %s (%s); running again", path, err)
        record = None
    n = len(list(run_dir.glob("result.*-*.json"))) + 1
    drift = settings_drift(record.config, cfg) if record is not None else []
    if drift:
        log.warning("%s was trained with other settings (%s): running it again", run_dir, "; ".join(drift))
        if (run_dir / CHECKPOINT).is_file():
            (run_dir / CHECKPOINT).rename(run_dir / f"last.ckpt.stale-{n}")
    if record is None or record.status != "ok" or drift:
        status = "stale" if drift else record.status if record else "corrupt"
        path.rename(run_dir / f"result.{status}-{n}.json")
    return None if drift else record


def _checkpoint(path: Path, run_dir: Path) -> Path | None:
    """The checkpoint to resume from, if there is a readable one. Loaded as data only (`weights_only`): a planted
    file cannot run code. An unreadable one (a kill while writing, or not ours) is moved out of the checkpoint folder,
    which is deleted when the run ends, and kept for inspection."""
    if not path.is_file():
        return None
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file means the same: start over
        n = len(list(run_dir.glob("last.ckpt.corrupt-*"))) + 1
        kept = run_dir / f"last.ckpt.corrupt-{n}"
        log.warning("Checkpoint %s is unreadable (%s); starting the run over, kept as %s", path, err, kept)
        path.rename(kept)
        return None
    log.info("Resuming from %s", path)
    return path


def _checkpoint_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def _versions() -> dict[str, str]:
    import lightning
    import transformers

    import lorafactory

    return {
        "lorafactory": lorafactory.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
    }


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
