"""lorafactory: benchmark LoRA variants behind one interface, with fair learning-rate sweeps.

`lorafactory.adapt(model, "dora", r=16, targets=...)` puts any variant into a training loop of your own
(`lorafactory.api`); `python -m lorafactory` (or `lorafactory`) runs, sweeps and reports."""

from __future__ import annotations

import logging
from typing import Any

__version__ = "0.1.0"
__all__ = ["Adapted", "adapt"]

# On AVX512-BF16 CPUs bitsandbytes warns at import that an optional accelerated kernel package (`kernels`) is missing;
# nothing here uses that kernel, and the line would be the only stderr of a user-error exit.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def __getattr__(name: str) -> Any:
    # Imported on first use: `python -m lorafactory --help` must not pay for torch.
    if name in __all__:
        from lorafactory import api

        return getattr(api, name)
    raise AttributeError(f"module 'lorafactory' has no attribute {name!r}")
