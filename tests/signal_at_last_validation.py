"""`python tests/signal_at_last_validation.py <lorafactory arguments>`: the CLI, with SIGTERM sent to itself during
the last validation of its first run, after training is over (see test_reliability.py): a signal that comes when
there is no training step left to stop at."""

from __future__ import annotations

import os
import runpy
import signal
import sys

from lorafactory.training import callbacks

original = callbacks.SignalCheckpoint.on_validation_batch_end
sent: list[bool] = []


def at_last_validation(self, trainer, *args):
    if trainer.global_step >= trainer.max_steps > 0 or trainer.global_step >= trainer.estimated_stepping_batches:
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)
    return original(self, trainer, *args)


callbacks.SignalCheckpoint.on_validation_batch_end = at_last_validation
sys.argv = ["lorafactory", *sys.argv[1:]]
runpy.run_module("lorafactory", run_name="__main__", alter_sys=True)
