"""One run on several devices: DDP ranks on the CPU (trainer=ddp_cpu, gloo) train the run one process would, on its
global batches, measure validation metrics over the whole set, keep one record and one owner, stop together on a
signal, and refuse to be launched in a way that would re-run a sweep."""

from __future__ import annotations

import pickle
import signal
import time
from pathlib import Path

import pytest
import test_reliability
import torch
from hydra import compose, initialize_config_dir
from test_reliability import first_checkpoint, wait_for
from test_sweeps import TINY, records, run

from lorafactory.config import CONF_DIR, check_launch, check_overrides
from lorafactory.errors import ConfigError
from lorafactory.results.record import RunRecord
from lorafactory.training import distributed
from lorafactory.training.callbacks import Interrupted
from lorafactory.training.data import EpochSampler

# 64 training sentences in batches of 6 (the last one of 4, split 2 + 2), 3 epochs: 33 steps; 23 validation sentences
# (12 on rank 0, 11 on rank 1) in evaluation batches of 5, so the gathering has uneven shards and several batches.
SMALL = [
    *TINY,
    "task.max_train_samples=64",
    "task.max_eval_samples=23",
    "task.selection_samples=0",
    "task.batch_size=6",
    "task.eval_batch_size=5",
    "task.epochs=3",
]


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


# --- what the ranks share: batches, evaluation outputs, the adapter ------------------------------------------------


@pytest.mark.parametrize("buckets", [None, 2])
@pytest.mark.parametrize(("n", "world"), [(64, 2), (23, 2), (21, 4), (30, 3)])
def test_the_ranks_shares_make_up_the_batches_one_process_trains_on(n, world, buckets):
    size = 6 if world != 4 else 8
    lengths = [(i * 7) % 11 for i in range(n)]
    one = EpochSampler(n, seed=3, lengths=lengths, batch_size=size, buckets=buckets)
    ranks = [EpochSampler(n, 3, lengths, size, buckets, rank=r, world_size=world) for r in range(world)]
    for epoch in (0, 1):
        for sampler in (one, *ranks):
            sampler.set_epoch(epoch)
        order = list(one)
        shares = [list(r) for r in ranks]
        assert [len(s) for s in shares] == [len(r) for r in ranks]
        per_rank = size // world
        for b, start in enumerate(range(0, n, size)):
            batch = order[start : start + size]
            got = [s[b * per_rank : (b + 1) * per_rank] for s in shares]
            if len(batch) < world:  # fewer examples than ranks: left out, every rank takes as many steps
                assert got == [[]] * world
                continue
            assert sorted(i for part in got for i in part) == sorted(batch)
            assert len({len(part) for part in got}) == 1 or start + size >= n  # equal shares but for the last batch
        steps = {-(-len(s) // per_rank) for s in shares}
        assert len(steps) == 1, "every rank must take the same number of steps"


def test_a_resumed_rank_skips_what_it_trained_on():
    whole = EpochSampler(64, 1, batch_size=6, rank=1, world_size=2)
    resumed = EpochSampler(64, 1, batch_size=6, rank=1, world_size=2)
    resumed.resume(epoch=0, examples_done=4 * 3)  # 4 steps of this rank's 3 examples
    assert list(resumed) == list(whole)[12:]


def shards_of(outputs_per_example: dict[str, torch.Tensor], order: list[int], world: int, batch: int):
    """What each rank's validation keeps: its strided share of `order`, in batches (with per-batch scalars)."""
    per_rank = []
    for rank in range(world):
        mine = order[rank::world]
        batches = []
        for start in range(0, len(mine), batch):
            idx = torch.tensor(mine[start : start + batch])
            out = {k: v[idx] for k, v in outputs_per_example.items()}
            out["loss_sum"] = outputs_per_example["loss"][idx].sum()
            out["count"] = torch.tensor(len(idx))
            batches.append(out)
        per_rank.append(batches)
    return per_rank


@pytest.mark.parametrize(("n", "world", "batch"), [(23, 2, 5), (24, 2, 128), (10, 3, 2), (2, 4, 3)])
def test_gathered_outputs_are_one_process_outputs_without_repeats(n, world, batch):
    generator = torch.Generator().manual_seed(n)
    examples = {
        "logits": torch.randn(n, 3, generator=generator),
        "labels": torch.randint(0, 3, (n,), generator=generator),
        "loss": torch.rand(n, generator=generator),
    }
    order = torch.randperm(n, generator=generator).tolist()  # the length-sorted order of the evaluation loader
    joined = distributed.interleave(shards_of(examples, order, world, batch))
    assert torch.equal(joined["logits"], examples["logits"][order])
    assert torch.equal(joined["labels"], examples["labels"][order])
    assert joined["count"].sum() == n  # every example once, none padded in
    assert joined["loss_sum"].sum() == pytest.approx(float(examples["loss"].sum()), rel=1e-6)


def agreement(ranks: distributed.Ranks, differ: bool) -> float:
    torch.distributed.init_process_group("gloo", rank=ranks.rank, world_size=ranks.world_size)
    state = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4)}
    if differ and ranks.rank == 1:
        state["b"][2] += 0.5
    return distributed.rank_divergence(state), None


