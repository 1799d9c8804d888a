"""Errors a user can act on. The CLI prints them as one line and exits non-zero, without a traceback."""

from __future__ import annotations

import difflib
import os
import socket
from collections.abc import Iterable
from functools import cache


class UserError(Exception):
    """A mistake in the command line, the config or the environment; the message says how to fix it."""


class ConfigError(UserError, ValueError):
    """An impossible config value. The message names the override, e.g. `variant.r must be >= 1, got 0`."""


class UnknownNameError(UserError, KeyError):
    """A name that is not registered. The message lists the valid names."""

    def __init__(self, kind: str, name: str, valid: Iterable[str]):
        valid = sorted(valid)
        close = difflib.get_close_matches(name, valid, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        super().__init__(f"unknown {kind} '{name}'.{hint} Valid: {', '.join(valid)}")

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class DataMissingError(UserError):
    """A dataset is not available offline and could not be downloaded."""


class Diverged(RuntimeError):
    """The training loss became NaN or infinite; the run is recorded with status `diverged`."""


def check(condition: bool, message: str) -> None:
    """Raise a ConfigError with `message` unless `condition` holds (validation in config `__post_init__`)."""
    if not condition:
        raise ConfigError(message)


@cache
def hub_reachable() -> bool:
    """Whether the Hugging Face Hub can be reached: honours HF_HUB_OFFLINE, else tries a connection for 2 seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=2.0).close()
        return True
    except OSError:
        return False
