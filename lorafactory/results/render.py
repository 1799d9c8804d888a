"""A leaderboard as text: Markdown, CSV, LaTeX (booktabs), one self-contained HTML page, and a console summary.

Tables have one row per variant, grouped by taxonomy axis, and one column per task. A cell is the mean ± std over
seeds at the variant's best learning rate, with n and that lr; the best cell of each task column is bold.
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from lorafactory.results.aggregate import Leaderboard, Runs, format_lr
from lorafactory.results.plots import ARROWS, Plot
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
    """One sentence per (model, task): variant spread at the best lr vs how much the lr moves a variant."""
    lines = []
    for row in board.sensitivity().itertuples():
        lines.append(
            f"{row.task} ({row.model}): at their best learning rates the variants span "
            f"{format_number(row.variant_spread)}; the learning rate moves a variant by "
            f"{format_number(row.lr_range_median)} (median) and up to {format_number(row.lr_range_max)} "
            f"({row.lr_range_max_variant})."
        )
    return lines


def _caption(board: Leaderboard) -> str:
    return (
        f"{board.metric.capitalize()} validation metric at each variant's best learning rate per task: mean ± std "
        "over seeds (n = successful seeds). Best per task in bold. Average rank over tasks (1 = best); costs are "
        "medians over the variant's runs."
    )


# --- Markdown, CSV, LaTeX --------------------------------------------------------------------------------------------


def markdown(board: Leaderboard) -> str:
    def cell(c: pd.Series | None) -> str:
        if c is None:
            return "–"
        text = format_mean(c["mean"], c["std"], c["n"])
        return f"{f'**{text}**' if c['best'] else text} lr {format_lr(c['lr'])}"

    lines = ["# Leaderboard", "", _caption(board), ""]
    for model in board.models():
        header = ["Axis", "Variant", *map(task_header, _task_series(board, model)), *COST_HEADERS]
        lines += [f"## {model}", "", _md_row(header), _md_row([":--", ":--"] + ["--:"] * (len(header) - 2))]
        for axis, rows in _rows(board, model, cell):
            lines += [_md_row([axis if i == 0 else "", *row]) for i, row in enumerate(rows)]
        lines.append("")
    lines += ["## Learning rate vs variant", "", *[f"- {line}" for line in sensitivity_lines(board)], ""]
    notes = _data_notes(board) + board.notes
    if notes:
        lines += ["## Notes", "", *[f"- {note}" for note in notes], ""]
    return "\n".join(lines)


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def csv_text(board: Leaderboard) -> str:
    """The tidy leaderboard: one row per (model, task, variant), numeric mean/std/n/lr columns."""
    return board.tidy().to_csv(index=False, float_format="%.10g")


def latex(board: Leaderboard) -> str:
    """One booktabs tabular per model (needs `\\usepackage{booktabs}`); the best cell of each task in bold."""

    def cell(c: pd.Series | None) -> str:
        if c is None:
            return "--"
        spread = "" if _missing(c["std"]) else rf" $\pm$ {format_number(c['std'])}"
        text = f"{format_number(c['mean'])}{spread}"
        return rf"\textbf{{{text}}}" if c["best"] else text

    n_costs = len(COST_HEADERS)
    out = [f"% {_caption(board)}", "% Requires \\usepackage{booktabs}.", ""]
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
}


def _tex(text: str) -> str:
    return re.sub(r"[&%$#_{}~^\\↑↓]", lambda m: _TEX_SPECIAL[m.group()], text)


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
"""


def html_page(board: Leaderboard, runs: Runs, status: SweepStatus, plots: list[Plot], title: str) -> str:
    """One self-contained page: inline CSS, plots as base64 PNG, no scripts and no external references."""
    sections = [
        f"<h1>{_h(title)}</h1>",
        f"<p>{_h(run_counts(runs))}. {_h(_caption(board))}</p>",
        _nav(board),
        *[_html_table(board, model) for model in board.models()],
        _html_sensitivity(board),
        _html_plots(plots),
        _html_problems(runs, status),
        _html_notes(board),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{_h(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(sections)
        + "\n</body>\n</html>\n"
    )


def _h(text: object) -> str:
    return html.escape(str(text))


def _anchor(model: str) -> str:
    return "model-" + re.sub(r"[^A-Za-z0-9_-]+", "-", model)


def _nav(board: Leaderboard) -> str:
    links = [(f"#{_anchor(m)}", m) for m in board.models()]
    links += [("#plots", "plots"), ("#problems", "failed and missing runs"), ("#notes", "notes")]
    return "<nav>" + "".join(f'<a href="{href}">{_h(text)}</a>' for href, text in links) + "</nav>"


def _html_table(board: Leaderboard, model: str) -> str:
    def cell(c: pd.Series | None) -> str:
        if c is None:
            return "<td>–</td>"
        text = _h(format_mean(c["mean"], c["std"], c["n"]))
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


def _html_notes(board: Leaderboard) -> str:
    notes = _data_notes(board) + board.notes
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


def text_summary(board: Leaderboard, runs: Runs, top: int = 3) -> str:
    """Per model and task, the `top` variants with mean ± std; then the run counts and notes."""
    lines = [f"{runs.root}: {run_counts(runs)}"]
    for task in board.tasks.itertuples():
        direction = "higher" if task.direction == "max" else "lower"
        lines.append(f"{task.model} {task.task} ({board.metric} {task.primary_metric}, {direction} is better)")
        cells = board.cells[(board.cells["model"] == task.model) & (board.cells["task"] == task.task)]
        width = max(len(v) for v in cells["variant"])
        for c in cells.sort_values(["rank", "variant"]).head(top).itertuples():
            lines.append(f"  {c.rank}. {c.variant:<{width}}  {format_mean(c.mean, c.std, c.n)}  lr {format_lr(c.lr)}")
    lines += sensitivity_lines(board)
    lines += [f"note: {note}" for note in _data_notes(board) + board.notes]
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
