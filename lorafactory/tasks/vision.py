"""Image classification, defined by config: a task YAML with `family: image-classification` names the dataset, its
image and label columns and its label names, so CIFAR-10 or a folder of images is one YAML file away
(`conf/task/vision/fashion_mnist.yaml` is the example). Primary metric: accuracy.

Preprocessing runs once per dataset split and model input: every image is decoded, converted to the model's channels
(grayscale stays one channel until batching), resized to the model's square input (bilinear, antialiased when
shrinking, rounded back to 8 bits as image libraries do), and the split is cached as one uint8 tensor under
`paths.cache_dir/images/`. Training then reads tensors, never image files. The collator normalises a batch to the
model's mean and std and repeats a grayscale channel to the model's three; optional light augmentation (`augment`)
flips and shifts training images.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lorafactory.errors import ConfigError, DataMissingError
from lorafactory.tasks import TASK_FAMILIES, Task
from lorafactory.tasks.data import SUBSET_SEED, load_split, selection_cut, source_stamp

if TYPE_CHECKING:
    from lorafactory.models import ImageSpec

log = logging.getLogger(__name__)
CACHE_VERSION = 1  # bump when the cached format changes
CHUNK = 1024  # images decoded and resized at a time: bounded memory, batched resizing
GRAYSCALE_MODES = ("1", "L", "I", "I;16", "F")


@dataclass(frozen=True)
class ImageClassificationTask(Task):
    image_column: str = "image"
    label_column: str = "label"
    labels: tuple[str, ...] = ()
    """Class names in the order of the head's outputs."""
    augment: bool = False

    @classmethod
    def from_config(cls, cfg: Any) -> ImageClassificationTask:
        labels = tuple(str(name) for name in cfg.labels)
        return cls(
            name=cfg.name,
            hub_id=str(cfg.dataset),
            subset=cfg.get("subset"),
            num_labels=len(labels),
            metrics=("accuracy",),
            primary_metric="accuracy",
            modality="vision",
            train_split=cfg.get("train_split"),
            eval_split=cfg.eval_split,
            image_column=cfg.image_column,
            label_column=cfg.label_column,
            labels=labels,
            augment=bool(cfg.get("augment", False)),
        )

    def splits(
        self, preprocessor: ImageSpec, task_cfg: Any, cache_dir: Path, data_dir: Path | None
    ) -> tuple[ImageRows, ImageRows]:
        if self.carved:
            pool = image_split(self, self.eval_split, preprocessor, cache_dir, data_dir)
            order = torch.randperm(len(pool.labels), generator=torch.Generator().manual_seed(SUBSET_SEED))
            cut = int(self.carve_fraction * len(order))
            train, evaluation = pool.subset(order[:cut]), pool.subset(order[cut:])
        else:
            train = image_split(self, self.train_split, preprocessor, cache_dir, data_dir)
            evaluation = image_split(self, self.eval_split, preprocessor, cache_dir, data_dir)
        keep, _ = selection_cut(len(train), task_cfg.get("selection_samples"))
        train = train.subset(torch.tensor(keep, dtype=torch.long))
        train, evaluation = train.capped(task_cfg.max_train_samples), evaluation.capped(task_cfg.max_eval_samples)
        train.augment = self.augment
        return train, evaluation

    def selection_set(
        self, preprocessor: ImageSpec, task_cfg: Any, cache_dir: Path, data_dir: Path | None
    ) -> ImageRows | None:
        if not task_cfg.get("selection_samples"):
            return None
        if self.carved:
            pool = image_split(self, self.eval_split, preprocessor, cache_dir, data_dir)
            order = torch.randperm(len(pool.labels), generator=torch.Generator().manual_seed(SUBSET_SEED))
            train = pool.subset(order[: int(self.carve_fraction * len(order))])
        else:
            train = image_split(self, self.train_split, preprocessor, cache_dir, data_dir)
        _, chosen = selection_cut(len(train), task_cfg.get("selection_samples"))
        return train.subset(torch.tensor(chosen, dtype=torch.long)) if chosen else None

    def collator(self, preprocessor: ImageSpec) -> ImageCollator:
        return ImageCollator(preprocessor)

    def compute_metrics(self, outputs: Tensor, labels: Tensor) -> dict[str, float]:
        return {"accuracy": (outputs.argmax(dim=-1) == labels.long()).double().mean().item()}


