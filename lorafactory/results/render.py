"""A leaderboard as text: Markdown, CSV, LaTeX (booktabs), one self-contained HTML page, and a console summary.

Tables have one row per variant, grouped by taxonomy axis, and one column per task. A cell is the mean ± std over
seeds at the variant's best learning rate, with n and that lr; the best cell of each task column is bold, and, given a
`Study`, the cells indistinguishable from it are marked ≈. The study's own sections (findings, significance, average
ranks, learning-rate windows) and the cross-family table follow at the end of this module.
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from lorafactory.results.aggregate import Leaderboard, Runs, format_lr
from lorafactory.results.crossfamily import Study
from lorafactory.results.plots import ARROWS, Plot
from lorafactory.results.sensitivity import lr_windows
from lorafactory.results.status import SweepStatus

COST_HEADERS = ("Avg rank", "Adapter params", "Step time", "Memory (activations + trained state)")
NOT_COMPARABLE = "not comparable to published numbers"


# --- numbers ---------------------------------------------------------------------------------------------------------


def format_number(x: float) -> str:
    return f"{x:.1f}" if abs(x) >= 100 else f"{x:.3f}"


def format_mean(mean: float, std: float, n: int) -> str:
    """`0.912 ± 0.004 (n=3)`; a single seed has no std."""
    spread = "" if _missing(std) else f" ± {format_number(std)}"
    return f"{format_number(mean)}{spread} (n={n})"


def format_count(n: float | None) -> str:
    if _missing(n):
        return "–"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def _missing(x: object) -> bool:
    return x is None or x is pd.NA or (isinstance(x, float) and math.isnan(x))


# --- the table every format shares -----------------------------------------------------------------------------------


def task_header(task: pd.Series) -> str:
    """`glue/sst2 (accuracy ↑)`, starred when its data split is not the published one."""
    star = "" if _missing(task["data_note"]) else "*"
    return f"{task['task']}{star} ({task['primary_metric']} {ARROWS[task['direction']]})"


def axis_groups(board: Leaderboard, model: str) -> list[tuple[str, pd.DataFrame]]:
    """The model's variant rows in display order, grouped by taxonomy axis."""
    rows = board.variant_rows(model)
    return [(axis or "unclassified", group) for axis, group in rows.groupby("taxonomy", sort=False)]


def variant_label(variant: pd.Series) -> str:
    return f"{variant['variant']} (baseline)" if variant["baseline"] else variant["variant"]


def cost_cells(variant: pd.Series, n_tasks: int) -> list[str]:
    """Average rank (with coverage when the variant misses tasks), adapter parameters, step time, peak memory."""
    rank = f"{variant['avg_rank']:.2f}"
    if variant["n_tasks"] < n_tasks:
        rank += f" ({variant['n_tasks']}/{n_tasks} tasks)"
    step = "–" if _missing(variant["step_time_s"]) else f"{1000 * variant['step_time_s']:.1f} ms"
    memory = "–" if _missing(variant["memory_mb"]) else f"{variant['memory_mb']:.1f} MB"
    return [rank, format_count(variant["adapter_params"]), step, memory]


Cell = Callable[[pd.Series | None], str]


def _rows(board: Leaderboard, model: str, cell: Cell) -> list[tuple[str, list[list[str]]]]:
    """Per axis group, the rows of text cells: variant, one cell per task (rendered by `cell`), costs."""
    tasks = board.task_rows(model)
    groups = []
    for axis, variants in axis_groups(board, model):
        rows = []
        for _, variant in variants.iterrows():
            scores = [cell(board.cell(model, task, variant["variant"])) for task in tasks["task"]]
            rows.append([variant_label(variant), *scores, *cost_cells(variant, len(tasks))])
        groups.append((axis, rows))
    return groups


def _data_notes(board: Leaderboard) -> list[str]:
    notes = board.tasks.dropna(subset=["data_note"])
    return [
        f"{row.task}* ({row.model}): {row.data_note}"
        + ("" if NOT_COMPARABLE in row.data_note else f"; {NOT_COMPARABLE}")
        for row in notes.itertuples()
    ]


def sensitivity_lines(board: Leaderboard) -> list[str]:
    """One sentence per (model, task): variant spread at the best lr vs how much the lr moves a variant, and how far
    the lr can move at a cost of one point (`sensitivity.lr_windows`)."""
    windows = lr_windows(board)
    lines = []
    for row in board.sensitivity().itertuples():
        line = (
            f"{row.task} ({row.model}): at their best learning rates the "
            + ("adapters (the baselines aside)" if row.baselines_aside else "variants")
            + " span "
            f"{format_number(row.variant_spread)}; the learning rate moves a variant by "
            f"{format_number(row.lr_range_median)} (median) and up to {format_number(row.lr_range_max)} "
            f"({row.lr_range_max_variant})."
        )
        here = windows[(windows["model"] == row.model) & (windows["task"] == row.task) & (windows["n_lrs"] >= 2)]
        if len(here):
            edge = int((here["at_edge"] != "").sum())
            line += (
                f" Within one point ({format_number(here['point'].median())}) of its best, a variant's learning rate "
                f"can move over {here['width'].median():.1f} octaves (median of {len(here)}"
                + (f"; {edge} reach the grid's edge, so wider)." if edge else ").")
            )
        lines.append(line)
    return lines


