"""Loading, tokenising and batching task data.

Raw data comes from `datasets.load_dataset(<hub id>, <subset>)`, or from a folder of the same name under the data
directory (`LORAFACTORY_DATA_DIR` / `paths.data_dir`) in the Hub's layout. Tokenised splits are cached on disk, keyed
by the task, split, tokenizer and max length, so a second run of the same task and model does not tokenise again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lorafactory.errors import DataMissingError, hub_reachable
from lorafactory.tasks import Task

log = logging.getLogger(__name__)
CACHE_VERSION = 1  # bump when the tokenised format changes
SUBSET_SEED = 0  # the capped train set and the carved splits are the same for every run seed
SELECTION_SEED = 1  # the selection split: the same for every run of a task, whatever its budget or seed


def resolve_data_dir(configured: str | os.PathLike | None) -> Path | None:
    value = configured or os.environ.get("LORAFACTORY_DATA_DIR")
    return Path(value).expanduser() if value else None


def load_split(task: Task, split: str, data_dir: Path | None) -> Any:
    """One split of the task's raw dataset, from the local mirror when it has it, otherwise from the Hub."""
    import datasets

    datasets.disable_progress_bars()
    local = local_folder(task, data_dir)
    on_disk = local is not None and local.is_dir()
    source = str(local) if on_disk else task.hub_id
    try:
        if not on_disk and not hub_reachable():
            raise ConnectionError("huggingface.co is unreachable")  # fail now rather than after the Hub's retries
        if not on_disk:
            return datasets.load_dataset(source, task.subset, split=split)
        # datasets' own cache may serve a stale conversion of edited local files; our tokenisation cache sits in
        # front of this call anyway, so converting afresh costs little and is always right.
        return datasets.load_dataset(source, task.subset, split=split, download_mode="force_redownload")
    except Exception as err:  # datasets raises many types for "not there": connection, file, value errors
        if on_disk:
            broken = _unreadable_file(local, task.subset)
            if broken is not None:
                raise DataMissingError(
                    f"dataset {task.hub_id} ({task.subset}): the mirror file {broken[0]} is unreadable ({broken[1]}); "
                    "replace it with a complete copy"
                ) from None
            where = f"the mirror folder {source} could not be read"
        elif os.path.isabs(task.hub_id):
            where = "that folder does not exist"
        elif data_dir is not None:
            where = f"{data_dir} has no folder '{task.hub_id}'"
        else:
            where = "LORAFACTORY_DATA_DIR is not set"
        reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise DataMissingError(
            f"dataset {task.hub_id} ({task.subset}, split '{split}') is not available: {where}, and the Hugging Face "
            f"Hub failed ({reason}). Point LORAFACTORY_DATA_DIR (or paths.data_dir) at a mirror in the Hub layout, "
            f"e.g. ../shared/data, or run with network access."
        ) from None


def local_folder(task: Task, data_dir: Path | None) -> Path | None:
    """Where the task's data would be on disk: an absolute `hub_id` is a folder of its own (a folder of images),
    anything else a Hub id mirrored under the data directory."""
    if os.path.isabs(task.hub_id):
        return Path(task.hub_id)
    return data_dir / task.hub_id if data_dir else None


def _unreadable_file(folder: Path, subset: str | None) -> tuple[Path, str] | None:
    """The first data file of the mirror's subset that its format's reader rejects (a truncated download), with why."""
    import pyarrow.parquet as pq

    for path in sorted(folder.rglob("*.parquet")):
        if subset and subset not in str(path.relative_to(folder)):
            continue
        try:
            pq.ParquetFile(path).read()
        except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ...: all mean "not a readable file"
            return path, str(err).splitlines()[0][:160]
    return None


