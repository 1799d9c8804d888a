"""The variant zoo. Every module in this package registers its variant on import; adding a variant is adding a file."""

import importlib
import pkgutil

from lorafactory.variants.base import (
    VARIANTS,
    AdapterLayer,
    Variant,
    VariantConfig,
    adapter_layers,
    adapter_parameters,
    adapter_state_dict,
    build_variant,
    load_adapter_state_dict,
    merge_adapters,
    merge_and_unload,
    unmerge_adapters,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("base", "__main__"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "VARIANTS",
    "AdapterLayer",
    "Variant",
    "VariantConfig",
    "adapter_layers",
    "adapter_parameters",
    "adapter_state_dict",
    "build_variant",
    "load_adapter_state_dict",
    "merge_adapters",
    "merge_and_unload",
    "unmerge_adapters",
]
