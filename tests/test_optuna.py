"""`hydra/sweeper=optuna`: a real search on a tiny model, whose trials are ordinary runs (folders, records, report),
whose objective is each record's selection metric, and which a relaunch replays without running its trials again; and
how the search space and the trials' outcomes are read."""

from __future__ import annotations

import json

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from optuna.distributions import CategoricalDistribution, FloatDistribution

from hydra_plugins.lorafactory_optuna import format_value, split_space, trial_outcome
from lorafactory.results.record import RunRecord, read_record
from tests.test_sweeps import TINY, records, run

# The rank's choices from the command line (replacing the configured 4, 8, 16, 32); the rate's range as configured.
SEARCH = ["-m", "hydra/sweeper=optuna", *TINY, "variant.r=choice(4,8)", "name=search"]
SEARCH.append("hydra.sweeper.optuna.n_startup_trials=2")  # TPE itself proposes the third and fourth trials


def test_a_search_records_its_trials_like_any_run_and_a_relaunch_replays_it(workdir):
    first = run(*SEARCH, "hydra.sweeper.optuna.n_trials=3", cwd=workdir)
    assert first.returncode == 0, first.stderr
    root = workdir / "runs" / "search"
    found = records(root)
    assert len(found) == 3 and all(r.status == "ok" for r in found.values())
    assert all(folder.startswith("tiny-bert/glue/sst2/lora/") for folder in found)
    # The selection metric differs from the reported one here: a search scoring the reported one fails below.
    assert any(r.selection_metric != r.final_metric for r in found.values())
    [study] = json.loads((root / "optuna.json").read_text())["studies"]
    assert study["direction"] == "maximize" and len(study["trials"]) == 3
    for trial in study["trials"]:
        [folder] = trial["runs"]
        record = found[folder]
        assert trial["state"] == "complete" and trial["value"] == record.selection_metric
        # The trial's values are what the run trained with: the rate a multiple of the variant's default.
        values = dict(o.split("=") for o in trial["overrides"])
        assert record.config["variant"]["r"] == int(values["variant.r"]) and values["variant.r"] in ("4", "8")
        assert record.lr == pytest.approx(2e-3 * float(values["optim.lr_scale"]), rel=1e-6)
        assert 0.125 <= float(values["optim.lr_scale"]) <= 8
    assert len({tuple(t["overrides"]) for t in study["trials"]}) == 3
    assert study["best"]["value"] == max(t["value"] for t in study["trials"])
    written = {folder: (root / folder / "result.json").read_bytes() for folder in found}

    # Launched again, the search proposes the same three trials (seeded, told the same values), finds them done and
    # runs none again; the fourth trial it was asked for extends the search.
    longer = run(*SEARCH, "hydra.sweeper.optuna.n_trials=4", cwd=workdir)
    assert longer.returncode == 0, longer.stderr
    assert (longer.stdout + longer.stderr).count("Skipping (done)") == 3
    assert "skipped by this launch  3" in longer.stdout  # the sweep's summary knows of them
    assert {folder: (root / folder / "result.json").read_bytes() for folder in found} == written
    assert len(records(root)) == 4
    [extended] = json.loads((root / "optuna.json").read_text())["studies"]
    assert extended["trials"][:3] == study["trials"] and extended["trials"][3]["state"] == "complete"

    report = run("runs/search", "--out", "reports/search", cwd=workdir, module="lorafactory.report")
    assert report.returncode == 0, report.stderr
    table = (workdir / "reports" / "search" / "leaderboard.csv").read_text().splitlines()
    rows = [dict(zip(table[0].split(","), line.split(","), strict=False)) for line in table[1:]]
    # Each rank tried is a configuration of its own, a row of its own (never pooled as seeds of one); the row of the
    # best trial's rank chooses on the selection metric as the search did, and reports that run's validation score.
    rank_of = {id(t): dict(o.split("=") for o in t["overrides"])["variant.r"] for t in extended["trials"]}
    assert sorted(r["variant"] for r in rows) == sorted({f"lora[r={r}]" for r in rank_of.values()})
    best = max(extended["trials"], key=lambda t: t["value"])
    [row] = [r for r in rows if r["variant"] == f"lora[r={rank_of[id(best)]}]"]
    assert float(row["mean"]) == pytest.approx(read_record(root / best["runs"][0]).final_metric)


def parse(*overrides: str) -> list:
    return OverridesParser.create().parse_overrides(list(overrides))


def test_plain_values_and_comma_lists_are_the_grid_and_the_rest_is_searched():
    axes, space = split_space(
        parse(
            "variant=lora,dora",
            "task=glue/rte",
            "variant.r=choice(4,8)",
            "optim.lr_scale=tag(log, interval(0.125, 8))",
            "variant.alpha=interval(1, 32)",
            "variant.dropout=range(0, 3)",
        )
    )
    assert axes == {"variant": ["variant=lora", "variant=dora"], "task": ["task=glue/rte"]}
    assert space["variant.r"] == CategoricalDistribution(["4", "8"])
    assert space["optim.lr_scale"] == FloatDistribution(0.125, 8.0, log=True)
    assert space["variant.alpha"] == FloatDistribution(1.0, 32.0)
    assert space["variant.dropout"] == CategoricalDistribution(["0", "1", "2"])


def test_the_command_line_replaces_the_configured_space():
    axes, space = split_space(parse("variant.r=choice(4,8)", "optim.lr_scale=interval(0.5, 2)", "variant.r=16"))
    assert axes == {"variant.r": ["variant.r=16"]} and list(space) == ["optim.lr_scale"]
    with pytest.raises(ValueError, match="seed cannot be searched"):
        split_space(parse("seed=choice(0,1)"))


def test_trial_values_are_stable_overrides():
    assert format_value("optim.lr_scale", 0.7071067811865476) == "optim.lr_scale=0.707107"
    assert format_value("optim.lr_scale", 1 / 3 * 1e-4) == "optim.lr_scale=3.33333e-05"
    assert format_value("variant.r", "16") == "variant.r=16"


def record(status: str, selection: float | None = 0.5, final: float | None = 0.9) -> RunRecord:
    return RunRecord(
        status=status, model="m", task="t", variant="lora", seed=0, lr=1e-3, selection_metric=selection,
        final_metric=final,
    )  # fmt: skip


def test_a_trial_scores_the_mean_selection_metric_over_its_seeds():
    assert trial_outcome([record("ok", 0.5), record("ok", 0.7)]) == ("complete", pytest.approx(0.6), "")
    # Without a selection split, the reported metric, as the report chooses.
    assert trial_outcome([record("ok", None, 0.9)]) == ("complete", 0.9, "")


def test_diverged_trials_are_pruned_and_failed_ones_failed():
    assert trial_outcome([record("ok"), record("diverged")]) == ("pruned", None, "diverged")
    assert trial_outcome([record("diverged"), record("failed")])[0] == "failed"
    assert trial_outcome([record("ok"), None]) == ("failed", None, "no record")
    assert trial_outcome([record("ok", None, None)]) == ("failed", None, "no objective in the record")
    assert trial_outcome([record("ok", float("nan"))])[0] == "failed"
