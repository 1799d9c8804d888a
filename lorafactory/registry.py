"""Named registries: variant, task and model names are the product of a benchmark (rows, sweep axes, test ids).

A registry maps a lowercase name to an object (a class, a task instance or a builder function) and, for variants, to
the config dataclass that Hydra's ConfigStore serves as the `variant=<name>` option.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from lorafactory.errors import UnknownNameError

T = TypeVar("T")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_./-]*$")


class Registry(Generic[T]):
    """name -> object, with optional config dataclass stored in Hydra's ConfigStore under `group`."""

    def __init__(self, kind: str, group: str | None = None, node_values: dict[str, Any] | None = None):
        self.kind = kind
        self.group = group
        self.node_values = node_values or {}
        """Values the stored config nodes take instead of the dataclass defaults (interpolations into the rest of the
        config: a variant's `targets` default to the model's)."""
        self._items: dict[str, T] = {}
        self._configs: dict[str, type] = {}

    def register(self, name: str, *, config: type | None = None) -> Callable[[T], T]:
        if not _NAME.match(name):
            raise ValueError(f"{self.kind} names are lowercase tokens, got {name!r}")

        def decorator(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = obj
            if config is not None:
                self._configs[name] = config
                if self.group is not None:
                    # The stored node is a config instance with its `name` filled in, so `variant=dora` composes to a
                    # typed DoRAConfig whose overrides Hydra type-checks.
                    node = OmegaConf.structured(config(name=name))
                    for key, value in self.node_values.items():
                        node[key] = value
                    ConfigStore.instance().store(group=self.group, name=name, node=node)
            return obj

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(self.kind, name, self._items) from None

    def config_cls(self, name: str) -> type:
        self.get(name)
        return self._configs[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._items.items())

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind}: {', '.join(self.names())})"
