"""One run on several devices (DDP): who a run's ranks are, how they start, and what they share, so that the run is
the one a single process would have trained (`task.batch_size` is the global batch: each rank trains on its share of
every batch, and DDP averages their gradients).

How the ranks come to exist (`Ranks.launch`):

- `spawn` (`trainer.strategy=ddp_spawn`, trainer=ddp_cpu): the launching process starts the ranks itself
  (`spawn_ranks`) and waits for them; it keeps the run folder's lock and writes the record rank 0 hands back. Each
  rank runs the whole recipe. Lightning's own `ddp_spawn` is not used: it runs `fit` alone in its workers and hands
  the main process back only the weights and the logged metrics, so the run's history, its statistics and any
  parameter a variant added or removed would be lost, and the final validation would start the workers again.
- `relaunch` (`trainer.strategy=ddp`, trainer=ddp, started by hand): Lightning runs the same command again for
  ranks 1..N-1 (`relaunched`) once training starts; the launching process is rank 0 and owns the folder. Under a
  Hydra multirun that command is the whole sweep: `config.check_launch` refuses the combination.
- `external`: torchrun, SLURM tasks (srun; submitit with tasks_per_node = devices), submitit's local executor with
  several tasks: every rank runs the command from the start, rank 0 owns the folder and tells the others (`agree`)
  whether to train, before anything is built.

Every rank builds the same model from the same seed and runs the variant's data-driven initialisation on the same
(global, seeded) batches, so that structure and state outside tensors agree; DDP then broadcasts rank 0's parameters
and buffers when it wraps the model. At the end of training the ranks' adapters are compared (`rank_divergence`).
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import signal
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import connection
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lorafactory.errors import Diverged, UserError
from lorafactory.slots import available_cores
from lorafactory.training.callbacks import Interrupted

log = logging.getLogger(__name__)

LAUNCHES = ("single", "spawn", "spawned", "relaunch", "relaunched", "external")
STRATEGIES = ("auto", "ddp", "ddp_spawn")
FAILED_RANK_GRACE_S = 30.0
"""How long the other ranks get to end on their own once one has failed, before they are killed: one blocked in a
collective with the failed rank would otherwise wait for the process group's timeout (30 minutes)."""


@dataclass(frozen=True)
class Ranks:
    """This process's place in its run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launch: str = "single"
    """How the run's ranks start (see the module docstring): `single`, `spawn` (this process starts them), `spawned`,
    `relaunch` (Lightning starts the others), `relaunched`, `external`."""

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def world_size(trainer_cfg: Any) -> int:
    """The ranks a config asks for: `trainer.devices` on each of `trainer.num_nodes` nodes."""
    return int(trainer_cfg.devices) * int(trainer_cfg.get("num_nodes") or 1)


def external_ranks() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when something else started this run's ranks: torchrun, SLURM tasks, or
    submitit's local executor with several tasks; else None."""
    env = os.environ
    if env.get("SUBMITIT_EXECUTOR") == "local" and int(env.get("SUBMITIT_LOCAL_NTASKS", "1")) > 1:
        rank, local = int(env["SUBMITIT_LOCAL_GLOBALID"]), int(env["SUBMITIT_LOCAL_LOCALID"])
        return rank, int(env["SUBMITIT_LOCAL_NTASKS"]), local
    if {"RANK", "GROUP_RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"} <= env.keys() and int(env.get("WORLD_SIZE", "1")) > 1:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    # Lightning's rule for a SLURM step that runs one task per rank (an interactive `bash` allocation is not one).
    if int(env.get("SLURM_NTASKS", "1")) > 1 and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", "0"))
    return None


def detect(trainer_cfg: Any) -> Ranks:
    """The ranks of the run this process is about to train (before anything of it exists)."""
    found = external_ranks()
    if found is not None:
        rank, world, local = found
        return Ranks(rank, world, local, "external")
    env = os.environ
    if "LOCAL_RANK" in env and int(env.get("WORLD_SIZE", "1")) > 1:  # a rank Lightning's `ddp` started again
        local = int(env["LOCAL_RANK"])
        rank = int(env.get("NODE_RANK", "0")) * int(trainer_cfg.devices) + local
        return Ranks(rank, int(env["WORLD_SIZE"]), local, "relaunched" if rank else "relaunch")
    world = world_size(trainer_cfg)
    if world == 1:
        return Ranks()
    return Ranks(0, world, 0, "spawn" if trainer_cfg.get("strategy") == "ddp_spawn" else "relaunch")


