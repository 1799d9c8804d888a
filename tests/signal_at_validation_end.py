"""`python tests/signal_at_validation_end.py <lorafactory arguments>`: the CLI, with SIGTERM sent to itself at the end
of its first validation, after the last validation batch's hooks (see test_reliability.py): the window where
Lightning itself would stop with SystemExit, exit 0."""

from __future__ import annotations

import os
import runpy
import signal
import sys

from lorafactory.training import module

original = module.AdapterModule.on_validation_epoch_end
sent: list[bool] = []


def then_signal(self):
    original(self)
    if not sent and self.history:
        sent.append(True)
        os.kill(os.getpid(), signal.SIGTERM)


module.AdapterModule.on_validation_epoch_end = then_signal
sys.argv = ["lorafactory", *sys.argv[1:]]
runpy.run_module("lorafactory", run_name="__main__", alter_sys=True)