def fails_on_rank_1(ranks: distributed.Ranks) -> None:
    torch.distributed.init_process_group("gloo", rank=ranks.rank, world_size=ranks.world_size)
    if ranks.rank == 1:
        raise ValueError("rank 1 cannot go on")
    torch.distributed.barrier()  # rank 0 waits for a rank that is gone


def test_the_ranks_adapters_are_compared_and_a_failed_rank_stops_the_run(monkeypatch):
    two = distributed.Ranks(0, 2, 0, "spawn")
    assert distributed.spawn_ranks(two, "cpu", 1, agreement, False) == (0.0, None)
    spread, _ = distributed.spawn_ranks(two, "cpu", 1, agreement, True)
    assert spread == pytest.approx(0.5)  # 0.5 on a tensor whose largest value is 1

    monkeypatch.setattr(distributed, "FAILED_RANK_GRACE_S", 2.0)
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="rank 1 cannot go on"):
        distributed.spawn_ranks(two, "cpu", 1, fails_on_rank_1)
    assert time.monotonic() - t0 < 60


def test_an_interruption_survives_the_way_back_from_a_rank():
    err = pickle.loads(pickle.dumps(Interrupted(signal.SIGTERM, Path("run/checkpoints/last.ckpt"))))
    assert (err.signum, err.checkpoint, err.finished, err.exit_code) == (
        signal.SIGTERM,
        Path("run/checkpoints/last.ckpt"),
        False,
        143,
    )
    assert "launch again to resume" in str(err)


def test_records_written_before_ddp_read_as_one_device():
    old = {"status": "ok", "model": "m", "task": "t", "variant": "lora", "seed": 0, "lr": 1e-3, "schema_version": 1}
    record = RunRecord.from_dict(old)
    assert record.world_size == 1 and record.global_batch is None and record.rank_divergence is None


# --- launching ------------------------------------------------------------------------------------------------------


