"""`hydra/launcher=ray` against a local Ray instance of 2 workers (one for the module: Ray takes seconds to start):
runs execute in Ray's workers and record exactly what the basic launcher records, a failing run is recorded while
the others go on, and the sweep then exits 1."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import ray

from lorafactory.results.record import RunRecord
from tests.test_sweeps import TINY, records, run

# What differs between two executions of the same run: when it ran, and how fast.
TIMINGS = ("step_time_s", "throughput", "peak_memory_mb", "wall_time_s", "started_at", "finished_at", "eval_cost")


def comparable(record: RunRecord, name: str) -> dict:
    """The record without its timings, and with the sweep's name (in its folder, config and overrides) blanked."""
    data = {k: v for k, v in record.to_dict().items() if k not in TIMINGS}
    text = json.dumps(data, sort_keys=True).replace(f"runs/{name}/", "runs/<name>/")
    return json.loads(text.replace(f'"name={name}"', '"name=<name>"').replace(f'"name": "{name}"', '"name": "<name>"'))


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    context = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield context.address_info["address"]
    ray.shutdown()


def test_runs_on_ray_record_what_the_basic_launcher_records(workdir, ray_address, monkeypatch):
    # One thread for the basic launcher's runs too, as each Ray task gets for its one core: the same arithmetic.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    sweep = ["-m", *TINY, "variant.targets=[query],[nothing_here]"]
    on_ray = run(*sweep, "name=ray", "hydra/launcher=ray", f"hydra.launcher.address={ray_address}", cwd=workdir)
    basic = run(*sweep, "name=basic", cwd=workdir)
    assert on_ray.returncode == 1, on_ray.stderr  # the failing run is reported after both ran
    assert basic.returncode == 1, basic.stderr
    assert "(execute_job pid=" in on_ray.stdout + on_ray.stderr  # the runs' output came from Ray's workers

    from_ray, from_basic = records(workdir / "runs" / "ray"), records(workdir / "runs" / "basic")
    assert sorted(from_ray) == sorted(from_basic) and len(from_ray) == 2  # the same run folders
    assert sorted(r.status for r in from_ray.values()) == ["failed", "ok"]
    for folder, expected in from_basic.items():
        got = comparable(from_ray[folder], "ray")
        want = comparable(expected, "basic")
        assert got.keys() == want.keys()
        for key in want:
            assert got[key] == want[key], f"{folder}: {key}"
    [ok] = [r for r in from_ray.values() if r.status == "ok"]
    assert ok.history and ok.selection_metric is not None  # metrics compared above, not just empty fields
