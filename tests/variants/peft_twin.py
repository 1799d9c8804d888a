"""A tiny model adapted by one of our variants next to a copy of it adapted by PEFT's same method, for the parity
tests of the variants PEFT has."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from conftest import tiny

from lorafactory.models import LoadedModel, unfreeze
from lorafactory.variants import build_variant
from lorafactory.variants.base import Variant, find_targets


def with_peft_twin(model: str | LoadedModel, config: dict[str, Any]) -> tuple[LoadedModel, Variant, Any, list[str]]:
    """(ours, the variant, PEFT's twin, the target names): `model` (a tiny model's name, or one already built) adapted
    by `config` (targets all-linear unless it says otherwise), and a copy of it taken before, adapted by PEFT with
    `Variant.peft_config`. Skips the test when PEFT is not installed."""
    peft = pytest.importorskip("peft")
    loaded = tiny(model) if isinstance(model, str) else model
    config = {"targets": "all-linear", **config}
    theirs = copy.deepcopy(loaded.module)
    names = find_targets(loaded.module, config["targets"], loaded.head)
    variant = build_variant(config)
    variant.adapt(loaded.module, head=loaded.head)
    unfreeze(loaded.module, loaded.head)
    return loaded, variant, peft.get_peft_model(theirs, variant.peft_config(names, list(loaded.head))), names