TASK_FAMILIES.register("image-classification")(ImageClassificationTask.from_config)


# --- preprocessing: decode, convert, resize, cache ------------------------------------------------------------------


def resize(images: Tensor, size: int) -> Tensor:
    """uint8 images (N, C, h, w) to (N, C, size, size): bilinear (half-pixel centres), antialiased when shrinking,
    rounded to the nearest 8-bit value."""
    if images.shape[-2:] == (size, size):
        return images
    out = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def image_tensor(image: Any, mode: str) -> Tensor:
    """A PIL image as a uint8 (C, H, W) tensor in `mode` (`L` or `RGB`)."""
    import numpy as np

    array = np.asarray(image.convert(mode) if image.mode != mode else image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).view(*array.shape[:2], -1).permute(2, 0, 1)


def to_images(pil_images: list[Any], size: int, channels: int) -> Tensor:
    """Decoded images as one uint8 (N, C, size, size) tensor; C is 1 when every image is grayscale (or the model
    takes one channel), else 3. Same-sized images are resized together."""
    gray = channels == 1 or all(image.mode in GRAYSCALE_MODES for image in pil_images)
    mode = "L" if gray else "RGB"
    tensors = [image_tensor(image, mode) for image in pil_images]
    if all(t.shape == tensors[0].shape for t in tensors):
        return resize(torch.stack(tensors), size)
    return torch.cat([resize(t.unsqueeze(0), size) for t in tensors])


def class_index(task: ImageClassificationTask, feature: Any) -> Any:
    """A function from the dataset's label values to positions in `task.labels`: by name when the dataset names its
    classes (or its labels are strings), else integer labels are taken as positions."""
    names = getattr(feature, "names", None)
    where = f"dataset {task.hub_id}, column '{task.label_column}'"
    if names is not None:
        unknown = sorted(set(names) - set(task.labels))
        if unknown:
            raise ConfigError(
                f"task.labels does not name the classes of {where}: it lacks {unknown}; the dataset's classes are "
                f"{list(names)}"
            )
        lookup = [task.labels.index(name) for name in names]
        return lookup.__getitem__
    position = {name: i for i, name in enumerate(task.labels)}

    def index(value: Any) -> int:
        if isinstance(value, str):
            if value not in position:
                raise ConfigError(f"label '{value}' of {where} is not in task.labels {list(task.labels)}")
            return position[value]
        if not 0 <= int(value) < len(task.labels):
            raise ConfigError(f"label {value} of {where} is outside task.labels (0..{len(task.labels) - 1})")
        return int(value)

    return index


@dataclass
class CachedImages:
    images: Tensor
    """uint8 (N, C, S, S)."""
    labels: Tensor
    """int64 (N,)."""


