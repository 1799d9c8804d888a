"""Shared fixtures: tiny random models built from the project's own model configs, and batches for them."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

# Never reach for the network from tests, and keep the suite's caches out of the user's home.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="hf-datasets-")
# On several pytest-xdist workers, one CPU thread each, and the same for the trainings they launch: workers × default
# threads oversubscribe the cores, and OpenMP threads spinning at their barriers then slow a step tenfold and more
# (a relaunched tiny run took over 10 min in CI instead of 35 s).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], ignore_errors=True)

from lorafactory.config import CONF_DIR  # noqa: E402
from lorafactory.models import LoadedModel, build_model  # noqa: E402

TINY_MODELS = ("tiny-bert", "tiny-llama", "tiny-vit", "tiny-cnn")
# The two target presets each family is tested with: a narrow one and everything adaptable.
MODEL_TARGETS = {"tiny-cnn": ("pointwise", "all-conv")}
DEFAULT_TARGETS = ("attn", "all-linear")


def targets_for(model: str) -> tuple[str, str]:
    return MODEL_TARGETS.get(model, DEFAULT_TARGETS)


SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def data_dir() -> Path | None:
    """The offline dataset mirror, if this machine has one (CI and dev machines do)."""
    configured = os.environ.get("LORAFACTORY_DATA_DIR")
    if configured and Path(configured).is_dir():
        return Path(configured)
    return SHARED_DATA if SHARED_DATA.is_dir() else None


def tiny_cfg(name: str):
    return OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml")


def tiny(name: str, num_labels: int = 3) -> LoadedModel:
    return build_model(tiny_cfg(name), num_labels)


def batch_for(loaded: LoadedModel, batch_size: int = 3, seq: int = 10, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    num_labels = loaded.module.config.num_labels
    labels = torch.randint(0, num_labels, (batch_size,), generator=g)
    if loaded.modality == "vision":
        cfg = loaded.module.config
        pixels = torch.randn(batch_size, cfg.num_channels, cfg.image_size, cfg.image_size, generator=g)
        # Each image its own colour cast, as photos have: pixel noise alone averages out in a conv net's global
        # pooling, leaving a linear probe on a random net nothing to tell the images apart by.
        pixels += torch.randn(batch_size, cfg.num_channels, 1, 1, generator=g)
        return {"pixel_values": pixels, "labels": labels}
    vocab = loaded.module.config.vocab_size
    ids = torch.randint(1000, vocab, (batch_size, seq), generator=g)
    mask = torch.ones(batch_size, seq, dtype=torch.long)
    mask[0, seq - 3 :] = 0  # one padded example, so masking is exercised
    ids[0, seq - 3 :] = loaded.tokenizer.pad_token_id
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@functools.cache
def icm_generator(model: str, targets: str, r: int) -> str:
    """A small ICM-LoRA generator file for a tiny model's LoRA (`targets`, `r`, the tiny default 3-label head), fit
    in a few epochs on noisy copies of a LoRA state for two toy tasks (`batch_for` seeds 0 and 1): what icm_lora's
    `variant.generator` needs where a test only exercises the variant's plumbing. Built once per session."""
    from lorafactory import icm
    from lorafactory.models import unfreeze
    from lorafactory.variants import adapter_state_dict, build_variant

    with torch.random.fork_rng():  # the caller's random state stays as it was
        torch.manual_seed(0)
        loaded = tiny(model)
        build_variant({"name": "lora", "targets": targets, "r": r}).adapt(loaded.module, head=loaded.head)
        unfreeze(loaded.module, loaded.head)
        template = adapter_state_dict(loaded.module)
        states, tasks, vectors = [], [], {}
        for task in ("toy0", "toy1"):
            vectors[task] = icm.task_vector(loaded.module, [batch_for(loaded, 4, seed=len(vectors))], 4)
            for _ in range(2):
                states.append({k: v + 0.02 * torch.randn(v.shape) for k, v in template.items()})
                tasks.append(task)
        generator = icm.fit(states, tasks, vectors, model=model, r=r, scaling=16.0 / r, examples=4, epochs=5)
    return str(generator.save(Path(ICM_GENERATORS) / f"{model}-{targets}-r{r}.pt"))


ICM_GENERATORS = tempfile.mkdtemp(prefix="icm-generators-")
atexit.register(shutil.rmtree, ICM_GENERATORS, ignore_errors=True)

CONTRACT_CONFIG = {"icm_lora": lambda model, targets, r: {"generator": icm_generator(model, targets, r)}}
"""What a variant needs beyond name, targets and r for its hooks to run, per (model, targets, r), in tests that build
every registered variant: icm_lora's generator file."""


