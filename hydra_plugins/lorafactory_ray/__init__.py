"""`hydra/launcher=ray`: every run of a sweep as one Ray task, on a local Ray instance or an existing Ray cluster.

Each task runs what Hydra's basic launcher runs in-process (`hydra.core.utils.run_job` with the same composed config
and task function), so run folders and records are the same as with any other launcher. A task asks Ray for
`num_cpus` and `num_gpus`; the run uses as many CPU threads as it asked cores for, and Ray gives it its GPUs
(`CUDA_VISIBLE_DEVICES`). Failures keep the sweep's semantics: a run that fails is recorded and the others go on;
a task that raised or whose worker died is reported after the whole batch, as Hydra's basic launcher reports a job
that raised; a run stopped by a signal (exit 128 + N) stops the sweep once the batch is over.

On a cluster, every node needs lorafactory installed and the driver's working directory on a shared file system (the
run folders are written there, and the sweeper reads the records back). Environment variables the runs read
(`LORAFACTORY_*`, `HF_*`, ... : `env`) are passed from the driver to every task.

Why not Hydra's `hydra-ray-launcher`: it requires cloudpickle < 3 and boto3, whose botocore requires python-dateutil
< 3; the project pins cloudpickle 3.1.2 and python-dateutil 4.0.0, so pip cannot install it.
"""

# No `from __future__ import annotations`: Hydra executes plugin modules outside sys.modules, where dataclasses
# cannot resolve string annotations.
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)


@dataclass
class RayLauncherConf:
    _target_: str = "hydra_plugins.lorafactory_ray.RayLauncher"
    address: str | None = None
    """None: start a local Ray instance for the sweep; `auto` (this node belongs to a cluster) or
    `ray://<head>:10001`: an existing cluster."""
    num_cpus: float = 1
    """Cores each run asks for: Ray runs as many runs at once as the cluster has cores for, each with that many
    CPU threads."""
    num_gpus: float = 0
    """GPUs each run asks for (with `trainer=gpu`)."""
    max_retries: int = 1
    """Times Ray reruns a task whose worker died (a lost node, the OOM killer); the rerun resumes from the run's
    last checkpoint. An error inside a run is not retried: it is recorded as a failed run."""
    env: list[str] = field(default_factory=lambda: ["LORAFACTORY_", "HF_", "TRANSFORMERS_", "WANDB_", "TOKENIZERS_"])
    """Prefixes of the driver's environment variables that every task gets."""
    init: dict[str, Any] = field(default_factory=dict)
    """More keyword arguments of `ray.init`, e.g. `{num_cpus: 2}` for the size of a local instance."""


ConfigStore.instance().store(group="hydra/launcher", name="lorafactory_ray", node=RayLauncherConf)


@dataclass
class Exited:
    """A task whose run called `sys.exit` (stopped by a signal after a checkpoint): its exit status."""

    code: Any


class RayLauncher(Launcher):
    def __init__(
        self,
        address: str | None = None,
        num_cpus: float = 1,
        num_gpus: float = 0,
        max_retries: int = 1,
        env: Sequence[str] = (),
        init: Any = None,
    ) -> None:
        self.address, self.num_cpus, self.num_gpus = address, float(num_cpus), float(num_gpus)
        self.max_retries, self.env = int(max_retries), tuple(env)
        self.init = OmegaConf.to_container(init) if isinstance(init, DictConfig) else dict(init or {})
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        try:
            import ray
        except ImportError:
            print('error: hydra/launcher=ray needs Ray: pip install -e ".[ray]"', file=sys.stderr)
            sys.exit(2)  # a mistake in the environment (README, exit statuses)
        from hydra.core.singleton import Singleton

        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        if not ray.is_initialized():
            init = dict(self.init)
            runtime_env = dict(init.pop("runtime_env", None) or {})
            env = {k: v for k, v in os.environ.items() if k.startswith(self.env)}
            runtime_env["env_vars"] = {**env, **(runtime_env.get("env_vars") or {})}
            ray.init(address=self.address, runtime_env=runtime_env, **init)
        log.info("Ray: launching %d runs (%g CPUs, %g GPUs each)", len(job_overrides), self.num_cpus, self.num_gpus)
        remote = ray.remote(execute_job).options(
            num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_retries=self.max_retries, retry_exceptions=False
        )
        shared = ray.put((self.hydra_context, self.task_function, Singleton.get_state()))
        threads = max(1, int(self.num_cpus))
        pending, configs = [], []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
            # Composed here, as the basic launcher does, so a config that cannot compose fails before any task runs.
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{idx}"
                sweep_config.hydra.job.num = idx
            configs.append(sweep_config)
            pending.append(remote.remote(shared, sweep_config, os.getcwd(), threads))
        returns: list[JobReturn] = []
        exits = []
        for overrides, sweep_config, ref in zip(job_overrides, configs, pending, strict=True):
            try:
                result = ray.get(ref)
            except Exception as err:  # the task raised outside the run, or its worker died past its retries
                result = JobReturn(overrides=list(overrides), cfg=sweep_config, status=JobStatus.FAILED)
                result.return_value = err
            if isinstance(result, Exited):
                exits.append(result.code)
                result = JobReturn(overrides=list(overrides), cfg=sweep_config, status=JobStatus.COMPLETED)
            returns.append(result)
        if exits:
            sys.exit(exits[0])
        return returns


def execute_job(
    shared: tuple[HydraContext, TaskFunction, dict[Any, Any]], config: DictConfig, cwd: str, threads: int
) -> JobReturn | Exited:
    """In a Ray worker: one run, as Hydra's basic launcher runs it (`run_job`), from the driver's working directory
    (relative run folders are the driver's) with `threads` CPU threads."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.singleton import Singleton
    from hydra.core.utils import run_job

    hydra_context, task_function, singleton_state = shared
    if not Path(cwd).is_dir():
        raise FileNotFoundError(
            f"the sweep's working directory {cwd} does not exist on this node: run folders need a file system "
            "shared by the driver and every node"
        )
    os.chdir(cwd)
    # The run's thread count comes from here (`slots.available_cores`); Ray leaves a value the driver had in place.
    os.environ["OMP_NUM_THREADS"] = str(threads)
    setup_globals()
    Singleton.set_state(singleton_state)
    HydraConfig.instance().set_config(config)
    try:
        return run_job(
            hydra_context=hydra_context,
            task_function=task_function,
            config=config,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
        )
    except SystemExit as exc:  # Ray would take it for the worker's own exit and restart the task
        return Exited(exc.code)
