"""`python -m lorafactory.report` end to end on synthetic records: every file, real values, a self-contained page."""

from __future__ import annotations

import base64
import csv
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lorafactory.config import run_id, run_state
from lorafactory.report import main
from lorafactory.results import RunRecord, write_record
from lorafactory.results.record import read_record

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def start_run(sweep: Path, variant: str, task: str, lr: str, seed: int) -> tuple[Path, list[str]]:
    """A run folder as Hydra starts it, with `.hydra/overrides.yaml`."""
    overrides = [f"task={task}", f"variant={variant}", f"optim.lr={lr}", f"seed={seed}"]
    run_dir = sweep / "tiny-bert" / task / variant / run_id(overrides, seed)
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), run_dir / ".hydra" / "overrides.yaml")
    return run_dir, overrides


def write_run(
    sweep: Path, variant: str, task: str, lr: str, seed: int, value: float | None, status: str = "ok", **fields: object
) -> Path:
    run_dir, overrides = start_run(sweep, variant, task, lr, seed)
    direction = "min" if task == "toy/loss" else "max"
    write_record(
        run_dir,
        RunRecord(
            status=status,
            model="tiny-bert",
            task=task,
            variant=variant,
            seed=seed,
            lr=float(lr),
            name=sweep.name,
            taxonomy={"lora": "rank", "dora": "rank", "pissa": "initialization"}[variant],
            tags=["baseline"] if variant == "lora" else [],
            primary_metric="loss" if direction == "min" else "accuracy",
            direction=direction,
            final_metric=value,
            best_metric=None if value is None else value + 0.05,
            adapter_params={"lora": 36864, "dora": 38400, "pissa": 36864}[variant],
            trainable_params=40000,
            step_time_s=0.05,
            activation_mb=500.0,
            train_state_mb=12.0,
            overrides=overrides,
            run_dir=str(run_dir),
            **fields,
        ),
    )
    return run_dir


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """Two tasks (accuracy ↑, loss ↓), three variants, two lrs, two seeds; a failure, a divergence, a QNLI-style data
    note, a corrupt record, a run in progress, and a multirun.yaml asking for a third seed."""
    sweep = tmp_path / "runs" / "study"
    values = {  # (variant, lr): per-seed accuracy on toy/acc; the loss task mirrors it as 1 - accuracy
        ("lora", "1e-4"): (0.80, 0.82),
        ("lora", "3e-4"): (0.90, 0.92),
        ("dora", "1e-4"): (0.93, 0.95),
        ("dora", "3e-4"): (0.70, 0.72),
        ("pissa", "1e-4"): (0.60, 0.62),
        ("pissa", "3e-4"): (0.85, 0.89),
    }
    note = "no train split available: trained on 80% of 'validation'; not comparable to published numbers"
    for (variant, lr), per_seed in values.items():
        for seed, value in enumerate(per_seed):
            write_run(sweep, variant, "toy/acc", lr, seed, value, data_note=note)
            write_run(sweep, variant, "toy/loss", lr, seed, round(1 - value, 6))
    write_run(sweep, "dora", "toy/acc", "1e-3", 0, None, status="failed", error="Traceback ...\nRuntimeError: boom")
    write_run(sweep, "pissa", "toy/acc", "1e-3", 0, None, status="diverged", error="loss became nan at step 3")
    corrupt = write_run(sweep, "pissa", "toy/loss", "1e-3", 0, 0.5) / "result.json"
    corrupt.write_text("{truncated")
    in_progress, _ = start_run(sweep, "lora", "toy/acc", "1e-4", 2)
    (in_progress / "checkpoints").mkdir()
    multirun = {
        "hydra": {
            "sweeper": {"params": None},
            "overrides": {
                "task": ["task=toy/acc,toy/loss", "variant=lora,dora,pissa", "optim.lr=1e-4,3e-4", "seed=0,1,2"]
            },
        }
    }
    OmegaConf.save(OmegaConf.create(multirun), sweep / "multirun.yaml")
    return sweep