def contract_config(variant: str, model: str, targets: str, r: int) -> dict:
    return CONTRACT_CONFIG[variant](model, targets, r) if variant in CONTRACT_CONFIG else {}


@pytest.fixture(params=TINY_MODELS)
def tiny_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "lorafactory-cache"


GLUE_README = """---
configs:
- config_name: sst2
  data_files:
  - split: train
    path: sst2/train-00000-of-00001.parquet
  - split: validation
    path: sst2/validation-00000-of-00001.parquet
- config_name: stsb
  data_files:
  - split: train
    path: stsb/train-00000-of-00001.parquet
  - split: validation
    path: stsb/validation-00000-of-00001.parquet
- config_name: qnli
  data_files:
  - split: validation
    path: qnli/validation-00000-of-00001.parquet
---
"""


@pytest.fixture(scope="session")
def fake_mirror(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny dataset mirror in the Hub layout (as ../shared/data is), so data tests need no real data."""
    import pandas as pd

    root = tmp_path_factory.mktemp("mirror")
    glue = root / "nyu-mll" / "glue"
    words = ["good", "bad", "fine", "awful", "great", "dull", "fun", "slow"]

    def sentences(n: int, k: int) -> list[str]:
        # distinct examples (the number), of varied length (the words)
        return [f"{i} " + " ".join(words[(i * 3 + j + k) % len(words)] for j in range(2 + i % 5)) for i in range(n)]

    frames = {
        ("sst2", "train"): pd.DataFrame({"sentence": sentences(64, 0), "label": [i % 2 for i in range(64)]}),
        ("sst2", "validation"): pd.DataFrame({"sentence": sentences(24, 1), "label": [i % 2 for i in range(24)]}),
        ("stsb", "train"): pd.DataFrame(
            {"sentence1": sentences(40, 0), "sentence2": sentences(40, 2), "label": [i % 6 * 1.0 for i in range(40)]}
        ),
        ("stsb", "validation"): pd.DataFrame(
            {"sentence1": sentences(20, 1), "sentence2": sentences(20, 3), "label": [i % 6 * 1.0 for i in range(20)]}
        ),
        ("qnli", "validation"): pd.DataFrame(
            {"question": sentences(50, 0), "sentence": sentences(50, 4), "label": [i % 2 for i in range(50)]}
        ),
    }
    for (subset, split), frame in frames.items():
        frame["idx"] = range(len(frame))
        (glue / subset).mkdir(parents=True, exist_ok=True)
        frame.to_parquet(glue / subset / f"{split}-00000-of-00001.parquet")
    (glue / "README.md").write_text(GLUE_README)
    _fake_nlg_data(root, sentences)
    write_image_mirror(root / "zalando-datasets" / "fashion_mnist")
    return root


FASHION_CLASSES = [
    "T - shirt / top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
FASHION_README = """---
configs:
- config_name: fashion_mnist
  data_files:
  - split: train
    path: fashion_mnist/train-00000-of-00001.parquet
  - split: test
    path: fashion_mnist/test-00000-of-00001.parquet
---
"""


def fake_images(n: int, seed: int) -> tuple[list, list[int]]:
    """n 28×28 grayscale images whose class is where a bright block sits (learnable), over noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(n):
        label = i % len(FASHION_CLASSES)
        pixels = rng.integers(0, 60, (28, 28), dtype=np.uint8)
        row, col = divmod(label, 4)
        pixels[row * 9 : row * 9 + 9, col * 7 : col * 7 + 7] = 230
        images.append(Image.fromarray(pixels))  # 2-D uint8: grayscale ("L")
        labels.append(label)
    return images, labels


def write_image_mirror(folder: Path) -> None:
    """Fashion-MNIST's layout in the Hub mirror (PNG bytes in parquet, a ClassLabel with the class names), tiny."""
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=FASHION_CLASSES)})
    for split, n, seed in (("train", 64, 0), ("test", 24, 1)):
        images, labels = fake_images(n, seed)
        dataset = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
        (folder / "fashion_mnist").mkdir(parents=True, exist_ok=True)
        dataset.to_parquet(folder / "fashion_mnist" / f"{split}-00000-of-00001.parquet")
    (folder / "README.md").write_text(FASHION_README)