def _cache_key(task: ImageClassificationTask, split: str, spec: ImageSpec, data_dir: Path | None) -> str:
    key = {
        "source": source_stamp(task, data_dir),
        "v": CACHE_VERSION,
        "dataset": task.hub_id,
        "subset": task.subset,
        "split": split,
        "columns": [task.image_column, task.label_column],
        "labels": list(task.labels),
        "size": spec.size,
        "channels": spec.channels,
    }
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def image_split(
    task: ImageClassificationTask, split: str, spec: ImageSpec, cache_dir: Path, data_dir: Path | None
) -> ImageRows:
    """One split at the model's input size, from the cache when it holds it, else preprocessed and cached."""
    key = _cache_key(task, split, spec, data_dir)
    path = cache_dir / "images" / task.name.replace("/", "__") / f"{split}-{key}.pt"
    if not path.is_file():
        cached = preprocess(task, split, spec, data_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        torch.save({"images": cached.images, "labels": cached.labels}, tmp)
        os.replace(tmp, path)  # atomic: a concurrent run sees no cache or a complete one (identical either way)
        log.info("Preprocessed %s/%s (%d images), cached at %s", task.name, split, len(cached.labels), path)
    # Memory-mapped: parallel runs on one machine share the pages instead of each holding a copy.
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return ImageRows(state["images"], state["labels"])


def preprocess(task: ImageClassificationTask, split: str, spec: ImageSpec, data_dir: Path | None) -> CachedImages:
    import datasets

    raw = load_split(task, split, data_dir)
    for column in (task.image_column, task.label_column):
        if column not in raw.column_names:
            option = "image_column" if column == task.image_column else "label_column"
            raise DataMissingError(
                f"task.{option}='{column}' is not a column of dataset {task.hub_id} (split '{split}'); its columns "
                f"are: {', '.join(raw.column_names)}"
            )
    if not isinstance(raw.features[task.image_column], datasets.Image):
        raw = raw.cast_column(task.image_column, datasets.Image())
    index = class_index(task, raw.features[task.label_column])
    raw = raw.select_columns([task.image_column, task.label_column])
    chunks, labels = [], []
    for start in range(0, len(raw), CHUNK):
        rows = raw[start : start + CHUNK]
        chunks.append(to_images(rows[task.image_column], spec.size, spec.channels))
        labels += [index(value) for value in rows[task.label_column]]
    if len({c.shape[1] for c in chunks}) > 1:  # some chunks all grayscale, others in colour: colour for all
        chunks = [c.expand(-1, 3, -1, -1) for c in chunks]
    return CachedImages(torch.cat(chunks), torch.tensor(labels, dtype=torch.long))


# --- examples and batches --------------------------------------------------------------------------------------------


class ImageRows(torch.utils.data.Dataset):
    """Preprocessed images (uint8) and their labels; `augment` flips and shifts each image as it is read."""

    def __init__(self, images: Tensor, labels: Tensor, augment: bool = False):
        self.images = images
        self.labels = labels
        self.augment = augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        image = self.images[i]
        return {"pixel_values": augment(image) if self.augment else image, "labels": self.labels[i]}

    def subset(self, indices: Tensor) -> ImageRows:
        return ImageRows(self.images[indices], self.labels[indices], self.augment)

    def capped(self, limit: int | None) -> ImageRows:
        """A fixed random subset of `limit` examples (the same for every run seed), or all of them."""
        if limit is None or limit >= len(self):
            return self
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(SUBSET_SEED))
        return self.subset(order[:limit].sort().values)


def augment(image: Tensor) -> Tensor:
    """Light augmentation: a horizontal flip half the time and a shift of up to 1/8 of the side in each direction,
    filled with zeros (the pad-and-crop of CIFAR training). Draws from the global RNG, which checkpoints restore."""
    if torch.rand(()) < 0.5:
        image = image.flip(-1)
    side = image.shape[-1]
    reach = side // 8
    if reach == 0:
        return image
    dy, dx = (torch.randint(0, 2 * reach + 1, (2,))).tolist()
    padded = F.pad(image, (reach, reach, reach, reach))
    return padded[..., dy : dy + side, dx : dx + side]


class ImageCollator:
    """Stacks uint8 images into a float batch `(x / 255 - mean) / std` with the model's channels."""

    def __init__(self, spec: ImageSpec):
        self.channels = spec.channels
        std = torch.tensor(spec.std, dtype=torch.float32).view(-1, 1, 1)
        self.scale = 1.0 / (255.0 * std)
        self.shift = torch.tensor(spec.mean, dtype=torch.float32).view(-1, 1, 1) / std

    def __call__(self, rows: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        images = torch.stack([r["pixel_values"] for r in rows])
        if images.shape[1] != self.channels:  # grayscale to the model's colour channels
            images = images.expand(-1, self.channels, -1, -1)
        pixels = images.float().mul_(self.scale).sub_(self.shift)
        return {"pixel_values": pixels, "labels": torch.stack([r["labels"] for r in rows])}
