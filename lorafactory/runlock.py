"""One owner per run folder: an OS file lock on `<run folder>/.lock`, taken before anything in the folder is read.

`lockf` locks work on local disks and on NFS (through the NFS lock manager), and the OS releases them when their
process dies, so a lock left by a killed run (SIGKILL, a node lost, a SLURM requeue) is simply free for the next
launch. The file holds the owner's pid and host, for the message a second launch prints.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from pathlib import Path

LOCK_NAME = ".lock"


class RunningElsewhere(Exception):
    """The run folder is owned by another live process."""

    def __init__(self, run_dir: Path, owner: str):
        super().__init__(f"running elsewhere ({owner}): {run_dir}")
        self.run_dir = run_dir


class RunLock:
    """`with RunLock(run_dir):` holds the folder's lock for the block; raises RunningElsewhere if it is taken."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EACCES, errno.EAGAIN):
                raise RunningElsewhere(self.run_dir, owner(self.run_dir)) from None
            raise
        # Write the owner through the locked descriptor: opening the file again and closing that descriptor would
        # release the lock (POSIX locks belong to the process and die with any of its descriptors to the file).
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def owner(run_dir: str | os.PathLike) -> str:
    """Who holds (or last held) the folder's lock, as its lock file says."""
    try:
        return (Path(run_dir) / LOCK_NAME).read_text().strip() or "owner unknown"
    except OSError:
        return "owner unknown"


def is_locked(run_dir: str | os.PathLike) -> bool:
    """Whether a live process holds the folder's lock (probed without keeping it)."""
    path = Path(run_dir) / LOCK_NAME
    if not path.exists():
        return False
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.lockf(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)