def source_stamp(task: Task, data_dir: Path | None) -> list[Any]:
    """Sizes and modification times of the local mirror's files for the task, so an edited mirror is re-tokenised;
    the Hub id alone for remote data."""
    folder = local_folder(task, data_dir)
    if folder is None or not folder.is_dir():
        return [task.hub_id]
    files = sorted(p for p in folder.rglob("*") if p.is_file() and (task.subset or "") in str(p.relative_to(folder)))
    return [[str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def _cache_key(task: Task, split: str, tokenizer: Any, max_length: int, data_dir: Path | None) -> str:
    spec = {
        "source": source_stamp(task, data_dir),
        "v": CACHE_VERSION,
        "task": task.name,
        "hub_id": task.hub_id,
        "subset": task.subset,
        "split": split,
        "fields": getattr(task, "text_fields", None),
        "tokenizer": [type(tokenizer).__name__, str(tokenizer.name_or_path), len(tokenizer)],
        "max_length": max_length,
    }
    return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def tokenized_split(task: Task, split: str, tokenizer: Any, max_length: int, cache_dir: Path, data_dir: Path | None):
    """The whole split tokenised (columns input_ids, attention_mask[, token_type_ids], labels), cached on disk."""
    import datasets

    key = _cache_key(task, split, tokenizer, max_length, data_dir)
    path = cache_dir / "tokenized" / task.name.replace("/", "__") / f"{split}-{key}"
    if path.is_dir():
        log.debug("Tokenised %s/%s from cache %s", task.name, split, path)
        return datasets.load_from_disk(str(path))
    raw = load_split(task, split, data_dir)
    columns = raw[:]  # dict of python lists; tokenizing all at once runs in the Rust tokenizer
    encoded = dict(tokenizer(*task.example_inputs(columns), truncation=True, max_length=max_length))
    labels = columns["label"]
    encoded["labels"] = [float(v) for v in labels] if task.num_labels == 1 else [int(v) for v in labels]
    dataset = datasets.Dataset.from_dict(encoded)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    dataset.save_to_disk(str(tmp))
    try:
        os.replace(tmp, path)  # atomic: a concurrent run either sees no cache or a complete one
    except OSError:  # another process won the race; its copy is identical
        pass
    log.info("Tokenised %s/%s (%d examples), cached at %s", task.name, split, len(dataset), path)
    return datasets.load_from_disk(str(path))


@dataclass
class Rows(torch.utils.data.Dataset):
    """Tokenised examples held as python lists: indexing is a list lookup, not an Arrow read."""

    columns: dict[str, list[Any]]

    def __len__(self) -> int:
        return len(self.columns["labels"])

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {k: v[i] for k, v in self.columns.items()}

    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.columns["input_ids"]]

    def head(self, n: int) -> Rows:
        """The first `n` examples."""
        return Rows({k: v[:n] for k, v in self.columns.items()})


def select_rows(dataset: Any, indices: list[int] | None, limit: int | None) -> Rows:
    if indices is not None:
        dataset = dataset.select(indices)
    if limit is not None and limit < len(dataset):
        dataset = dataset.shuffle(seed=SUBSET_SEED).select(range(limit))
    return Rows(dataset[:])


def selection_cut(n: int, size: int | None) -> tuple[list[int], list[int]]:
    """(training pool, selection split): positions in a task's `n` training examples, `size` of them set aside by a
    fixed seed to choose learning rates on, so that the split a result is reported on plays no part in choosing it.

    The same examples for every run of the task (any seed, any budget: a budget caps the pool, never the selection
    split). At most a quarter of the examples go (a tiny mirror in tests), none when `size` is 0 or None."""
    size = min(int(size or 0), n // 4)
    if size <= 0:
        return list(range(n)), []
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SELECTION_SEED)).tolist()
    return sorted(order[size:]), sorted(order[:size])


def task_training_pool(
    task: Task, tokenizer: Any, max_length: int, cache_dir: Path, data_dir: Path | None
) -> tuple[Any, list[int]]:
    """The tokenised split training examples come from, and their positions in it (a task without a train split
    carves them from its eval split)."""
    if not task.carved:
        train = tokenized_split(task, task.train_split, tokenizer, max_length, cache_dir, data_dir)
        return train, list(range(len(train)))
    pool = tokenized_split(task, task.eval_split, tokenizer, max_length, cache_dir, data_dir)
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(SUBSET_SEED)).tolist()
    return pool, order[: int(task.carve_fraction * len(pool))]


def task_splits(
    task: Task,
    tokenizer: Any,
    max_length: int,
    cache_dir: Path,
    data_dir: Path | None,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    selection_samples: int | None = None,
) -> tuple[Rows, Rows]:
    """(train, eval) rows, capped, the training rows without the selection split (`task_selection`); a task without
    a train split carves both from its eval split."""
    source, positions = task_training_pool(task, tokenizer, max_length, cache_dir, data_dir)
    keep, _ = selection_cut(len(positions), selection_samples)
    train = select_rows(source, [positions[i] for i in keep], max_train_samples)
    if not task.carved:
        evaluation = tokenized_split(task, task.eval_split, tokenizer, max_length, cache_dir, data_dir)
        return train, select_rows(evaluation, None, max_eval_samples)
    order = torch.randperm(len(source), generator=torch.Generator().manual_seed(SUBSET_SEED)).tolist()
    return train, select_rows(source, order[len(positions) :], max_eval_samples)


def task_selection(
    task: Task, tokenizer: Any, max_length: int, cache_dir: Path, data_dir: Path | None, selection_samples: int | None
) -> Rows | None:
    """The selection split's rows: training examples no run trains on (`selection_cut`), or None without one."""
    if not selection_samples:
        return None
    source, positions = task_training_pool(task, tokenizer, max_length, cache_dir, data_dir)
    _, chosen = selection_cut(len(positions), selection_samples)
    return select_rows(source, [positions[i] for i in chosen], None) if chosen else None


class PadCollator:
    """Pads a list of examples to the longest in the batch (rounded up to a multiple of 8)."""

    def __init__(self, pad_id: int, regression: bool, multiple: int = 8):
        self.pad_id = pad_id
        self.label_dtype = torch.float32 if regression else torch.long
        self.multiple = multiple

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Tensor]:
        longest = max(len(r["input_ids"]) for r in rows)
        width = -(-longest // self.multiple) * self.multiple
        batch: dict[str, Tensor] = {}
        for key in rows[0]:
            if key == "labels":
                continue
            fill = self.pad_id if key == "input_ids" else 0
            out = torch.full((len(rows), width), fill, dtype=torch.long)
            for i, r in enumerate(rows):
                out[i, : len(r[key])] = torch.tensor(r[key], dtype=torch.long)
            batch[key] = out
        batch["labels"] = torch.tensor([r["labels"] for r in rows], dtype=self.label_dtype)
        return batch