def backend(accelerator: str) -> str:
    return "nccl" if accelerator in ("gpu", "cuda") else "gloo"


def strategy(ranks: Ranks, accelerator: str) -> Any:
    """Lightning's strategy for the run: its default on one device, else DDP over the ranks described."""
    if not ranks.distributed:
        return "auto"
    from lightning.pytorch.strategies import DDPStrategy

    # Unused parameters are looked for: some variants leave trainable parameters out of a step (mixtures of experts
    # that route around them, masked ranks), which DDP would otherwise stop on.
    return DDPStrategy(
        cluster_environment=cluster_environment(ranks),
        process_group_backend=backend(accelerator),
        find_unused_parameters=True,
    )


def cluster_environment(ranks: Ranks) -> Any:
    """Where Lightning learns the ranks from; None lets Lightning choose (and, for `relaunch`, start them)."""
    from lightning.fabric.plugins.environments import LightningEnvironment, SLURMEnvironment, TorchElasticEnvironment

    if ranks.launch == "spawned" or (ranks.launch == "external" and os.environ.get("SUBMITIT_EXECUTOR") == "local"):
        # Told explicitly: inside a SLURM job Lightning would pick the job's (one-task) environment instead.
        return LightningEnvironment()
    if ranks.launch != "external":
        return None
    if TorchElasticEnvironment.detect():
        return TorchElasticEnvironment()
    # The requeue is ours (`cli.requeue_on_slurm`, once, from rank 0), not Lightning's.
    return SLURMEnvironment(auto_requeue=False)


def set_rank_environment(ranks: Ranks, port: int) -> None:
    """The variables Lightning's default environment reads a rank from, for ranks it did not start itself."""
    os.environ.update(
        LOCAL_RANK=str(ranks.local_rank),
        NODE_RANK="0",
        WORLD_SIZE=str(ranks.world_size),
        MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"),
        MASTER_PORT=str(port),
    )


def connect(ranks: Ranks, accelerator: str) -> None:
    """External ranks join their process group before anything is built (Lightning reuses it), so that rank 0 can
    tell the others what to do (`agree`)."""
    if dist.is_initialized():
        return
    from lightning.fabric.utilities.distributed import _init_dist_connection

    if os.environ.get("SUBMITIT_EXECUTOR") == "local":
        # One port per job: its controller's pid (two jobs of a sweep run side by side on the machine).
        set_rank_environment(ranks, 15000 + int(os.environ["SUBMITIT_LOCAL_JOB_ID"]) % 20000)
    if backend(accelerator) == "nccl":
        torch.cuda.set_device(ranks.local_rank)
    _init_dist_connection(cluster_environment(ranks), backend(accelerator), ranks.rank, ranks.world_size)


def agree(ranks: Ranks, decision: Any = None) -> Any:
    """Rank 0's `decision`, on every external rank (the others pass nothing and receive it); other launches decide
    in one process and return `decision` unchanged."""
    if ranks.launch != "external":
        return decision
    box = [decision]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --- what the ranks share during training ------------------------------------------------------------------------


def gather_examples(batches: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Every rank's validation outputs (`Task.validation_outputs`, per batch), joined in the order one process
    would have produced them: the evaluation set is sharded example by example (`TaskData.eval_loader`), without the
    repeated examples Lightning's DistributedSampler would pad with, so the metrics are the single-process ones."""
    local = [{k: v.detach().cpu() for k, v in b.items()} for b in batches]
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, local)
    return interleave(everyone)