def _caption(board: Leaderboard, study: Study | None = None) -> str:
    marks = " ≈: indistinguishable from the best (the 95% interval of the paired difference holds 0)." if study else ""
    return (
        f"{board.metric.capitalize()} metric at each variant's best learning rate per task, chosen on a separate "
        "selection split where the runs have one (see the notes): mean ± std over seeds (n = successful seeds). "
        "Best per task in bold. Average rank over tasks (1 = best); costs are "
        f"medians over the variant's runs.{marks}"
    )


def _near_best(study: Study | None, c: pd.Series) -> str:
    """` ≈` for a leaderboard cell the study finds indistinguishable from its task's best."""
    if study is None:
        return ""
    found = study.cell(c["model"], c["task"], c["variant"])
    return " ≈" if found is not None and found["vs_best"] == "indistinguishable" else ""


# --- Markdown, CSV, LaTeX --------------------------------------------------------------------------------------------


def markdown(board: Leaderboard, study: Study | None = None, plots: list[Plot] | None = None) -> str:
    """The leaderboard; with a `study`, cells indistinguishable from the best are marked ≈ and the study's sections
    follow (`plots`: its figures, linked by file name)."""

    def cell(c: pd.Series | None) -> str:
        if c is None:
            return "–"
        text = format_mean(c["mean"], c["std"], c["n"])
        return f"{f'**{text}**' if c['best'] else text}{_near_best(study, c)} lr {format_lr(c['lr'])}"

    lines = ["# Leaderboard", "", _caption(board, study), ""]
    for model in board.models():
        header = ["Axis", "Variant", *map(task_header, _task_series(board, model)), *COST_HEADERS]
        lines += [f"## {model}", "", _md_row(header), _md_row([":--", ":--"] + ["--:"] * (len(header) - 2))]
        for axis, rows in _rows(board, model, cell):
            lines += [_md_row([axis if i == 0 else "", *row]) for i, row in enumerate(rows)]
        lines.append("")
    lines += ["## Learning rate vs variant", "", *[f"- {line}" for line in sensitivity_lines(board)], ""]
    if study is not None:
        lines += study_markdown(study, board, plots or [])
    notes = _data_notes(board) + board.selection_notes + board.notes + (study.notes if study is not None else [])
    if notes:
        lines += ["## Notes", "", *[f"- {note}" for note in notes], ""]
    return "\n".join(lines)


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def csv_text(board: Leaderboard) -> str:
    """The tidy leaderboard: one row per (model, task, variant), numeric mean/std/n/lr columns."""
    return board.tidy().to_csv(index=False, float_format="%.10g")


def latex(board: Leaderboard, study: Study | None = None) -> str:
    """One booktabs tabular per model (needs `\\usepackage{booktabs}`); the best cell of each task in bold, and with
    a `study` the cells indistinguishable from it marked $\\approx$."""

    def cell(c: pd.Series | None) -> str:
        if c is None:
            return "--"
        spread = "" if _missing(c["std"]) else rf" $\pm$ {format_number(c['std'])}"
        text = f"{format_number(c['mean'])}{spread}"
        return (rf"\textbf{{{text}}}" if c["best"] else text) + _tex(_near_best(study, c))

    n_costs = len(COST_HEADERS)
    out = [f"% {_caption(board, study)}", "% Requires \\usepackage{booktabs}.", ""]
    for model in board.models():
        tasks = _task_series(board, model)
        header = ["Axis", "Variant", *map(task_header, tasks), *COST_HEADERS]
        out += [
            f"% {_tex(model)}",
            rf"\begin{{tabular}}{{ll{'c' * len(tasks)}{'r' * n_costs}}}",
            r"\toprule",
            " & ".join(_tex(h) for h in header) + r" \\",
        ]
        for axis, rows in _rows(board, model, cell):
            out.append(r"\midrule")
            for i, (label, *scores) in enumerate(rows):
                cells = [_tex(axis) if i == 0 else "", _tex(label), *scores[:-n_costs], *map(_tex, scores[-n_costs:])]
                out.append(" & ".join(cells) + r" \\")
        out += [r"\bottomrule", r"\end{tabular}", ""]
    return "\n".join(out)


_TEX_SPECIAL = {
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "\\": r"\textbackslash{}",
    "↑": r"$\uparrow$",
    "↓": r"$\downarrow$",
    "≈": r"$\approx$",
    "▲": r"$^{+}$",
    "▼": r"$^{-}$",
    "×": r"$\times$",
    "÷": r"$\div$",
    "≥": r"$\geq$",
}


def _tex(text: str) -> str:
    return re.sub(r"[&%$#_{}~^\\↑↓≈▲▼×÷≥]", lambda m: _TEX_SPECIAL[m.group()], text)


