"""Configs: every option of every group composes and resolves; registries and YAML agree; run folders are
deterministic; impossible values fail with messages that name the override."""

from __future__ import annotations

import re

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict, read_write

from lorafactory.config import CONF_DIR, GROUPS, group_options, run_id
from lorafactory.errors import ConfigError
from lorafactory.models import MODELS, build_model, unfreeze
from lorafactory.variants import VARIANTS, build_variant
from lorafactory.variants.base import AdapterLayer, find_targets

# Options that cannot compose on their own say what they need.
NEEDS = {("model", "hub"): ["model.id=FacebookAI/roberta-base"]}


def compose_with(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    # What Hydra fills in when it really runs a job, so ${hydra:...} interpolations resolve as they do then.
    HydraConfig.instance().set_config(cfg)
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.runtime.output_dir = cfg.hydra.run.dir
    HydraConfig.instance().set_config(cfg)
    return cfg


ALL_OPTIONS = [(g, o) for g in GROUPS for o in group_options(g)]


@pytest.mark.parametrize(("group", "option"), ALL_OPTIONS, ids=[f"{g}={o}" for g, o in ALL_OPTIONS])
def test_every_option_composes_and_resolves(group, option):
    cfg = compose_with([f"{group}={option}", *NEEDS.get((group, option), [])])
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["hydra"]["run"]["dir"].startswith("runs/")
    if group in ("optim", "scheduler"):
        assert callable(instantiate(cfg[group].optimizer if group == "optim" else cfg[group]))
    if group == "logger" and cfg.logger and option != "wandb":
        assert instantiate(cfg.logger) is not None


def test_every_group_has_options_and_the_defaults_exist():
    cfg = compose_with([])
    for group in ("model", "variant", "task", "optim", "scheduler", "trainer", "logger"):
        assert group_options(group), group
    assert cfg.model.name == "minilm-l6" and cfg.variant.name == "lora" and cfg.task.name == "glue/sst2"


def test_registries_and_config_options_agree():
    assert set(VARIANTS.names()) <= set(group_options("variant"))
    for option in group_options("variant"):  # YAML presets must extend a registered variant
        assert compose_with([f"variant={option}"]).variant.name in VARIANTS
    for option in group_options("model"):
        assert OmegaConf.load(CONF_DIR / "model" / f"{option}.yaml").builder in MODELS


@pytest.mark.parametrize("name", VARIANTS.names())
def test_variant_overrides_are_type_checked(name):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose_with([f"variant={name}", "variant.r=abc"])


def test_learning_rate_is_task_rate_times_variant_multiplier_times_scale():
    cfg = compose_with(["task=glue/rte", "variant=loraplus", "optim.lr_scale=4"])
    assert cfg.optim.lr == pytest.approx(cfg.task.lr * cfg.variant.lr_mult * 4)
    assert compose_with(["optim.lr=3e-4"]).optim.lr == pytest.approx(3e-4)


def test_run_folder_is_deterministic_and_ignores_what_does_not_change_training():
    assert run_id(["optim.lr=1e-4", "variant.r=16"], 0) == run_id(["variant.r=16.0", "optim.lr=0.0001"], 0)
    assert run_id(["optim.lr=1e-4"], 0) != run_id(["optim.lr=3e-4"], 0)
    assert run_id(["optim.lr=1e-4"], 0).endswith("-s0") and run_id(["optim.lr=1e-4"], 2).endswith("-s2")
    # group choices are folders of the path already; launcher, logger and naming do not change the result
    assert run_id(["variant=dora", "task=glue/cola", "logger=none", "hydra/launcher=joblib", "name=x"], 1) == (
        "default-s1"
    )
    assert run_id(["task.max_train_samples=64"], 0) != "default-s0"
    run_dir = compose_with(["variant=dora", "optim.lr=1e-3", "seed=3"]).hydra.run.dir
    assert run_dir == f"runs/default/minilm-l6/glue/sst2/dora/{run_id(['optim.lr=1e-3'], 3)}"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"r": 0}, "variant.r must be >= 1, got 0"),
        ({"alpha": -1.0}, "variant.alpha must be > 0, got -1.0"),
        ({"dropout": 1.5}, "variant.dropout must be in [0, 1)"),
        ({"targets": "everything"}, "variant.targets must be one of"),
        ({"lr_mult": 0}, "variant.lr_mult must be > 0"),
        ({"nope": 1}, "variant 'lora' has no option variant.nope"),
    ],
)
def test_impossible_variant_values_name_the_override(values, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_variant({"name": "lora", **values})


def test_targets_that_match_nothing_name_the_override_and_the_real_names():
    from conftest import tiny

    loaded = tiny("tiny-llama")
    with pytest.raises(ConfigError, match=r"variant.targets: 'query' .* matched no nn.Linear.*q_proj"):
        find_targets(loaded.module, ["query"], loaded.head)


def test_cluster_launcher_preset_composes_to_submitit():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = compose_with(["hydra/launcher=slurm", "hydra.launcher.partition=gpu"])
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.partition == "gpu" and cfg.hydra.launcher.tasks_per_node == 1


def test_modules_trained_in_full_join_the_head_and_are_never_adapted():
    from conftest import tiny_cfg

    cfg = tiny_cfg("tiny-bert")
    cfg.train_in_full = ["pooler"]
    loaded = build_model(cfg, 2)
    assert "bert.pooler" in loaded.head
    variant = build_variant({"name": "lora", "targets": "all-linear"})
    variant.adapt(loaded.module, head=loaded.head)
    unfreeze(loaded.module, loaded.head)
    pooler = loaded.module.bert.pooler.dense
    assert type(pooler) is torch.nn.Linear and pooler.weight.requires_grad
    assert isinstance(loaded.module.bert.encoder.layer[0].attention.self.query, AdapterLayer)


def test_a_task_asks_for_modules_in_full_only_where_the_model_has_them():
    from conftest import tiny, tiny_cfg

    for name, expected in (("tiny-bert", {"bert.pooler"}), ("tiny-llama", set())):
        plain = tiny(name, 2).head
        wished = build_model(tiny_cfg(name), 2, task_head=["pooler"]).head
        assert set(wished) - set(plain) == expected


def test_a_module_to_train_in_full_that_does_not_exist_names_the_override():
    from conftest import tiny_cfg

    cfg = tiny_cfg("tiny-llama")
    cfg.train_in_full = ["pooler"]
    with pytest.raises(ConfigError, match=r"model.train_in_full=\['pooler'\]: tiny-llama has no module.*model"):
        build_model(cfg, 2)


@pytest.mark.parametrize(
    ("overrides", "targets"),
    [
        (["model=tiny-bert"], "attn"),
        (["model=tiny-cnn", "task=vision/fashion_mnist"], "pointwise"),
        (["model=efficientnet-lite0", "task=vision/fashion_mnist", "variant=dora"], "pointwise"),
        (["model=tiny-cnn", "task=vision/fashion_mnist", "variant.targets=all-conv"], "all-conv"),
    ],
)
def test_variant_targets_default_to_the_models(overrides, targets):
    """`model.targets` is each variant's default on that model, so `variant=dora` works on a conv net as it is; a
    `variant.targets` override still wins."""
    cfg = compose_with(overrides)
    assert build_variant(cfg.variant).cfg.targets == targets


def test_a_hub_vision_model_takes_image_tasks():
    from lorafactory.config import check_overrides

    overrides = ["model=hub", "model.modality=vision", "model.id=google/vit-base-patch16-224"]
    check_overrides([*overrides, "task=vision/fashion_mnist"])  # no error: the config is right without the network
    assert compose_with([*overrides, "task=vision/fashion_mnist"]).model.name == "google--vit-base-patch16-224"