def test_what_a_run_on_several_devices_needs_is_checked(monkeypatch):
    for name in ("SLURM_NTASKS", "RANK", "GROUP_RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SUBMITIT_EXECUTOR"):
        monkeypatch.delenv(name, raising=False)
    spawn = composed("trainer=ddp_cpu")
    check_launch(spawn, multirun=True)  # the launching process starts the ranks: sweeps are safe
    relaunch = composed("trainer=ddp_cpu", "trainer.strategy=ddp")
    check_launch(relaunch, multirun=False)  # one run: Lightning re-runs that one command
    with pytest.raises(ConfigError, match="whole sweep.*ddp_spawn.*slurm_ddp.*torchrun"):
        check_launch(relaunch, multirun=True)
    with pytest.raises(ConfigError, match="whole sweep"):  # a sweep config makes it a multirun without -m
        check_overrides(["sweep=lr_grid", "trainer=ddp_cpu", "trainer.strategy=ddp"])
    check_overrides(["sweep=lr_grid", "trainer=ddp_cpu"])
    submitit = {"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher", "nodes": 1}
    check_launch(relaunch, multirun=True, launcher={**submitit, "tasks_per_node": 2})  # one task per rank
    with pytest.raises(ConfigError, match="tasks_per_node=1 and nodes=1 must be trainer.devices=2"):
        check_launch(relaunch, multirun=True, launcher={**submitit, "tasks_per_node": 1})
    check_launch(spawn, multirun=True, launcher={**submitit, "tasks_per_node": 1})  # the task starts the ranks
    monkeypatch.setenv("SLURM_NTASKS", "2")  # inside `srun`: SLURM started the ranks
    monkeypatch.setenv("SLURM_PROCID", "1")
    check_launch(relaunch, multirun=True)
    assert distributed.detect(relaunch.trainer) == distributed.Ranks(1, 2, 0, "external")

    with pytest.raises(ConfigError, match="task.batch_size=7 is the global batch.*multiple of 2"):
        check_launch(composed("trainer=ddp_cpu", "task.batch_size=7"), multirun=False)
    with pytest.raises(ConfigError, match="trainer=ddp .* or trainer=ddp_cpu"):
        check_launch(composed("trainer.devices=2"), multirun=False)
    with pytest.raises(ConfigError, match="device_slots"):
        check_launch(composed("trainer=ddp_cpu", "trainer.device_slots=2"), multirun=False)
    with pytest.raises(ConfigError, match="trainer.strategy must be one of auto, ddp, ddp_spawn"):
        check_launch(composed("trainer.strategy=fsdp"), multirun=False)


def test_the_slurm_ddp_preset_gives_each_device_a_task_and_requeues_on_time_limits():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "config", ["trainer=ddp", "trainer.devices=4", "hydra/launcher=slurm_ddp"], return_hydra_config=True
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.tasks_per_node, launcher.gpus_per_node, launcher.nodes) == (4, 4, 1)
    assert launcher.additional_parameters == {"signal": "USR1@120", "requeue": True}
    check_launch(cfg, multirun=True, launcher=dict(launcher))


def test_ddp_that_would_re_run_a_sweep_is_refused_in_one_line(workdir):
    result = run("-m", *TINY, "trainer=ddp", "seed=0,1", cwd=workdir)
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: trainer.strategy=ddp") and "ddp_spawn" in line and "torchrun" in line, line
    assert not (workdir / "runs").exists()


# --- runs ------------------------------------------------------------------------------------------------------------


def evaluate_saved_adapter(record: RunRecord) -> tuple[dict[str, float], dict[str, list]]:
    """The run's saved adapter on a fresh model, scored by one process on the whole validation set."""
    from omegaconf import OmegaConf

    from lorafactory.models import build_model, unfreeze
    from lorafactory.tasks import get_task
    from lorafactory.tasks.data import resolve_data_dir
    from lorafactory.training.data import TaskData
    from lorafactory.training.module import concat
    from lorafactory.variants.base import build_variant, load_adapter_state_dict

    cfg = OmegaConf.create(record.config)
    task = get_task(cfg.task)
    loaded = build_model(cfg.model, task.num_labels, kind=task.head)
    build_variant(cfg.variant).adapt(loaded.module, head=loaded.not_adapted)
    unfreeze(loaded.module, loaded.head)
    state = torch.load(Path(record.run_dir) / "adapter.pt", weights_only=True)
    load_adapter_state_dict(loaded.module, state)
    data = TaskData(
        task, loaded.tokenizer, cfg.task, Path(cfg.paths.cache_dir), resolve_data_dir(cfg.paths.data_dir), 0
    )
    model = loaded.module.eval()
    with torch.no_grad():
        outputs = concat([task.validation_outputs(model(**batch), batch) for batch in data.eval_loader()])
    return task.validation_metrics(outputs), task.example_outputs(outputs)


