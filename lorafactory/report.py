"""`python -m lorafactory.report runs/<sweep> --out reports/<name>`: leaderboards, plots and one HTML page from the
run records under a folder. It reads `result.json` files only and never trains; `--status` counts a sweep's progress.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

from lorafactory.errors import UserError
from lorafactory.results.aggregate import METRICS, Leaderboard, Runs, aggregate, load_runs
from lorafactory.results.crossfamily import Study, build_study
from lorafactory.results.plots import make_plots, rank_maps, study_figures
from lorafactory.results.record import RECORD_NAME
from lorafactory.results.render import (
    crossfamily_csv,
    crossfamily_latex,
    crossfamily_markdown,
    csv_text,
    html_page,
    latex,
    markdown,
    status_text,
    text_summary,
)
from lorafactory.results.status import SweepStatus, sweep_status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lorafactory.report",
        description="Aggregate the run records (result.json) under a folder into leaderboards (Markdown, CSV,\n"
        "LaTeX), plots and one self-contained index.html. Each variant is scored at its best learning rate\n"
        "per task (mean ± std over seeds), in the direction each task declares. The study's sections add 95%\n"
        "intervals, paired comparisons with tuned LoRA, average ranks across tasks (Friedman / Nemenyi, with a\n"
        "critical-difference diagram), learning-rate windows, and the cross-family taxonomy table\n"
        "(crossfamily.md/.csv/.tex). Nothing is trained.",
        epilog="examples:\n  python -m lorafactory.report runs/glue --out reports/glue\n"
        "  python -m lorafactory.report runs/glue --metric best\n  python -m lorafactory.report runs/glue --status\n"
        "  python -m lorafactory.report runs/glue --out reports/glue --records   # keep the records with the report\n"
        "  cp -r reports/glue/records/. runs/                                     # ... and resume the sweep later",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("runs", type=Path, help="a sweep folder (runs/<name>) or any folder above run folders")
    parser.add_argument(
        "--out", type=Path, default=None, help="where to write the report (default: reports/<name of the runs folder>)"
    )
    parser.add_argument(
        "--metric",
        choices=list(METRICS),
        default="final",
        help="score runs by the metric at the end of training (final, the default) or at their best evaluation (best)",
    )
    parser.add_argument(
        "--records",
        action="store_true",
        help="also copy every run's result.json into <out>/records/<runs folder name>/, in the runs' layout: the "
        "report can be rebuilt from them, and copied back into runs/ a sweep skips the runs they hold",
    )
    parser.add_argument(
        "--status",
        action="store_true",
        help="only print how many runs are done, failed, interrupted, running or killed, and missing, then exit",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    out = args.out or Path("reports") / args.runs.resolve().name
    try:
        if not args.runs.is_dir():
            raise UserError(f"no such folder: {args.runs}")
        if args.status:
            print(status_text(sweep_status(args.runs), args.runs))
            return 0
        runs = load_runs(args.runs)
        if runs.records.empty:
            raise UserError(f"no readable {RECORD_NAME} under {args.runs}; --status shows runs still in progress")
        board = aggregate(runs, args.metric)
        study = build_study(board, runs)
        written = write_report(board, runs, sweep_status(args.runs), out, study)
        if args.records:
            written.append(keep_records(args.runs, out / "records" / args.runs.resolve().name))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(text_summary(board, runs, study=study))
    print(f"wrote {len(written)} files to {out}: {', '.join(p.name for p in written)}")
    return 0


def write_report(
    board: Leaderboard, runs: Runs, status: SweepStatus, out: Path, study: Study | None = None
) -> list[Path]:
    """Write the tables, the plots and index.html into `out` (with a `study`: its sections, the cross-family table
    and its figures too); return the files written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        plots = make_plots(board, out) + rank_maps(board, runs, out)
        figures = study_figures(study, out) if study is not None else []
        title = f"Leaderboard: {runs.root.resolve().name}"
        pages = {
            "leaderboard.md": markdown(board, study, figures),
            "leaderboard.csv": csv_text(board),
            "leaderboard.tex": latex(board, study),
            "index.html": html_page(board, runs, status, plots, title, study, figures),
        }
        if study is not None:
            pages |= {
                "crossfamily.md": crossfamily_markdown(study),
                "crossfamily.csv": crossfamily_csv(study, board),
                "crossfamily.tex": crossfamily_latex(study),
            }
        for name, text in pages.items():
            (out / name).write_text(text, encoding="utf-8")
    except OSError as err:
        raise UserError(f"cannot write the report to {out}: {err}") from err
    return [out / name for name in pages] + [plot.path for plot in plots + figures]


def keep_records(runs: Path, into: Path) -> Path:
    """Copy every `result.json` under `runs` to the same place under `into` (records only: no checkpoints, adapters or
    logs); records there that `runs` no longer has are left alone. Returns `into`."""
    source, into = runs.resolve(), into.resolve()
    if source == into:  # the report is being rebuilt from its own records
        return into
    try:
        for record in sorted(source.rglob(RECORD_NAME)):
            target = into / record.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(record, target)
    except OSError as err:
        raise UserError(f"cannot copy the run records to {into}: {err}") from err
    return into


if __name__ == "__main__":
    sys.exit(main())