def interleave(per_rank: list[list[dict[str, Tensor]]]) -> dict[str, Tensor]:
    """Rank r holds examples r, r + W, r + 2W, ... of the evaluation order (W ranks): tensors with a batch dimension
    are put back in that order; per-batch scalars (summed losses, counts) are stacked."""
    world = len(per_rank)
    first = next((b for batches in per_rank for b in batches), None)
    if first is None:
        raise ValueError("no rank has any evaluation example")
    out: dict[str, Tensor] = {}
    for key, value in first.items():
        if value.dim() == 0:
            out[key] = torch.stack([b[key] for batches in per_rank for b in batches])
            continue
        shards = [
            torch.cat([b[key] for b in batches]) if batches else value.new_empty((0, *value.shape[1:]))
            for batches in per_rank
        ]
        joined = value.new_empty((sum(len(s) for s in shards), *value.shape[1:]))
        for rank, shard in enumerate(shards):
            joined[rank::world] = shard
        out[key] = joined
    return out


def rank_divergence(state: dict[str, Tensor]) -> float:
    """The largest difference between the ranks' copies of `state` (the adapter), relative to each tensor's largest
    value: 0 when the ranks agree bit for bit. The same number on every rank."""
    if not state:
        return 0.0
    flat = torch.cat([t.detach().float().flatten() for t in state.values()])
    scale = torch.cat([t.detach().float().abs().max().clamp_min(1e-12).expand(t.numel()) for t in state.values()])
    high, low = flat.clone(), flat.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    # Each rank scales by its own maxima; the largest of those is taken, so every rank gets the same number.
    spread = torch.tensor(float(((high - low) / scale).max()), device=flat.device)
    dist.all_reduce(spread, op=dist.ReduceOp.MAX)
    return float(spread)


# --- starting the ranks from the launching process (`ddp_spawn`) --------------------------------------------------


def spawn_ranks(ranks: Ranks, accelerator: str, threads: int, target: Callable[..., Any], *args: Any) -> Any:
    """Start the run's `ranks.world_size` ranks, each calling `target(<its Ranks>, *args)` with `threads` torch
    threads, wait for all of them, and return rank 0's result or raise what it raised.

    The ranks are forked from multiprocessing's fork server, a process that imported the recipe once and computes
    nothing (so serves every run of a sweep): a fork of this process could not use its OpenMP threads (a rank would
    hang) or its CUDA state. They get this process's environment, warning filters and log levels; `target` and
    `args` must pickle (a config with `${hydra:...}` interpolations resolved).

    A signal to this process (SIGTERM, SIGUSR1) is passed on to the ranks, which stop together at a step boundary
    with a checkpoint (`callbacks.SignalCheckpoint`). A rank that fails makes the others stop: they get
    `FAILED_RANK_GRACE_S` to end on their own, then are killed."""
    import multiprocessing

    from lightning.fabric.plugins.environments.lightning import find_free_network_port

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["lorafactory.train"])  # once, when the server starts
    port = find_free_network_port()
    setup = _ProcessSetup.of_this_process()
    procs, receivers = [], []
    with _passing_signals_on(procs) as received:
        for rank in range(ranks.world_size):
            receiver, sender = context.Pipe(duplex=False)
            child = Ranks(rank, ranks.world_size, rank, "spawned")
            proc = context.Process(target=_rank_main, args=(child, port, threads, setup, sender, target, args))
            proc.start()
            sender.close()
            procs.append(proc)
            receivers.append(receiver)
        outcomes, failures = _collect(procs, receivers)
    return _rank_zero_result(outcomes, failures, procs, received)


@dataclass(frozen=True)
class _ProcessSetup:
    """What a rank takes over from the launching process: environment, warning filters, log levels and format."""

    environment: dict[str, str]
    warning_filters: list[Any]
    root_level: int
    levels: dict[str, int]
    log_format: str | None

    @classmethod
    def of_this_process(cls) -> _ProcessSetup:
        root = logging.getLogger()
        loggers = logging.root.manager.loggerDict.items()
        return cls(
            environment=dict(os.environ),
            warning_filters=list(warnings.filters),
            root_level=root.level,
            levels={name: lg.level for name, lg in loggers if isinstance(lg, logging.Logger) and lg.level},
            log_format=next((h.formatter._fmt for h in root.handlers if h.formatter is not None), None),
        )

    def apply(self) -> None:
        os.environ.clear()
        os.environ.update(self.environment)
        warnings.filters[:] = self.warning_filters
        logging.basicConfig(level=self.root_level, format=self.log_format or logging.BASIC_FORMAT, force=True)
        for name, level in self.levels.items():
            logging.getLogger(name).setLevel(level)


