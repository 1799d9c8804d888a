"""Data loaders for a task: a resumable seeded order for training, length-sorted batches for evaluation."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from lorafactory.tasks import Task


class EpochSampler(Sampler[int]):
    """A shuffled order that is a function of (seed, epoch) alone, and can start part-way through an epoch: a run
    resumed from a mid-epoch checkpoint sees exactly the examples the uninterrupted run would have seen.

    With `lengths` and `buckets`, batches are bucketed by length: the shuffled order is cut into chunks of `buckets`
    batches, each chunk sorted by length and cut into batches, and the batches shuffled (the one short batch last, so
    batch boundaries stay at multiples of `batch_size`). Batches then hold examples of similar length (far less
    padding: generation tasks' lengths vary several-fold) while any order bias stays within a chunk."""

    def __init__(
        self,
        n: int,
        seed: int,
        lengths: list[int] | None = None,
        batch_size: int = 1,
        buckets: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.n = n
        self.seed = seed
        self.lengths = lengths
        self.batch_size = batch_size
        """The global batch: with `world_size` ranks, each takes its share of every batch of the shuffled order."""
        self.buckets = buckets
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self._skip: tuple[int, int] | None = None
        """(epoch, examples of it already trained on), set when resuming: that epoch's next pass starts after them."""

    def set_epoch(self, epoch: int) -> None:  # Lightning calls it at every epoch start
        self.epoch = epoch

    def resume(self, epoch: int, examples_done: int) -> None:
        self.epoch = epoch
        self._skip = (epoch, examples_done)

    def order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.n, generator=generator).tolist()
        if not self.buckets or self.lengths is None:
            return order
        size, chunk = self.batch_size, self.buckets * self.batch_size
        batches: list[list[int]] = []
        for start in range(0, self.n, chunk):
            ranked = sorted(order[start : start + chunk], key=self.lengths.__getitem__)
            batches += [ranked[i : i + size] for i in range(0, len(ranked), size)]
        full = [b for b in batches if len(b) == size]
        short = [b for b in batches if len(b) < size]  # at most one: every chunk but the last is whole batches
        shuffled = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
        return [i for batch in shuffled + short for i in batch]

    def shard(self, order: list[int]) -> list[int]:
        """This rank's examples of `order`: examples rank, rank + W, ... of every batch (W ranks), so that the ranks
        together train on the batches one process would. A last batch with fewer examples than ranks is left out (at
        most W - 1 examples an epoch): every rank must take the same number of steps."""
        if self.world_size == 1:
            return order
        size, world = self.batch_size, self.world_size
        return [
            i
            for start in range(0, len(order), size)
            if len(order[start : start + size]) >= world
            for i in order[start : start + size][self.rank :: world]
        ]

    def __iter__(self) -> Iterator[int]:
        skip = 0
        if self._skip is not None and self._skip[0] == self.epoch:
            skip, self._skip = self._skip[1], None
        return iter(self.shard(self.order(self.epoch))[skip:])

    def __len__(self) -> int:
        if self.world_size == 1:
            return self.n
        size, world = self.batch_size, self.world_size
        last = self.n % size
        return self.n // size * (size // world) + (-(-(last - self.rank) // world) if last >= world else 0)


class ResumableLoader(DataLoader):
    """A DataLoader over an `EpochSampler` (Lightning sets its epoch) that can start a resumed epoch after the batches
    already trained on (`resume`). With `world_size` ranks, this rank's share of every batch of `batch_size`."""

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        seed: int,
        collate_fn: Any,
        buckets: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        lengths = dataset.lengths() if buckets and hasattr(dataset, "lengths") else None
        self.epoch_sampler = EpochSampler(len(dataset), seed, lengths, batch_size, buckets, rank, world_size)
        # Its own generator: creating an iterator then draws its seed from here, not from the global RNG that dropout
        # uses, so a resumed run's dropout masks match the uninterrupted run's.
        super().__init__(
            dataset,
            batch_size=batch_size // world_size,
            sampler=self.epoch_sampler,
            collate_fn=collate_fn,
            generator=torch.Generator().manual_seed(seed),
        )

    def resume(self, epoch: int, batches_done: int) -> None:
        self.epoch_sampler.resume(epoch, batches_done * self.batch_size)


class TaskData:
    """The task's datasets (`Task.splits`, and `Task.test_set` for tasks with a final evaluation) and loaders over
    them (`Task.collator` makes the batches)."""

    def __init__(
        self, task: Task, preprocessor: Any, task_cfg: Any, cache_dir: Path, data_dir: Path | None, seed: int
    ):
        self.task_cfg = task_cfg
        self.seed = seed
        self.preprocessor = preprocessor
        self.train, self.eval = task.splits(preprocessor, task_cfg, cache_dir, data_dir)
        self.test = task.test_set(preprocessor, task_cfg, cache_dir, data_dir)
        self.selection = task.selection_set(preprocessor, task_cfg, cache_dir, data_dir)
        self.collate = task.collator(preprocessor)

    def train_loader(self, seed_offset: int = 0, rank: int = 0, world_size: int = 1) -> ResumableLoader:
        """Training batches of `task.batch_size` (the global batch; with `world_size` ranks, this rank's share)."""
        buckets = self.task_cfg.get("length_buckets")
        return ResumableLoader(
            self.train, self.task_cfg.batch_size, self.seed + seed_offset, self.collate, buckets, rank, world_size
        )

    def eval_loader(self, rank: int = 0, world_size: int = 1) -> DataLoader:
        """The evaluation set; with `world_size` ranks, this rank's examples (`distributed.gather_examples` joins
        the ranks' outputs back in this order). `task.eval_batch_size` is per device: it changes no result."""
        return self._scoring_loader(self.eval, rank, world_size)

    def selection_loader(self) -> DataLoader | None:
        return self._scoring_loader(self.selection) if self.selection is not None else None

    def _scoring_loader(self, rows: Any, rank: int = 0, world_size: int = 1) -> DataLoader:
        # Sorted by length, batches hold sentences of similar length: far less padding, same metrics.
        lengths = getattr(rows, "lengths", None)
        order = sorted(range(len(rows)), key=lengths().__getitem__) if lengths else list(range(len(rows)))
        return DataLoader(
            rows, batch_size=self.task_cfg.eval_batch_size, sampler=order[rank::world_size], collate_fn=self.collate
        )

    def init_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Training batches for data-dependent initialisation, in an order independent of training's, endlessly
        (epoch after epoch): the variant takes as many as its method needs."""
        loader = self.train_loader(seed_offset=10_000)
        for epoch in itertools.count():
            loader.epoch_sampler.set_epoch(epoch)
            yield from loader
