"""Image classification: the image pipeline against hand-computed pixels, label mapping, the preprocessing cache,
folders of images, augmentation, frozen BatchNorm statistics, and the config of vision tasks and models."""

from __future__ import annotations

import copy
from pathlib import Path

import datasets
import pytest
import torch
from conftest import FASHION_CLASSES, fake_images, tiny
from omegaconf import OmegaConf
from PIL import Image

import lorafactory.tasks.vision as vision_module
from lorafactory.config import CONF_DIR
from lorafactory.errors import ConfigError, DataMissingError
from lorafactory.models import ImageSpec, image_spec
from lorafactory.tasks import get_task
from lorafactory.tasks.data import selection_cut
from lorafactory.tasks.vision import ImageCollator, ImageRows, augment, class_index, to_images

FASHION = OmegaConf.load(CONF_DIR / "task" / "vision" / "fashion_mnist.yaml")


def task_cfg(**fields):
    return OmegaConf.merge(FASHION, fields)


def test_a_known_image_becomes_the_expected_tensor():
    """A 2×2 grayscale image, upsampled to 4×4 (bilinear with half-pixel centres, worked out by hand: each output
    pixel mixes its neighbours by 1, ¾/¼ or ¼/¾), rounded to 8 bits, repeated to 3 channels and normalised per channel
    as (x / 255 - mean) / std."""
    image = Image.fromarray(torch.tensor([[0, 200], [100, 40]], dtype=torch.uint8).numpy())
    expected_pixels = torch.tensor(
        [[0, 50, 150, 200], [25, 59, 126, 160], [75, 76, 79, 80], [100, 85, 55, 40]], dtype=torch.float32
    )
    spec = ImageSpec(size=4, channels=3, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    images = to_images([image], spec.size, spec.channels)
    assert images.dtype == torch.uint8 and images.shape == (1, 1, 4, 4)  # grayscale stays one channel in the cache
    assert torch.equal(images[0, 0].float(), expected_pixels)
    batch = ImageCollator(spec)([{"pixel_values": images[0], "labels": torch.tensor(3)}])
    assert batch["pixel_values"].shape == (1, 3, 4, 4) and batch["labels"].tolist() == [3]
    x = expected_pixels / 255
    expected = torch.stack([(x - 0.5) / 0.5, (x - 0.25) / 0.25, x])
    torch.testing.assert_close(batch["pixel_values"][0], expected)


def test_colour_images_keep_three_channels_and_shrink_antialiased():
    stripes = torch.zeros(8, 8, 3, dtype=torch.uint8)
    stripes[:, ::4, 0] = 255  # a red line every 4 columns, then a 4× shrink: antialiasing averages it to a dim red,
    images = to_images([Image.fromarray(stripes.numpy())], 2, 3)  # plain bilinear would sample between lines: 0
    assert images.shape == (1, 3, 2, 2)
    assert images[0, 0].gt(30).all() and images[0, 0].lt(100).all() and images[0, 1:].eq(0).all()
    gray_for_rgb_model = to_images([Image.fromarray(stripes.numpy())], 2, 1)  # a one-channel model gets luminance
    assert gray_for_rgb_model.shape == (1, 1, 2, 2)


def test_images_of_mixed_sizes_and_modes_are_all_resized():
    small, large = Image.new("L", (5, 7), 10), Image.new("RGB", (30, 20), (10, 20, 30))
    images = to_images([small, large], 6, 3)
    assert images.shape == (2, 3, 6, 6)
    assert images[0].eq(10).all() and images[1, 2].eq(30).all()


def test_labels_map_to_the_configured_order_by_name():
    task = get_task(task_cfg(labels=list(reversed(FASHION_CLASSES))))
    index = class_index(task, datasets.ClassLabel(names=FASHION_CLASSES))
    assert [index(i) for i in range(10)] == list(range(9, -1, -1))
    named = class_index(task, datasets.Value("string"))
    assert named("Trouser") == 8
    with pytest.raises(ConfigError, match="label 'Hat'"):
        named("Hat")
    other = get_task(task_cfg(labels=FASHION_CLASSES[:9] + ["Boot"]))
    with pytest.raises(ConfigError, match=r"task.labels does not name the classes .* lacks \['Ankle boot'\]"):
        class_index(other, datasets.ClassLabel(names=FASHION_CLASSES))


def test_splits_are_preprocessed_once_and_cached(fake_mirror, tmp_path, monkeypatch):
    task = get_task(FASHION)
    spec = ImageSpec(size=16)
    train, evaluation = task.splits(spec, FASHION, tmp_path, fake_mirror)
    # A quarter of the mirror's 64 training images is the selection split (the task asks for 1,000): never trained on.
    keep, chosen = selection_cut(64, FASHION.selection_samples)
    assert (len(train), len(evaluation), len(chosen)) == (48, 24, 16)
    assert train.images.shape == (48, 1, 16, 16) and train.images.dtype == torch.uint8
    assert train.labels.tolist() == [i % 10 for i in keep]
    selection = task.selection_set(spec, FASHION, tmp_path, fake_mirror)
    assert selection.labels.tolist() == [i % 10 for i in chosen]
    assert not {tuple(x.flatten().tolist()) for x in selection.images} & {
        tuple(x.flatten().tolist()) for x in train.images
    }
    monkeypatch.setattr(vision_module, "preprocess", lambda *a: pytest.fail("preprocessed again"))
    again, _ = task.splits(spec, FASHION, tmp_path, fake_mirror)
    assert torch.equal(again.images, train.images)
    capped, _ = task.splits(spec, task_cfg(max_train_samples=10), tmp_path, fake_mirror)
    capped_again, _ = task.splits(spec, task_cfg(max_train_samples=10), tmp_path, fake_mirror)
    assert len(capped) == 10 and torch.equal(capped.labels, capped_again.labels)  # a fixed subset
    monkeypatch.undo()
    other_size, _ = get_task(FASHION).splits(ImageSpec(size=8), FASHION, tmp_path / "fresh", fake_mirror)
    assert other_size.images.shape[-1] == 8


def test_a_folder_of_images_is_a_dataset(tmp_path, cache_dir):
    """`dataset: /path/to/folder` laid out as <split>/<class>/<image>: the class names are the folder names."""
    root = tmp_path / "pets"
    images, labels = fake_images(12, seed=3)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / ("train" if i < 8 else "test") / ("cat" if label % 2 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i}.png")
    cfg = OmegaConf.create(
        {
            "name": "vision/pets",
            "family": "image-classification",
            "dataset": str(root),
            "image_column": "image",
            "label_column": "label",
            "labels": ["dog", "cat"],
            "eval_split": "test",
            "train_split": "train",
            "max_train_samples": None,
            "max_eval_samples": None,
        }
    )
    train, evaluation = get_task(cfg).splits(ImageSpec(size=8), cfg, cache_dir, None)
    assert (len(train), len(evaluation)) == (8, 4)
    assert sorted(train.labels.tolist()) == sorted(int(label % 2) for label in labels[:8])  # cat = 1, dog = 0


def test_a_missing_column_or_folder_names_it(fake_mirror, tmp_path):
    with pytest.raises(DataMissingError, match="task.image_column='img' is not a column .* columns are: image, label"):
        get_task(task_cfg(image_column="img")).splits(ImageSpec(size=8), FASHION, tmp_path, fake_mirror)
    with pytest.raises(DataMissingError, match="that folder does not exist"):
        missing = task_cfg(dataset=str(tmp_path / "nowhere"))
        get_task(missing).splits(ImageSpec(size=8), missing, tmp_path, fake_mirror)


def test_augmentation_flips_and_shifts_training_images_only(fake_mirror, tmp_path):
    image = torch.arange(64, dtype=torch.uint8).view(1, 8, 8)
    torch.manual_seed(0)
    seen = [augment(image) for _ in range(50)]
    assert all(out.shape == image.shape and out.dtype == torch.uint8 for out in seen)
    assert any(torch.equal(out, image.flip(-1)) for out in seen) and any(torch.equal(out, image) for out in seen)
    assert any(out.eq(0).sum() > 1 for out in seen), "no shift (zero fill) in 50 draws"
    task = get_task(task_cfg(augment=True))
    train, evaluation = task.splits(ImageSpec(size=16), FASHION, tmp_path, fake_mirror)
    assert train.augment and not evaluation.augment
    assert torch.equal(evaluation[0]["pixel_values"], evaluation.images[0])


def test_rows_subset_keeps_images_and_labels_together():
    rows = ImageRows(torch.arange(5, dtype=torch.uint8).view(5, 1, 1, 1), torch.arange(5))
    part = rows.subset(torch.tensor([4, 1]))
    assert part.images.flatten().tolist() == part.labels.tolist() == [4, 1]


def test_frozen_batchnorm_keeps_its_statistics_in_training():
    """A frozen BatchNorm normalises with its stored statistics in training too (they belong to the frozen base and
    are not in the saved adapter); one trained in full updates them as usual."""
    loaded = tiny("tiny-cnn")
    model = loaded.module.train()
    before = model.stem_bn.running_mean.clone()
    for p in model.parameters():
        p.requires_grad_(False)
    model(pixel_values=torch.randn(4, 3, 16, 16))
    assert torch.equal(model.stem_bn.running_mean, before)
    model.train()
    model.stem_bn.weight.requires_grad_(True)
    model(pixel_values=torch.randn(4, 3, 16, 16))
    assert not torch.equal(model.stem_bn.running_mean, before)


def test_hub_image_processors_give_their_size_and_normalisation():
    from transformers import ViTImageProcessor

    spec = image_spec(ViTImageProcessor(size={"height": 48, "width": 48}, image_mean=[0.5] * 3, image_std=[0.5] * 3))
    assert spec == ImageSpec(size=48, channels=3, mean=(0.5,) * 3, std=(0.5,) * 3)


def test_one_channel_models_average_the_statistics():
    spec = ImageSpec(size=8, channels=1, mean=(0.2, 0.4, 0.6), std=(0.1, 0.2, 0.3))
    assert spec.mean == pytest.approx((0.4,)) and spec.std == pytest.approx((0.2,))


def test_metrics_are_accuracy_and_chance_is_the_majority_class():
    task = get_task(FASHION)
    labels = torch.tensor([0, 0, 0, 1])
    outputs = torch.nn.functional.one_hot(torch.tensor([0, 1, 1, 1]), 10).float()
    assert task.compute_metrics(outputs, labels) == {"accuracy": 0.5}
    assert task.chance_metrics(labels) == {"accuracy": 0.75}
    assert task.direction == "max" and task.modality == "vision" and task.num_labels == 10


@pytest.fixture(scope="module")
def real_mirror() -> Path:
    from conftest import data_dir

    root = data_dir()
    if root is None or not (root / "zalando-datasets" / "fashion_mnist").is_dir():
        pytest.skip("no Fashion-MNIST mirror on this machine")
    return root


@pytest.mark.slow
def test_real_fashion_mnist_preprocesses_to_its_published_size(real_mirror, cache_dir):
    train, evaluation = get_task(FASHION).splits(ImageSpec(size=28), FASHION, cache_dir, real_mirror)
    assert (len(train), len(evaluation)) == (60000, 10000)
    assert torch.bincount(train.labels).tolist() == [6000] * 10


def test_lora_adapts_efficientnets_same_padding_convolutions_where_peft_cannot():
    """EfficientNet-Lite's convolutions pad in their own forward ("same" padding, fixed by the image size) and take
    the image size in their constructor. Ours run the module's own forward with W0 + ΔW (k×k) or in linear form (1×1):
    the adapted layers compute the convolution with the updated weight, unmerged and merged. PEFT's conv LoRA builds
    its lora_A/lora_B with the module's own class and fails on these modules."""
    utils = pytest.importorskip("efficientnet_lite_pytorch.utils")
    peft = pytest.importorskip("peft")
    from lorafactory.variants import build_variant
    from lorafactory.variants.base import merge_and_unload

    torch.manual_seed(0)
    same_pad = utils.Conv2dStaticSamePadding
    base = torch.nn.Sequential(
        same_pad(3, 8, 3, stride=2, image_size=9), torch.nn.ReLU(), same_pad(8, 6, 1, image_size=5)
    )
    with pytest.raises(AssertionError):  # the package asserts image_size is given: PEFT calls the class without it
        peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["0", "2"]))

    ours = copy.deepcopy(base)
    build_variant({"name": "lora", "r": 4, "alpha": 8, "targets": ["0", "2"]}).adapt(ours, head=())
    reference = copy.deepcopy(base)
    with torch.no_grad():
        for name in ("0", "2"):
            layer = ours.get_submodule(name)
            assert layer.kind == ("conv" if name == "0" else "pointwise")
            layer.lora_B.normal_(std=0.1)
            conv = reference.get_submodule(name)
            conv.weight += layer.delta_weight().view_as(conv.weight)
    x = torch.randn(2, 3, 9, 9)
    expected = reference(x)
    assert expected.shape == (2, 6, 5, 5)  # "same" padding at stride 2: ceil(9 / 2)
    torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merge_and_unload(ours)(x), expected, atol=1e-5, rtol=1e-5)
