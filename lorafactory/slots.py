"""Device slots: several runs at a time on one node, each on its own device.

With `trainer.device_slots=N`, a run takes the first free slot among N before it trains and keeps it until its record
is written: an OS file lock per slot (`<paths.runs>/.slots/<host>/slot-<i>.lock`, released by the OS if the process
dies), so concurrent runs of any launcher (joblib workers, several shells, a SLURM job with several tasks on a node)
never share a slot, and a run that finds them all taken waits for one. What a slot means:

- on GPUs (`trainer=gpu`): GPU i (Lightning's `devices=[i]`): N GPUs, N runs at a time, one each;
- on the CPU: core share i: the process is pinned (`sched_setaffinity`) to its own cores and uses as many threads,
  so parallel runs neither oversubscribe nor migrate across each other's cores.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path

POLL_S = 0.5
"""How often a run waiting for a slot looks again."""


def available_cores() -> int:
    """The cores this process may use: `OMP_NUM_THREADS` when set (SLURM jobs and test workers set it), else the CPU
    affinity (a cgroup or `taskset` limit), not the machine's count."""
    configured = os.environ.get("OMP_NUM_THREADS", "")
    if configured.isdigit() and int(configured) > 0:
        return int(configured)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class DeviceSlot:
    """`with DeviceSlot(folder, n) as slot:` holds slot `slot.index` (0 ≤ index < n) for the block."""

    def __init__(self, folder: str | os.PathLike, n: int):
        self.folder = Path(folder)
        self.n = n
        self.index: int | None = None
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        self.folder.mkdir(parents=True, exist_ok=True)
        for i in range(self.n):
            fd = os.open(self.folder / f"slot-{i}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno in (errno.EACCES, errno.EAGAIN):
                    continue
                raise
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()}\n".encode())
            self.index, self._fd = i, fd
            return True
        return False

    def __enter__(self) -> DeviceSlot:
        while not self.try_acquire():
            time.sleep(POLL_S)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd, self.index = None, None


def slot_folder(runs_root: str | os.PathLike) -> Path:
    """Slots are per node: the lock files of one host, under the runs folder (which may be on shared storage)."""
    return Path(runs_root) / ".slots" / socket.gethostname()


def cpu_share(index: int, n: int, cores: list[int]) -> list[int]:
    """The cores of CPU slot `index` of `n`: consecutive equal shares of `cores` (the last takes any remainder)."""
    per = max(1, len(cores) // n)
    start = (index % len(cores)) if per * n > len(cores) else index * per
    end = len(cores) if index == n - 1 and per * n <= len(cores) else start + per
    return cores[start:end]


_ALLOWED: list[int] = []
"""The cores this process was allowed before any pinning (a pooled worker pins itself again for every run)."""


def pin_to_cpu_share(index: int, n: int) -> list[int]:
    """Pin this process to CPU slot `index`'s cores; returns them (all cores where affinity cannot be set)."""
    if not hasattr(os, "sched_setaffinity"):
        return list(range(os.cpu_count() or 1))
    if not _ALLOWED:
        _ALLOWED.extend(sorted(os.sched_getaffinity(0)))
    share = cpu_share(index, n, _ALLOWED)
    os.sched_setaffinity(0, share)
    return share