def _task_series(board: Leaderboard, model: str) -> list[pd.Series]:
    return [row for _, row in board.task_rows(model).iterrows()]


# --- HTML ------------------------------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 80rem; padding: 0 1rem; color: #222; }
table { border-collapse: collapse; margin: 1rem 0; font-size: 0.9rem; }
th, td { padding: 0.3rem 0.6rem; border-bottom: 1px solid #ddd; text-align: right; vertical-align: top; }
th.left, td.left { text-align: left; }
tr.axis th { background: #f2f2f2; text-align: left; text-transform: capitalize; }
td.best { background: #e6f4ea; }
small { color: #666; }
figure { display: inline-block; margin: 0.5rem; }
figure img { max-width: 38rem; }
nav a { margin-right: 1rem; }
.note { color: #8a4b00; }
table.sortable th { cursor: pointer; }
"""


def html_page(
    board: Leaderboard,
    runs: Runs,
    status: SweepStatus,
    plots: list[Plot],
    title: str,
    study: Study | None = None,
    study_plots: list[Plot] | None = None,
) -> str:
    """One self-contained page: inline CSS, plots as base64 PNG, no external references; the only script is the
    few inline lines that sort the cross-family table by the clicked column."""
    sections = [
        f"<h1>{_h(title)}</h1>",
        f"<p>{_h(run_counts(runs))}. {_h(_caption(board, study))}</p>",
        _nav(board, study),
        *[_html_table(board, model, study) for model in board.models()],
        _html_sensitivity(board),
        *(study_html(study, board, study_plots or []) if study is not None else []),
        _html_plots(plots),
        _html_problems(runs, status),
        _html_notes(board, study),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{_h(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(sections)
        + (f"\n<script>{_SORT_SCRIPT}</script>" if study is not None else "")
        + "\n</body>\n</html>\n"
    )


def _h(text: object) -> str:
    return html.escape(str(text))


def _anchor(model: str) -> str:
    return "model-" + re.sub(r"[^A-Za-z0-9_-]+", "-", model)


def _nav(board: Leaderboard, study: Study | None = None) -> str:
    links = [(f"#{_anchor(m)}", m) for m in board.models()]
    if study is not None:
        links += [(f"#{anchor}", text) for anchor, text in STUDY_SECTIONS]
    links += [("#plots", "plots"), ("#problems", "failed and missing runs"), ("#notes", "notes")]
    return "<nav>" + "".join(f'<a href="{href}">{_h(text)}</a>' for href, text in links) + "</nav>"


def _html_table(board: Leaderboard, model: str, study: Study | None = None) -> str:
    def cell(c: pd.Series | None) -> str:
        if c is None:
            return "<td>–</td>"
        text = _h(format_mean(c["mean"], c["std"], c["n"])) + _near_best(study, c)
        lr = f"<br><small>lr {format_lr(c['lr'])}</small>"
        return f'<td class="best"><b>{text}</b>{lr}</td>' if c["best"] else f"<td>{text}{lr}</td>"

    headers = ["Variant", *map(task_header, _task_series(board, model)), *COST_HEADERS]
    out = [
        f'<h2 id="{_anchor(model)}">{_h(model)}</h2>',
        "<table>",
        '<tr><th class="left">' + "</th><th>".join(map(_h, headers)) + "</th></tr>",
    ]
    for axis, rows in _rows(board, model, cell):
        out.append(f'<tr class="axis"><th colspan="{len(headers)}">{_h(axis)}</th></tr>')
        n_costs = len(COST_HEADERS)
        for label, *scores in rows:
            costs = "".join(f"<td>{_h(c)}</td>" for c in scores[-n_costs:])
            out.append(f'<tr><td class="left">{_h(label)}</td>{"".join(scores[:-n_costs])}{costs}</tr>')
    out.append("</table>")
    return "\n".join(out)


def _html_sensitivity(board: Leaderboard) -> str:
    items = "".join(f"<li>{_h(line)}</li>" for line in sensitivity_lines(board))
    return f'<h2 id="sensitivity">Learning rate vs variant</h2>\n<ul>{items}</ul>'


def _html_plots(plots: list[Plot]) -> str:
    out = [
        '<h2 id="plots">Plots</h2>',
        "<p>Learning-rate sensitivity: mean ± std over seeds at each learning rate; the circled point is the "
        "learning rate chosen for the table. Parameters: each variant at its best learning rate. Rank allocations: "
        "the ranks a budgeting variant's modules ended with (transformer layers down, modules across).</p>",
    ]
    for plot in plots:
        data = base64.b64encode(Path(plot.path).read_bytes()).decode("ascii")
        out.append(
            f'<figure><img src="data:image/png;base64,{data}" alt="{_h(plot.title)}">'
            f"<figcaption>{_h(plot.title)}</figcaption></figure>"
        )
    return "\n".join(out)


def _html_problems(runs: Runs, status: SweepStatus) -> str:
    out = ['<h2 id="problems">Failed and missing runs</h2>']
    problems = runs.problems
    if problems.empty:
        out.append("<p>No failed or diverged runs.</p>")
    else:
        headers = ["status", "model", "task", "variant", "seed", "lr", "error", "folder"]
        out += ["<table>", "<tr>" + "".join(f'<th class="left">{h}</th>' for h in headers) + "</tr>"]
        for row in problems.itertuples():
            cells = [
                row.status,
                row.model,
                row.task,
                row.variant,
                row.seed,
                _lr_or_dash(row.lr),
                _error_line(row.error),
                _relative(row.path, runs.root),
            ]
            out.append("<tr>" + "".join(f'<td class="left">{_h(c)}</td>' for c in cells) + "</tr>")
        out.append("</table>")
    out += _html_list(
        "Running or interrupted (a folder without a record)", [_relative(p, runs.root) for p in status.running]
    )
    out += _html_list("Unreadable records (skipped)", [f"{_relative(p, runs.root)}: {why}" for p, why in runs.skipped])
    out += _html_list("Missing (asked for by the sweep, no folder yet)", [" ".join(job) for job in status.missing])
    if status.missing_count and not status.missing:
        out.append(f"<p>{status.missing_count} runs of the sweep have no folder yet.</p>")
    return "\n".join(out)


def _html_list(title: str, items: list[str]) -> list[str]:
    if not items:
        return []
    return [f"<h3>{_h(title)}: {len(items)}</h3>", "<ul>", *[f"<li>{_h(item)}</li>" for item in items], "</ul>"]


def _html_notes(board: Leaderboard, study: Study | None = None) -> str:
    notes = _data_notes(board) + board.selection_notes + board.notes + (study.notes if study is not None else [])
    body = "".join(f'<li class="note">{_h(note)}</li>' for note in notes) or "<li>None.</li>"
    return f'<h2 id="notes">Notes</h2>\n<ul>{body}</ul>'


def _lr_or_dash(lr: float) -> str:
    return "–" if _missing(lr) else format_lr(lr)


def _error_line(text: str | None) -> str:
    """The last line of a recorded error: the exception and its message, without the traceback."""
    return text.strip().splitlines()[-1] if text and text.strip() else "–"


def _relative(path: str | Path, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


# --- console ---------------------------------------------------------------------------------------------------------


def run_counts(runs: Runs) -> str:
    """`31 records: 29 ok, 1 failed, 1 diverged; 1 unreadable file skipped`."""
    counts = runs.records["status"].value_counts()
    statuses = ", ".join(f"{counts.get(s, 0)} {s}" for s in ("ok", "failed", "diverged"))
    text = f"{_plural(len(runs.records), 'record')}: {statuses}"
    if runs.skipped:
        text += f"; {_plural(len(runs.skipped), 'unreadable file')} skipped"
    return text


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def text_summary(board: Leaderboard, runs: Runs, top: int = 3, study: Study | None = None) -> str:
    """Per model and task, the `top` variants with mean ± std; then the run counts, the study's findings and the
    notes."""
    lines = [f"{runs.root}: {run_counts(runs)}"]
    for task in board.tasks.itertuples():
        direction = "higher" if task.direction == "max" else "lower"
        lines.append(f"{task.model} {task.task} ({board.metric} {task.primary_metric}, {direction} is better)")
        cells = board.cells[(board.cells["model"] == task.model) & (board.cells["task"] == task.task)]
        width = max(len(v) for v in cells["variant"])
        for c in cells.sort_values(["rank", "variant"]).head(top).itertuples():
            lines.append(f"  {c.rank}. {c.variant:<{width}}  {format_mean(c.mean, c.std, c.n)}  lr {format_lr(c.lr)}")
    lines += sensitivity_lines(board)
    if study is not None:
        lines += [f"finding: {line.replace('**', '')}" for line in study.findings]
    lines += [
        f"note: {note}"
        for note in _data_notes(board) + board.selection_notes + board.notes + (study.notes if study else [])
    ]
    return "\n".join(lines)


def status_text(status: SweepStatus, root: Path, show: int = 10) -> str:
    """Counts of done / failed / running-or-interrupted / missing runs, then up to `show` folders or runs of each
    kind that needs attention."""
    if status.expected is None:
        expected = "expected runs unknown (no multirun.yaml of a grid sweep)"
    else:
        expected = f"{status.expected} runs expected by multirun.yaml"
    missing = "unknown" if status.missing_count is None else str(status.missing_count)
    failed = len(status.failed) + len(status.diverged)
    lines = [
        f"{root}: {expected}",
        f"  done                    {len(status.done)}",
        f"  failed                  {failed}" + (f" ({len(status.diverged)} diverged)" if status.diverged else ""),
        f"  interrupted             {len(status.interrupted)}",
        f"  running or killed       {len(status.running)}",
        f"  missing                 {missing}",
    ]
    if status.skipped:
        lines.insert(2, f"  skipped by this launch  {len(status.skipped)} (done, or running elsewhere)")
    if status.unreadable:
        lines.append(f"  unreadable record       {len(status.unreadable)}")
    attention = [
        ("failed or diverged", [_relative(p, root) for p in status.failed + status.diverged]),
        ("interrupted (launch again to resume)", [_relative(p, root) for p in status.interrupted]),
        ("running or killed", [_relative(p, root) for p in status.running]),
        ("unreadable record", [_relative(p, root) for p in status.unreadable]),
        ("missing", [" ".join(job) for job in status.missing]),
    ]
    for title, items in attention:
        if items:
            more = f" (first {show} of {len(items)})" if len(items) > show else ""
            lines += [f"{title}{more}:", *[f"  {item}" for item in items[:show]]]
    return "\n".join(lines)


# --- the study: findings, significance, ranks across tasks, learning-rate windows, the cross-family table -----------

STUDY_SECTIONS = (
    ("findings", "findings"),
    ("crossfamily", "cross-family table"),
    ("significance", "significance"),
    ("ranks", "ranks across tasks"),
    ("windows", "learning-rate windows"),
)
"""(anchor, link text) of the study's sections in index.html, in page order."""
CROSSFAMILY_CAPTION = (
    "Every (model, task) of the study. A task cell is the score at the variant's best learning rate with its 95% "
    "interval (bootstrap over evaluation examples and seeds, or Student's t over seeds alone; none for one seed "
    "without per-example outputs); best per task in bold; ▲ / ▼ better / worse than tuned LoRA beyond noise (the 95% "
    "interval of the paired difference excludes 0); ≈ indistinguishable from the task's best (that interval, against "
    "the best, holds 0). ÷LoRA: the score over LoRA's on the task (LoRA's over the score where lower is better). Gap "
    "closed: (score − floor) / (full − floor), the floor being head_only, or the untuned model on generation tasks. "
    "Avg rank over the tasks the variant ran (ties averaged). LR window: octaves of learning rate within one point of "
    "the best, mean over tasks (≥: some windows reach the grid's edge). Costs relative to LoRA on the same model, "
    "geometric mean over models; step × frozen is relative to head_only's step (the frozen backbone's forward and the "
    "head's update: no record times the bare frozen model), on the models that have it; memory is activations saved "
    "for backward plus trained state, already the method's own cost above the frozen model."
)
WINDOWS_CAPTION = (
    "How far each variant's learning rate can move, in octaves (factors of 2), while its score stays within one point "
    "of the score at its chosen rate: 0.01 on metrics held as fractions (accuracy, F1, MCC, correlations, exact "
    "match), 1 on BLEU and ROUGE-L (0–100), 1% of the best for losses and perplexities; interpolated in log learning "
    "rate between the rates tried. ≥: the window reaches the end of the grid, so the true one is wider. Drops: how "
    "much worse (in the metric's units and direction) the score is at ½× and 2× the chosen rate on the same lines; "
    "n/a outside the grid, diverged when the segment ends at a rate whose runs all diverged."
)


def format_interval(mean: float, low: float, high: float) -> str:
    """`0.912 [0.905, 0.919]`; the mean alone when there is no interval."""
    if _missing(low):
        return format_number(mean)
    return f"{format_number(mean)} [{format_number(low)}, {format_number(high)}]"


def format_signed(x: float) -> str:
    if _missing(x):
        return "–"
    return f"{x:+.1f}" if abs(x) >= 100 else f"{x:+.3f}"


def format_p(p: float | None) -> str:
    if _missing(p):
        return "–"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _window_text(width: float, at_edge: str, n_lrs: float) -> str:
    if _missing(width) or n_lrs < 2:
        return "– (one rate)"
    return f"{'≥' if at_edge else ''}{width:.1f}"


def _drop_text(drop: float) -> str:
    if _missing(drop):
        return "n/a"
    return "diverged" if math.isinf(drop) else format_number(drop)


def _ratio_text(x: float) -> str:
    if _missing(x):
        return "–"
    return f"{x:,.0f}×" if x >= 100 else f"{x:.2f}×"


def _study_task_header(task: pd.Series) -> str:
    return f"{task['task']} ({task['model']}) {ARROWS[task['direction']]}"


def _score_marks(c: pd.Series) -> str:
    marks = {"better": "▲", "worse": "▼"}.get(c["vs_lora"], "")
    return marks + ("≈" if c["vs_best"] == "indistinguishable" else "")


@dataclass(frozen=True)
class _Cell:
    """A table cell: its text, the number it sorts by (None: text), and whether it is the best of its column."""

    text: str
    value: float | None = None
    best: bool = False


def crossfamily_table(study: Study) -> tuple[list[str], list[tuple[str, list[_Cell]]]]:
    """The cross-family table every format shares: headers, and per variant (in display order) its group and cells."""
    tasks = [row for _, row in study.tasks.iterrows()]
    headers = [
        "Axis",
        "Variant",
        *map(_study_task_header, tasks),
        *[f"÷LoRA {task['task']} ({task['model']})" for task in tasks],
        "÷LoRA mean",
        "Gap closed",
        "Avg rank",
        "LR window (oct.)",
        "Params ×LoRA",
        "Step ×frozen",
        "Step ×LoRA",
        "Memory ×LoRA",
    ]
    rows = []
    for position, variant in enumerate(study.variants.itertuples()):
        scores, normalised = [], []
        for task in tasks:
            c = study.cell(task["model"], task["task"], variant.variant)
            if c is None:
                scores.append(_Cell("–"))
                normalised.append(_Cell("–"))
                continue
            text = format_interval(c["mean"], c["low"], c["high"]) + _score_marks(c)
            scores.append(_Cell(text, c["mean"], c["vs_best"] == "best"))
            normalised.append(_Cell(_ratio_text(c["normalised"]).rstrip("×"), _number(c["normalised"])))
        coverage = "" if variant.n_tasks == len(tasks) else f" ({variant.n_tasks}/{len(tasks)})"
        window = (
            _Cell("–")
            if _missing(variant.window_mean)
            else _Cell(f"{'≥' if variant.window_at_edge else ''}{variant.window_mean:.1f}", variant.window_mean)
        )
        cells = [
            _Cell(variant.group, position),
            _Cell(f"{variant.variant} (baseline)" if variant.baseline else variant.variant),
            *scores,
            *normalised,
            _Cell(_ratio_text(variant.mean_normalised).rstrip("×"), _number(variant.mean_normalised)),
            _Cell(
                "–" if _missing(variant.mean_gap_closed) else f"{variant.mean_gap_closed:.2f}",
                _number(variant.mean_gap_closed),
            ),
            _Cell(f"{variant.avg_rank:.2f}{coverage}", variant.avg_rank),
            window,
            *[
                _Cell(_ratio_text(value), _number(value))
                for value in (variant.params_x_lora, variant.step_x_frozen, variant.step_x_lora, variant.memory_x_lora)
            ],
        ]
        rows.append((variant.group, cells))
    return headers, rows


def _number(x: float) -> float | None:
    return None if _missing(x) else float(x)


def crossfamily_markdown(study: Study) -> str:
    headers, rows = crossfamily_table(study)
    lines = ["# Cross-family taxonomy leaderboard", "", CROSSFAMILY_CAPTION, ""]
    lines.append(_md_row(headers))
    lines.append(_md_row([":--", ":--"] + ["--:"] * (len(headers) - 2)))
    previous = None
    for group, cells in rows:
        texts = [f"**{c.text}**" if c.best else c.text for c in cells]
        texts[0] = group if group != previous else ""
        previous = group
        lines.append(_md_row(texts))
    lines += ["", "## Findings", "", *[f"- {line}" for line in study.findings], ""]
    if study.notes:
        lines += ["## Notes", "", *[f"- {note}" for note in study.notes], ""]
    return "\n".join(lines)


def crossfamily_csv(study: Study, board: Leaderboard) -> str:
    """One row per (variant, model, task): the cell's numbers, its model's costs and the variant's summary."""
    order = study.variants[["variant"]].reset_index(names="_order")
    costs = board.variants[["model", "variant", "trainable_params", "step_time_s", "memory_mb"]]
    summary = study.variants.drop(columns=["group"])
    table = (
        study.cells.merge(order, on="variant")
        .merge(costs, on=["model", "variant"], how="left")
        .merge(summary, on="variant", how="left")
        .sort_values(["_order", "model", "task"])
        .drop(columns="_order")
    )
    first = ["group", "variant", "model", "task", "primary_metric", "direction", "lr", "mean", "low", "high"]
    return table[first + [c for c in table.columns if c not in first]].to_csv(index=False, float_format="%.10g")


def crossfamily_latex(study: Study) -> str:
    """The cross-family table as one booktabs tabular (needs `\\usepackage{booktabs}`)."""
    headers, rows = crossfamily_table(study)
    out = [f"% {CROSSFAMILY_CAPTION}", "% Requires \\usepackage{booktabs}.", ""]
    out += [
        rf"\begin{{tabular}}{{ll{'r' * (len(headers) - 2)}}}",
        r"\toprule",
        " & ".join(_tex(h) for h in headers) + r" \\",
    ]
    previous = None
    for group, cells in rows:
        if group != previous:
            out.append(r"\midrule")
        texts = [rf"\textbf{{{_tex(c.text)}}}" if c.best else _tex(c.text) for c in cells]
        texts[0] = _tex(group) if group != previous else ""
        previous = group
        out.append(" & ".join(texts) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}", ""]
    return "\n".join(out)


def _significance_rows(study: Study, model: str, task: str) -> list[list[str]]:
    cells = study.cells[(study.cells["model"] == model) & (study.cells["task"] == task)].sort_values(
        ["task_rank", "variant"]
    )
    rows = []
    for c in cells.itertuples():
        if not isinstance(c.method, str):  # None, or NaN once tasks with and without intervals share the table
            interval = "none (one seed)"
        else:
            examples = f", {c.examples} examples" if c.examples else ""
            interval = f"{c.method}: {int(c.seeds)} seed{'s' if c.seeds != 1 else ''}{examples}"
        rows.append(
            [
                f"{c.task_rank:g}",
                c.variant,
                format_interval(c.mean, c.low, c.high),
                interval,
                "–" if c.vs_lora == "reference" else _difference_text(c.lora_diff, c.lora_low, c.lora_high),
                format_p(c.lora_p),
                c.vs_lora,
                c.vs_best,
            ]
        )
    return rows


def _difference_text(diff: float, low: float, high: float) -> str:
    """`+0.012 [+0.004, +0.020]`; the difference alone without an interval, – without a reference."""
    if _missing(low):
        return format_signed(diff)
    return f"{format_signed(diff)} [{format_signed(low)}, {format_signed(high)}]"


SIGNIFICANCE_HEADERS = [
    "Rank",
    "Variant",
    "Score [95% CI]",
    "Interval",
    "Δ vs LoRA [95% CI]",
    "p",
    "vs LoRA",
    "vs best",
]
SIGNIFICANCE_CAPTION = (
    "Each variant at its best learning rate: its score with a 95% interval, and the paired difference with tuned LoRA "
    "(at LoRA's own best learning rate; same seeds, same example draws) with its 95% interval and two-sided p-value "
    "(shifted bootstrap, or the paired t test over seeds). vs LoRA / vs best: better or worse when the interval of "
    "the difference excludes 0, indistinguishable when it holds it; each pair is its own 95% statement (no correction "
    "for the number of variants)."
)


def _rank_summary(study: Study) -> tuple[str, list[list[str]], str]:
    """The rank test's sentence, the (variant, average rank) rows best first, and the Nemenyi groups as text."""
    test = study.rank_test
    if test is None:
        return f"Not computed: {study.rank_reason}", [], ""
    ranked = sorted(zip(test.average_ranks, study.rank_variants, strict=True))
    groups = "; ".join(", ".join(group) for group in study.rank_cliques) or "none (every pair differs)"
    return (
        study.findings[-1],
        [[name, f"{rank:.3f}"] for rank, name in ranked],
        f"Groups not significantly different (Nemenyi, α = {test.alpha:g}; the bars of the diagram): {groups}.",
    )


def _window_rows(study: Study) -> list[list[str]]:
    order = {v: i for i, v in enumerate(study.variants["variant"])}
    windows = study.windows.assign(_order=study.windows["variant"].map(order)).sort_values(["model", "task", "_order"])
    return [
        [
            w.model,
            w.task,
            w.variant,
            format_lr(w.lr),
            _window_text(w.width, w.at_edge, w.n_lrs),
            "–" if w.n_lrs < 2 else f"{format_lr(w.low_lr)} – {format_lr(w.high_lr)}",
            _drop_text(w.drop_half),
            _drop_text(w.drop_double),
        ]
        for w in windows.itertuples()
    ]


WINDOW_HEADERS = [
    "Model",
    "Task",
    "Variant",
    "Best lr",
    "Window (octaves)",
    "Within one point",
    "Drop at ½×",
    "Drop at 2×",
]


def study_markdown(study: Study, board: Leaderboard, plots: list[Plot]) -> list[str]:
    """The study's sections of leaderboard.md: findings, significance per task, ranks across tasks, windows."""
    figures = {plot.kind: plot for plot in plots}
    lines = ["## Findings", "", *[f"- {line}" for line in study.findings], ""]
    lines += ["The cross-family taxonomy table is in crossfamily.md (and .csv, .tex).", ""]
    lines += ["## Significance", "", SIGNIFICANCE_CAPTION, ""]
    if study.interval_reason:
        lines += [f"No confidence intervals or paired tests: {study.interval_reason}", ""]
    for task in board.tasks.itertuples():
        lines += [f"### {task.task} ({task.model}), {task.primary_metric} {ARROWS[task.direction]}", ""]
        lines += [_md_row(SIGNIFICANCE_HEADERS), _md_row(["--:", ":--", "--:", ":--", "--:", "--:", ":--", ":--"])]
        lines += [_md_row(row) for row in _significance_rows(study, task.model, task.task)] + [""]
    sentence, ranks, groups = _rank_summary(study)
    lines += ["## Average ranks across tasks", "", sentence, ""]
    if ranks:
        lines += [_md_row(["Variant", "Average rank"]), _md_row([":--", "--:"]), *map(_md_row, ranks), "", groups, ""]
    if "cd" in figures:
        lines += [f"![{figures['cd'].title}]({figures['cd'].path.name})", ""]
    lines += ["## Learning-rate windows", "", WINDOWS_CAPTION, ""]
    lines += [_md_row(WINDOW_HEADERS), _md_row([":--"] * 3 + ["--:"] * 5), *map(_md_row, _window_rows(study)), ""]
    if "windows" in figures:
        lines += [f"![{figures['windows'].title}]({figures['windows'].path.name})", ""]
    return lines


def study_html(study: Study, board: Leaderboard, plots: list[Plot]) -> list[str]:
    """The study's sections of index.html, in `STUDY_SECTIONS` order; the cross-family table sorts on a click."""
    figures = {plot.kind: plot for plot in plots}
    findings = "".join(f"<li>{_bold(line)}</li>" for line in study.findings)
    out = [f'<h2 id="findings">Findings</h2>\n<ul>{findings}</ul>']
    headers, rows = crossfamily_table(study)
    table = [
        '<h2 id="crossfamily">Cross-family taxonomy leaderboard</h2>',
        f"<p>{_h(CROSSFAMILY_CAPTION)} Click a column header to sort by it (again to reverse); Axis restores the "
        "grouping.</p>",
        '<table class="sortable">',
        "<thead><tr>"
        + "".join(f'<th class="left">{_h(h)}</th>' if i < 2 else f"<th>{_h(h)}</th>" for i, h in enumerate(headers))
        + "</tr></thead>",
        "<tbody>",
    ]
    for _, cells in rows:
        tds = []
        for i, c in enumerate(cells):
            sort = "" if c.value is None else f' data-sort="{c.value:.10g}"'
            css = ' class="left"' if i < 2 else (' class="best"' if c.best else "")
            tds.append(f"<td{css}{sort}>{'<b>' if c.best else ''}{_h(c.text)}{'</b>' if c.best else ''}</td>")
        table.append("<tr>" + "".join(tds) + "</tr>")
    out.append("\n".join([*table, "</tbody>", "</table>"]))
    significance = ['<h2 id="significance">Significance</h2>', f"<p>{_h(SIGNIFICANCE_CAPTION)}</p>"]
    if study.interval_reason:
        significance.append(f"<p>No confidence intervals or paired tests: {_h(study.interval_reason)}</p>")
    for task in board.tasks.itertuples():
        significance.append(
            f"<h3>{_h(task.task)} ({_h(task.model)}), {_h(task.primary_metric)} {ARROWS[task.direction]}</h3>"
        )
        significance.append(
            _html_simple_table(
                SIGNIFICANCE_HEADERS, _significance_rows(study, task.model, task.task), left={1, 3, 6, 7}
            )
        )
    out.append("\n".join(significance))
    sentence, ranks, groups = _rank_summary(study)
    section = ['<h2 id="ranks">Average ranks across tasks</h2>', f"<p>{_h(sentence)}</p>"]
    if ranks:
        section += [_html_simple_table(["Variant", "Average rank"], ranks, left={0}), f"<p>{_h(groups)}</p>"]
    if "cd" in figures:
        section.append(_figure(figures["cd"]))
    out.append("\n".join(section))
    section = [
        '<h2 id="windows">Learning-rate windows</h2>',
        f"<p>{_h(WINDOWS_CAPTION)}</p>",
        _html_simple_table(WINDOW_HEADERS, _window_rows(study), left={0, 1, 2}),
    ]
    if "windows" in figures:
        section.append(_figure(figures["windows"]))
    out.append("\n".join(section))
    return out


def _html_simple_table(headers: list[str], rows: list[list[str]], left: set[int]) -> str:
    def td(i: int, text: str, tag: str = "td") -> str:
        return f'<{tag} class="left">{_h(text)}</{tag}>' if i in left else f"<{tag}>{_h(text)}</{tag}>"

    lines = ["<table>", "<tr>" + "".join(td(i, h, "th") for i, h in enumerate(headers)) + "</tr>"]
    lines += ["<tr>" + "".join(td(i, text) for i, text in enumerate(row)) + "</tr>" for row in rows]
    return "\n".join([*lines, "</table>"])


def _figure(plot: Plot) -> str:
    data = base64.b64encode(Path(plot.path).read_bytes()).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{_h(plot.title)}">'
        f"<figcaption>{_h(plot.title)}</figcaption></figure>"
    )


def _bold(text: str) -> str:
    """Escape, then turn Markdown's **bold** into <b>."""
    return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", _h(text))


_SORT_SCRIPT = """
// Sort a table.sortable by the clicked column: numbers by their data-sort, text otherwise, empty cells last;
// a second click reverses.
document.querySelectorAll("table.sortable th").forEach((th, column) => th.addEventListener("click", () => {
  const body = th.closest("table").tBodies[0], up = th.dataset.order !== "up";
  const key = (row) => { const cell = row.cells[column]; return cell.dataset.sort !== undefined
    ? Number(cell.dataset.sort) : (cell.textContent === "–" ? "" : cell.textContent); };
  const rows = [...body.rows].sort((a, b) => {
    const x = key(a), y = key(b);
    if (x === "" || y === "") return (x === "") - (y === "");
    return (x < y ? -1 : x > y ? 1 : 0) * (up ? 1 : -1);
  });
  th.dataset.order = up ? "up" : "down";
  rows.forEach((row) => body.appendChild(row));
}));
"""
