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
    resumed from a mid-epoch checkpoint sees exactly the examples the uninterrupted run would have seen."""

    def __init__(self, n: int, seed: int):
        self.n = n
        self.seed = seed
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
        return torch.randperm(self.n, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        skip = 0
        if self._skip is not None and self._skip[0] == self.epoch:
            skip, self._skip = self._skip[1], None
        return iter(self.order(self.epoch)[skip:])

    def __len__(self) -> int:
        return self.n


class ResumableLoader(DataLoader):
    """A DataLoader over an `EpochSampler` (Lightning sets its epoch) that can start a resumed epoch after the batches
    already trained on (`resume`)."""

    def __init__(self, dataset: Any, batch_size: int, seed: int, collate_fn: Any):
        self.epoch_sampler = EpochSampler(len(dataset), seed)
        # Its own generator: creating an iterator then draws its seed from here, not from the global RNG that dropout
        # uses, so a resumed run's dropout masks match the uninterrupted run's.
        super().__init__(
            dataset,
            batch_size=batch_size,
            sampler=self.epoch_sampler,
            collate_fn=collate_fn,
            generator=torch.Generator().manual_seed(seed),
        )

    def resume(self, epoch: int, batches_done: int) -> None:
        self.epoch_sampler.resume(epoch, batches_done * self.batch_size)


class TaskData:
    """The task's datasets (`Task.splits`) and loaders over them (`Task.collator` makes the batches)."""

    def __init__(
        self, task: Task, preprocessor: Any, task_cfg: Any, cache_dir: Path, data_dir: Path | None, seed: int
    ):
        self.task_cfg = task_cfg
        self.seed = seed
        self.train, self.eval = task.splits(preprocessor, task_cfg, cache_dir, data_dir)
        self.collate = task.collator(preprocessor)

    def train_loader(self, seed_offset: int = 0) -> ResumableLoader:
        return ResumableLoader(self.train, self.task_cfg.batch_size, self.seed + seed_offset, self.collate)

    def eval_loader(self) -> DataLoader:
        # Sorted by length, batches hold sentences of similar length: far less padding, same metrics.
        lengths = getattr(self.eval, "lengths", None)
        order = sorted(range(len(self.eval)), key=lengths().__getitem__) if lengths else list(range(len(self.eval)))
        return DataLoader(self.eval, batch_size=self.task_cfg.eval_batch_size, sampler=order, collate_fn=self.collate)

    def init_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Training batches for data-dependent initialisation, in an order independent of training's, endlessly
        (epoch after epoch): the variant takes as many as its method needs."""
        loader = self.train_loader(seed_offset=10_000)
        for epoch in itertools.count():
            loader.epoch_sampler.set_epoch(epoch)
            yield from loader