def test_a_run_on_two_cpu_processes_is_the_run_one_process_trains(workdir):
    """lora_ga: its initialisation is computed from training batches, which every rank must see whole."""
    args = [*SMALL, "variant=lora_ga", "optim.lr=1e-5"]
    t0 = time.perf_counter()
    ddp = run(*args, "trainer=ddp_cpu", "name=ddp", cwd=workdir)
    ddp_s = time.perf_counter() - t0
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    t0 = time.perf_counter()
    one = run(*args, "name=one", cwd=workdir)
    one_s = time.perf_counter() - t0
    assert one.returncode == 0, one.stderr[-3000:]
    print(f"ddp_cpu run {ddp_s:.1f} s, single-process run {one_s:.1f} s")

    assert len(list((workdir / "runs" / "ddp").rglob("result*.json"))) == 1  # rank 1 writes no record
    [record] = records(workdir / "runs" / "ddp").values()
    assert record.status == "ok" and record.steps == 33
    assert (record.world_size, record.global_batch) == (2, 6)
    assert record.rank_divergence == 0.0  # the two ranks ended with the same adapter, bit for bit
    assert ddp.stdout.count("ok: lora_ga on glue/sst2") == 1

    # The validation metrics are those of the whole set, each example once, in one process's order.
    metrics, examples = evaluate_saved_adapter(record)
    assert record.eval_examples == examples and len(examples["labels"]) == 23
    assert record.final["accuracy"] == metrics["accuracy"]
    assert record.final["loss"] == pytest.approx(metrics["loss"], rel=1e-5)

    # The same adapter as the single-process run: the same data-driven initialisation, from the same global batches.
    # Training then moves each value by at most ~lr a step (Adam; the head at lr / lr_mult = 3e-5), and the two runs
    # differ only in their dropout masks: a different initialisation would differ by ~0.1.
    [alone] = records(workdir / "runs" / "one").values()
    assert alone.world_size == 1 and alone.steps == 33
    a = torch.load(Path(record.run_dir) / "adapter.pt", weights_only=True)
    b = torch.load(Path(alone.run_dir) / "adapter.pt", weights_only=True)
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max() <= 2 * record.steps * 3e-5, key


def test_a_signal_to_the_launching_process_stops_every_rank_with_a_checkpoint(workdir):
    args = [*TINY, "task.max_train_samples=64", "task.selection_samples=0", "task.batch_size=4", "task.epochs=20"]
    args += ["trainer=ddp_cpu", "trainer.ckpt_every_n_steps=16", "name=stopped"]
    process = test_reliability.start(*args, cwd=workdir)
    wait_for(first_checkpoint(workdir / "runs"), process)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 143, err[-3000:]
    assert err.count("interrupted by SIGTERM") == 1, err[-3000:]
    [record] = records(workdir / "runs").values()
    assert record.status == "interrupted" and "launch again to resume" in record.error
    run_dir = Path(record.run_dir)
    stopped_at = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert stopped_at % 16 != 0 or stopped_at > 16  # saved at the signal, not only at the periodic checkpoint

    again = run(*args, cwd=workdir)  # both ranks resume from the checkpoint
    assert again.returncode == 0, again.stderr[-3000:]
    [record] = records(workdir / "runs").values()
    assert record.status == "ok" and record.resumed == 1 and record.steps == 320 and record.world_size == 2
    assert (run_dir / "result.interrupted-1.json").is_file()


def test_a_sweep_of_runs_on_two_tasks_each_through_submitit(workdir):
    """submitit's local executor starts one process per task, as SLURM does with slurm_ddp: the tasks are the ranks."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    args = [*TINY, "task.selection_samples=0", "task.batch_size=8", "trainer=ddp_cpu", "trainer.strategy=ddp"]
    args += ["hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2", "name=sub", "seed=0,1"]
    result = run("-m", *args, cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    found = records(workdir / "runs" / "sub")
    assert len(found) == 2 and {r.seed for r in found.values()} == {0, 1}
    assert all(r.status == "ok" and r.world_size == 2 and r.global_batch == 8 for r in found.values())
    assert all(r.rank_divergence == 0.0 for r in found.values())
    tasks = sorted((workdir / "runs" / "sub" / ".submitit").rglob("*_result.pkl"))
    assert len(tasks) == 4  # 2 jobs × 2 tasks
    assert "done                    2" in result.stdout
