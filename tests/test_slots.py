"""Device slots: concurrent runs of one node never share a slot, a run waits for a free one, a dead holder's slot is
free again, and a run records the slot it trained on (on the CPU: the cores it was pinned to)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from test_sweeps import TINY, records, run

from lorafactory.slots import DeviceSlot, cpu_share


def holder(folder, n: int) -> subprocess.Popen:
    """Another process that takes a slot and holds it until its stdin closes; prints the slot's index."""
    code = (
        "from lorafactory.slots import DeviceSlot\n"
        f"with DeviceSlot({str(folder)!r}, {n}) as s:\n print(s.index, flush=True)\n input()"
    )
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def test_concurrent_holders_get_distinct_slots_and_the_next_one_waits(tmp_path):
    first, second = holder(tmp_path, 2), None
    try:
        assert first.stdout.readline().strip() == "0"
        second = holder(tmp_path, 2)
        assert second.stdout.readline().strip() == "1"
        assert not DeviceSlot(tmp_path, 2).try_acquire()  # both taken
        first.communicate("\n", timeout=60)  # slot 0 freed
        with DeviceSlot(tmp_path, 2) as slot:
            assert slot.index == 0
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.communicate("\n", timeout=60)


def test_a_killed_holders_slot_is_free_again(tmp_path):
    first = holder(tmp_path, 1)
    assert first.stdout.readline().strip() == "0"
    first.kill()
    first.wait()
    started = time.monotonic()
    with DeviceSlot(tmp_path, 1) as slot:
        assert slot.index == 0 and time.monotonic() - started < 5


@pytest.mark.parametrize(
    ("n", "cores", "expected"),
    [
        (2, [0, 1, 2, 3], [[0, 1], [2, 3]]),
        (2, [0, 1, 2, 3, 4], [[0, 1], [2, 3, 4]]),  # the last share takes the remainder
        (4, [0, 1], [[0], [1], [0], [1]]),  # more slots than cores: one core each, shared in turn
        (1, [3, 5], [[3, 5]]),
    ],
)
def test_cpu_shares(n, cores, expected):
    assert [cpu_share(i, n, cores) for i in range(n)] == expected


def test_a_run_records_its_slot_and_trains_on_its_cores(workdir):
    result = run(*TINY, "trainer.device_slots=2", "name=slotted", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    [record] = records(workdir / "runs").values()
    cores = sorted(os.sched_getaffinity(0))
    assert record.device == "cpu:" + ",".join(map(str, cpu_share(0, 2, cores)))
    assert (workdir / "runs" / ".slots").is_dir()