def _rank_main(
    ranks: Ranks,
    port: int,
    threads: int,
    setup: _ProcessSetup,
    sender: Any,
    target: Callable[..., Any],
    args: tuple[Any, ...],
) -> None:
    # Until the run installs its own handlers, a signal ends the rank (the launcher then records the run as
    # interrupted, without a checkpoint).
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_DFL)
    setup.apply()
    set_rank_environment(ranks, port)
    torch.set_num_threads(threads)
    try:
        outcome: tuple[str, Any, float] = ("ok", target(ranks, *args), time.time())
    except BaseException as err:  # reported, so that the launcher records what happened
        if not isinstance(err, UserError | Interrupted | Diverged):  # the launcher gets its message, not its traceback
            log.exception("rank %d failed", ranks.rank)
        # When: a rank blocked in a collective with a failed one fails after it, of the other's failure.
        outcome = ("raised", _portable(err), time.time())
    sender.send(outcome)
    sender.close()


def _portable(err: BaseException) -> BaseException:
    """`err` if it survives pickling (most do), else an error with the same message (a custom constructor that
    pickling cannot call again)."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:
        if isinstance(err, UserError):
            return UserError(str(err))
        return RuntimeError("".join(traceback.format_exception_only(err)).strip())


@contextmanager
def _passing_signals_on(procs: list[Any]) -> Iterator[list[int]]:
    received: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        received.append(signum)
        for proc in procs:
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signum)

    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for proc in procs:  # an exception here (KeyboardInterrupt) must not leave ranks behind
            if proc.is_alive():
                proc.kill()
                proc.join()


def _collect(procs: list[Any], receivers: list[Any]) -> tuple[dict[int, tuple[str, Any, float]], list[int]]:
    """Every rank's outcome (kind, value, when), read while the ranks run (a large result would fill the pipe and
    block its sender), and the ranks that failed, the first to fail first."""
    outcomes: dict[int, tuple[str, Any, float]] = {}
    failures: list[int] = []
    running = set(range(len(procs)))
    failed_at: float | None = None
    while running:
        waitables = [receivers[r] for r in running if r not in outcomes] + [procs[r].sentinel for r in running]
        connection.wait(waitables, timeout=1.0)
        for rank in sorted(running):
            if rank not in outcomes and receivers[rank].poll():
                try:
                    outcomes[rank] = receivers[rank].recv()
                except EOFError:  # ended without a word: killed
                    outcomes[rank] = ("died", None, time.time())
            if not procs[rank].is_alive():
                procs[rank].join()
                outcomes.setdefault(rank, ("died", None, time.time()))
                running.discard(rank)
            if rank in outcomes and outcomes[rank][0] != "ok" and rank not in failures:
                failures.append(rank)
                failed_at = failed_at or time.monotonic()
        if failed_at is not None and running and time.monotonic() - failed_at > FAILED_RANK_GRACE_S:
            for rank in running:
                log.warning("rank %d still running %.0f s after another failed: killed", rank, FAILED_RANK_GRACE_S)
                procs[rank].kill()
    return outcomes, sorted(failures, key=lambda rank: outcomes[rank][2])


def _rank_zero_result(
    outcomes: dict[int, tuple[str, Any, float]], failures: list[int], procs: list[Any], received: list[int]
) -> Any:
    kind, value, _ = outcomes[0]
    if kind == "ok":
        record, late_signal = value
        return record, late_signal or (received[0] if received else None)
    if kind == "raised" and isinstance(value, Interrupted | Diverged):  # decided by the ranks together
        raise value
    if received:  # a signal ended a rank before it could checkpoint
        raise Interrupted(received[0], None)
    first = failures[0]
    kind, value, _ = outcomes[first]
    if kind == "raised":
        raise value
    raise RuntimeError(f"rank {first} of the run ended without a result (exit code {procs[first].exitcode})")


def threads_per_rank(total: int | None, ranks_on_node: int) -> int:
    """Torch threads for each of a node's ranks: `total` (the run's `threads`, else the cores this process may use)
    shared out."""
    return max(1, math.floor((total or available_cores()) / ranks_on_node))