def _hub_layout(folder: Path, splits: dict, config: str = "default", sub: str = "data") -> None:
    """Parquet files and a README with `configs:` as the Hub (and ../shared/data) lay them out."""
    (folder / sub).mkdir(parents=True, exist_ok=True)
    lines = ["---", "configs:", f"- config_name: {config}", "  data_files:"]
    for split, frame in splits.items():
        frame.to_parquet(folder / sub / f"{split}-00000-of-00001.parquet")
        lines += [f"  - split: {split}", f"    path: {sub}/{split}-00000-of-00001.parquet"]
    (folder / "README.md").write_text("\n".join([*lines, "---", ""]))


def _fake_nlg_data(root: Path, sentences) -> None:
    """E2E, GSM8K, Alpaca, AG News (held-out text) in the Hub layout, and LLM-Adapters' commonsense JSON: just enough
    rows for each task's carved validation (and Alpaca's carved test) sets."""
    import json

    import pandas as pd

    foods = ["French", "Italian", "Indian", "English", "Chinese"]

    def e2e(n: int, k: int) -> pd.DataFrame:
        rows = []
        for i in range(n):
            mr = f"name[Place {i + k}], food[{foods[i % 5]}], area[riverside]"
            for ref in (f"Place {i + k} serves {foods[i % 5]} food by the river.", f"By the river, Place {i + k}."):
                rows.append({"meaning_representation": mr, "human_reference": ref})
        return pd.DataFrame(rows)

    _hub_layout(root / "tuetschek" / "e2e_nlg", {"validation": e2e(40, 0), "test": e2e(12, 100)})

    def gsm8k(n: int, k: int) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "question": [f"Tom has {i + k} apples and buys {i} more. How many apples?" for i in range(n)],
                "answer": [
                    f"{i + k} + {i} = <<{i + k}+{i}={2 * i + k}>>{2 * i + k}\n#### {2 * i + k}" for i in range(n)
                ],
            }
        )

    _hub_layout(root / "openai" / "gsm8k", {"train": gsm8k(80, 3), "test": gsm8k(12, 50)}, config="main", sub="main")
    alpaca = pd.DataFrame(
        {
            "instruction": [f"Repeat the word number {i}." for i in range(520)],
            "input": ["" if i % 3 else f"word {i}" for i in range(520)],
            "output": sentences(520, 2),
        }
    )
    _hub_layout(root / "tatsu-lab" / "alpaca", {"train": alpaca})
    news = pd.DataFrame({"text": sentences(30, 5), "label": [i % 4 for i in range(30)]})
    _hub_layout(root / "fancyzhx" / "ag_news", {"train": news, "test": news})

    def boolq(n: int, k: int) -> list[dict]:
        out = []
        for i in range(n):
            answer = "true" if (i + k) % 3 else "false"
            out.append(
                {
                    "instruction": f"Please answer the following question with true or false, question: is {i} "
                    f"small?\n\nAnswer format: true/false",
                    "input": "",
                    "output": f"the correct answer is {answer}",
                    "answer": answer,
                }
            )
        return out

    (root / "llm-adapters" / "boolq").mkdir(parents=True)
    (root / "llm-adapters" / "boolq" / "train.json").write_text(json.dumps(boolq(80, 0)))
    (root / "llm-adapters" / "boolq" / "test.json").write_text(json.dumps(boolq(10, 1)))


@pytest.fixture
def workdir(tmp_path: Path, fake_mirror: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder to run commands in, with the fake mirror as data and a shared tokenisation cache."""
    monkeypatch.setenv("LORAFACTORY_DATA_DIR", str(fake_mirror))
    monkeypatch.setenv("LORAFACTORY_CACHE", str(cache_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def skip_where_bnb_misplaces_partial_rows() -> None:
    """Skip a parity test with PEFT where bitsandbytes' CPU `dequantize_4bit` is wrong for rows that are not whole
    blocks (bitsandbytes 0.50 on AVX512-BF16 CPUs): PEFT dequantizes through it, so the reference itself is wrong
    there (ours dequantizes such shapes by the codebook lookup). The check: the same codes read as a 40 × 96 matrix
    and as whole 64-value blocks must give the same values."""
    import copy

    import bitsandbytes.functional as bnbf

    weight = torch.randn(40, 96, generator=torch.Generator().manual_seed(0))
    packed, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=False, quant_type="nf4")
    aligned = copy.copy(state)
    aligned.shape = torch.Size((60, 64))
    if not torch.equal(
        bnbf.dequantize_4bit(packed, state).reshape(-1), bnbf.dequantize_4bit(packed, aligned).reshape(-1)
    ):
        pytest.skip("bitsandbytes' CPU dequantize_4bit is wrong for rows that are not whole blocks on this CPU")