def run_report(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lorafactory.report", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


class References(HTMLParser):
    """Collects every src/href, the ids, and the tags of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.ids: set[str] = set()
        self.tags: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        for name, value in attrs:
            if name in ("src", "href") and value is not None:
                self.refs.append(value)
            if name == "id" and value:
                self.ids.add(value)


def test_cli_writes_every_file_with_the_right_numbers(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "reports" / "study"

    done = run_report(sweep, "--out", out, cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    assert {p.name for p in out.iterdir()} == {
        "leaderboard.md",
        "leaderboard.csv",
        "leaderboard.tex",
        "index.html",
        "lr-tiny-bert-toy-acc.png",
        "lr-tiny-bert-toy-loss.png",
        "params-tiny-bert-toy-acc.png",
        "params-tiny-bert-toy-loss.png",
        "crossfamily.md",
        "crossfamily.csv",
        "crossfamily.tex",
        "cd_diagram.png",
        "lr_windows.png",
    }
    assert all(
        (out / p).read_bytes().startswith(PNG_MAGIC)
        for p in ("lr-tiny-bert-toy-acc.png", "params-tiny-bert-toy-loss.png")
    )
    assert "skipping unreadable record" in done.stderr and "pissa" in done.stderr and "result.json" in done.stderr

    with open(out / "leaderboard.csv", newline="") as f:
        rows = {(r["task"], r["variant"]): r for r in csv.DictReader(f)}
    assert len(rows) == 6
    dora = rows[("toy/acc", "dora")]
    assert (float(dora["mean"]), float(dora["lr"]), int(dora["n"])) == (pytest.approx(0.94), 1e-4, 2)
    assert float(dora["std"]) == pytest.approx(0.0141421356)
    assert (dora["rank"], dora["best"], dora["direction"]) == ("1", "True", "max")
    # On the loss task lower wins, which moves dora's and lora's best lr compared with taking the larger mean.
    loss = {variant: rows[("toy/loss", variant)] for variant in ("lora", "dora", "pissa")}
    assert {v: (float(r["mean"]), float(r["lr"]), r["rank"]) for v, r in loss.items()} == {
        "lora": (pytest.approx(0.09), 3e-4, "2"),
        "dora": (pytest.approx(0.06), 1e-4, "1"),
        "pissa": (pytest.approx(0.13), 3e-4, "3"),
    }
    assert float(rows[("toy/acc", "pissa")]["avg_rank"]) == 3.0
    assert float(rows[("toy/acc", "lora")]["adapter_params"]) == 36864
    assert rows[("toy/acc", "lora")]["data_note"].endswith("not comparable to published numbers")
    assert rows[("toy/loss", "lora")]["data_note"] == ""

    md = (out / "leaderboard.md").read_text()
    assert "| rank | lora (baseline) | 0.910 ± 0.014 (n=2) lr 3e-4 | 0.090 ± 0.014 (n=2) lr 3e-4 |" in md
    assert "| dora | **0.940 ± 0.014 (n=2)** lr 1e-4 | **0.060 ± 0.014 (n=2)** lr 1e-4 |" in md
    tex = (out / "leaderboard.tex").read_text()
    assert r"\textbf{0.940 $\pm$ 0.014}" in tex and r"\toprule" in tex

    assert "toy/acc" in done.stdout and "1. dora" in done.stdout and "0.940 ± 0.014 (n=2)" in done.stdout
    assert "26 records: 24 ok, 1 failed, 1 diverged; 1 unreadable file skipped" in done.stdout
    assert str(out) in done.stdout


def test_records_kept_with_the_report_rebuild_it_and_restore_a_sweep(sweep: Path, tmp_path: Path) -> None:
    """`--records` copies the result.json files, in the runs' layout, beside the report: the report made from that copy
    is the same, and copied back into runs/ the records are where a relaunched sweep looks for finished runs."""
    out = tmp_path / "reports" / "study"
    assert run_report(sweep, "--out", out, "--records", cwd=tmp_path).returncode == 0
    kept = out / "records" / sweep.name
    originals = sorted(p.relative_to(sweep) for p in sweep.rglob("result.json"))
    assert sorted(p.relative_to(kept) for p in kept.rglob("*") if p.is_file()) == originals  # records, nothing else
    assert all((kept / p).read_bytes() == (sweep / p).read_bytes() for p in originals)

    rebuilt = tmp_path / "rebuilt"
    assert run_report(kept, "--out", rebuilt, cwd=tmp_path).returncode == 0
    assert (rebuilt / "leaderboard.csv").read_text() == (out / "leaderboard.csv").read_text()
    assert run_report(kept, "--out", out, "--records", cwd=tmp_path).returncode == 0  # from its own records: a no-op

    restored = tmp_path / "later" / "runs"
    shutil.copytree(out / "records", restored)
    ok = [p for p in originals if '"status": "ok"' in (sweep / p).read_text()]
    for path in ok:  # the same folder, the same record: run_state finds the run done
        record = read_record(restored / sweep.name / path)
        assert run_state((restored / sweep.name / path).parent, OmegaConf.create(record.config))[0] == "done"


def test_index_html_is_self_contained(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    assert main([str(sweep), "--out", str(out)]) == 0
    page = (out / "index.html").read_text()

    parser = References()
    parser.feed(page)

    external = [ref for ref in parser.refs if not ref.startswith(("data:", "#"))]
    assert external == []
    # The one script is inline (it sorts the cross-family table): a `src` would be among the external references.
    assert not parser.tags & {"link", "iframe", "object", "embed"} and page.count("<script") == 1
    assert all(ref[1:] in parser.ids for ref in parser.refs if ref.startswith("#"))
    images = [ref for ref in parser.refs if ref.startswith("data:image/png;base64,")]
    assert len(images) == 6  # 4 figures per task, the critical-difference diagram, the learning-rate windows
    embedded = {base64.b64decode(ref.split(",", 1)[1]) for ref in images}
    assert embedded == {p.read_bytes() for p in out.glob("*.png")}
    assert "url(" not in page and "@import" not in page
    # The tables, the failures and the notes are on the page.
    assert '<td class="best"><b>0.940 ± 0.014 (n=2)</b><br><small>lr 1e-4</small></td>' in page
    assert "RuntimeError: boom" in page and "loss became nan at step 3" in page
    assert "toy/acc/lora/" in page.split("Running or interrupted")[1].split("</ul>")[0]
    assert "not comparable to published numbers" in page


def test_metric_best_scores_the_best_evaluation(sweep: Path, tmp_path: Path) -> None:
    assert main([str(sweep), "--out", str(tmp_path / "best"), "--metric", "best"]) == 0

    with open(tmp_path / "best" / "leaderboard.csv", newline="") as f:
        rows = {(r["task"], r["variant"]): r for r in csv.DictReader(f)}
    assert float(rows[("toy/acc", "dora")]["mean"]) == pytest.approx(0.99)
    assert rows[("toy/acc", "dora")]["metric"] == "best"


def test_status_counts_and_lists_missing_runs(sweep: Path, tmp_path: Path) -> None:
    done = run_report(sweep, "--status", cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    lines = [line.split() for line in done.stdout.splitlines()]
    assert "36 runs expected by multirun.yaml" in done.stdout  # 2 tasks × 3 variants × 2 lrs × 3 seeds
    assert ["done", "24"] in lines
    assert ["failed", "2", "(1", "diverged)"] in lines
    assert ["running", "or", "killed", "1"] in lines and ["interrupted", "0"] in lines
    assert ["unreadable", "record", "1"] in lines
    # Every seed-2 run but the one in progress; the failed runs used an lr the sweep did not ask for.
    assert ["missing", "11"] in lines
    assert "missing (first 10 of 11):" in done.stdout
    assert "  task=toy/acc variant=dora optim.lr=0.0001 seed=2\n" in done.stdout
    assert "task=toy/acc variant=lora optim.lr=0.0001 seed=2" not in done.stdout  # in progress
    assert not (tmp_path / "reports").exists()  # --status writes nothing


@pytest.mark.parametrize("case", ["no such folder", "no records"])
def test_user_errors_are_one_line_and_exit_2(tmp_path: Path, case: str) -> None:
    target = tmp_path / "absent"
    if case == "no records":
        target.mkdir()

    done = run_report(target, "--out", tmp_path / "out", cwd=tmp_path)

    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ")
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_help_describes_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert all(option in text for option in ("--out", "--metric", "--status", "final", "best"))


def test_budgeting_variants_get_the_rank_map_of_their_chosen_run(tmp_path: Path) -> None:
    from lorafactory.results.aggregate import aggregate, load_runs
    from lorafactory.results.plots import rank_maps

    sweep = tmp_path / "runs" / "budget"
    ranks = {  # (lr, seed): the allocation that run ended with
        ("1e-4", 0): {"encoder.layer.0.attention.self.query": 1, "encoder.layer.1.attention.self.query": 2},
        ("3e-4", 0): {"encoder.layer.0.attention.self.query": 4, "encoder.layer.1.attention.self.query": 0},
        ("3e-4", 1): {"encoder.layer.0.attention.self.query": 3, "encoder.layer.1.attention.self.query": 3},
    }
    for (lr, seed), allocation in ranks.items():
        value = 0.9 if lr == "3e-4" else 0.7
        write_run(sweep, "lora", "toy/acc", lr, seed, value, variant_summary={"ranks": allocation})
    write_run(sweep, "pissa", "toy/acc", "1e-4", 0, 0.8)  # no ranks in its summary: no map
    runs = load_runs(sweep)
    [plot] = rank_maps(aggregate(runs), runs, tmp_path / "out")
    assert plot.kind == "ranks" and plot.path.is_file() and plot.path.read_bytes().startswith(b"\x89PNG")
    assert "lora's rank allocation at lr 3e-4, seed 0: 4 ranks in 2 modules" in plot.title
