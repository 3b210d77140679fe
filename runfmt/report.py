"""Reports: runs as rows (status, stage counts, counters, metric means) in several formats.

`build_report` reads the manifests, and the records of one stage when metrics
are asked for; `render` turns the result into JSON, Markdown (for an issue),
CSV, LaTeX (booktabs, for a paper) or one self-contained HTML page.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from runfmt.compare import field_value, numeric_value
from runfmt.errors import InvalidInputError
from runfmt.format.records import is_failure
from runfmt.run import RunReader

__all__ = ["FORMATS", "Metric", "Report", "RunRow", "StageRow", "build_report", "render"]

Format = Literal["json", "md", "csv", "latex", "html"]
FORMATS: tuple[Format, ...] = ("json", "md", "csv", "latex", "html")


@dataclass(frozen=True, slots=True)
class StageRow:
    name: str
    status: str
    records: int
    failures: int
    bytes: int


@dataclass(frozen=True, slots=True)
class Metric:
    """A field aggregated over a stage's records: failures and records without it left out."""

    mean: float | None
    count: int
    missing: int


@dataclass(frozen=True, slots=True)
class RunRow:
    run_id: str
    name: str
    status: str
    created_at: str
    stages: dict[str, StageRow]
    counters: dict[str, float | int]
    metrics: dict[str, Metric]


@dataclass(frozen=True, slots=True)
class Report:
    rows: list[RunRow]
    stage: str | None
    metrics: list[str]

    @property
    def stage_names(self) -> list[str]:
        seen: dict[str, None] = {}
        for row in self.rows:
            seen.update(dict.fromkeys(row.stages))
        return list(seen)

    @property
    def counter_names(self) -> list[str]:
        return sorted({k for row in self.rows for k in row.counters})

    def to_json(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "metrics": self.metrics,
            "runs": [
                {
                    "run_id": r.run_id,
                    "name": r.name,
                    "status": r.status,
                    "created_at": r.created_at,
                    "stages": {
                        s.name: {
                            "status": s.status,
                            "records": s.records,
                            "failures": s.failures,
                            "bytes": s.bytes,
                        }
                        for s in r.stages.values()
                    },
                    "counters": r.counters,
                    "metrics": {
                        k: {"mean": m.mean, "count": m.count, "missing": m.missing}
                        for k, m in r.metrics.items()
                    },
                }
                for r in self.rows
            ],
        }


_SCALE = 64
"""A sum that overflows is taken again of the values times 2**-64, which is exact for
values that large, so that the mean of finite values is finite."""


class _Mean:
    """The mean of many floats, from exact (`math.fsum`) sums of batches of them."""

    def __init__(self) -> None:
        self.count = 0
        self._sums: list[float] = []
        self._scaled: list[float] = []
        self._overflowed = False

    def add(self, values: list[float]) -> None:
        self.count += len(values)
        try:
            total = math.fsum(values)
        except OverflowError:
            self._overflowed = True
            self._scaled.append(math.fsum(math.ldexp(v, -_SCALE) for v in values))
        else:
            self._sums.append(total)
            self._scaled.append(math.ldexp(total, -_SCALE))

    def value(self) -> float | None:
        if not self.count:
            return None
        if not self._overflowed:
            try:
                return math.fsum(self._sums) / self.count
            except OverflowError:
                pass
        return math.ldexp(math.fsum(self._scaled) / self.count, _SCALE)


def _metrics(run: RunReader, stage: str, fields: Sequence[str]) -> dict[str, Metric]:
    """Each field's mean over the stage's non-failure records: an exact sum (`math.fsum`)
    of each batch, so neither the order of the records nor big values change it."""
    means = {name: _Mean() for name in fields}
    missing = dict.fromkeys(fields, 0)
    where = f"{run.storage.where()} stage {stage}"
    values: dict[str, list[float]] = {name: [] for name in fields}
    for batch in run.record_batches(stage):
        for record in batch:
            if is_failure(record):
                continue
            for name in fields:
                if name in record:
                    raw = record[name]
                else:
                    try:
                        raw = field_value(record, name)
                    except KeyError:
                        missing[name] += 1
                        continue
                if type(raw) is not float and type(raw) is not int:
                    raw = numeric_value(raw, name, where)
                values[name].append(raw)
        for name, got in values.items():
            means[name].add(got)
            got.clear()
    return {name: Metric(means[name].value(), means[name].count, missing[name]) for name in fields}


def build_report(
    runs: Sequence[RunReader], stage: str | None = None, metrics: Sequence[str] = ()
) -> Report:
    """One row per run; ``metrics`` are fields of ``stage`` averaged over its non-failure records.

    Raises `InvalidInputError` when metrics are asked without a stage, when no
    run has ``stage``, or when no record of it has one of the ``metrics``.
    """
    metrics = list(dict.fromkeys(metrics))
    if metrics and stage is None:
        raise InvalidInputError("metrics need a stage", hint="pass --stage with --metric")
    if stage is not None and runs and not any(r.manifest.stage(stage) for r in runs):
        known = sorted({s.name for r in runs for s in r.manifest.stages})
        raise InvalidInputError(
            f"no run has a stage {stage!r} (stages: {', '.join(known) or 'none'})"
        )
    rows = []
    for run in runs:
        m = run.manifest
        has_stage = stage is not None and m.stage(stage) is not None
        rows.append(
            RunRow(
                run_id=m.run_id,
                name=m.name,
                status=m.status,
                created_at=m.created_at,
                stages={
                    s.name: StageRow(s.name, s.status, s.records, s.failures, s.bytes)
                    for s in m.stages
                },
                counters=dict(m.counters),
                metrics=_metrics(run, stage, metrics) if has_stage and stage else {},
            )
        )
    for name in metrics:
        if not any(r.metrics.get(name) and r.metrics[name].count for r in rows):
            raise InvalidInputError(
                f"no record of stage {stage!r} has a field {name!r}",
                hint="check the field name with `runfmt cat RUN STAGE | head`",
            )
    return Report(rows, stage, metrics)


def _number(value: float | None, digits: int) -> str:
    """``digits`` decimals, but no more digits in all than the 15 a float holds (in exponent
    form from 1e15 on); under 1 in magnitude, as many as ``digits`` significant digits take
    (a small cost or rate never shows as zero), in exponent form past 6 more."""
    if value is None:
        return ""
    if isinstance(value, int):
        return str(value)
    if abs(value) >= 1e15:
        return f"{value:.15g}"
    decimals = digits
    if 0 < abs(value) < 1:
        decimals = max(digits, 1) - 1 - math.floor(math.log10(abs(value)))
    elif abs(value) >= 1 and math.isfinite(value):
        decimals = max(0, min(digits, 14 - math.floor(math.log10(abs(value)))))
    if decimals > digits + 6:
        return f"{value:.{max(digits, 1)}g}"
    return f"{value:.{decimals}f}"


@dataclass(frozen=True, slots=True)
class _Column:
    title: str
    numeric: bool
    cell: Callable[[RunRow], str]


def _columns(report: Report, digits: int) -> list[_Column]:
    def stage_cell(name: str) -> Callable[[RunRow], str]:
        def cell(row: RunRow) -> str:
            s = row.stages.get(name)
            if s is None:
                return ""
            return f"{s.records} ({s.failures} failed)" if s.failures else str(s.records)

        return cell

    def counter_cell(name: str) -> Callable[[RunRow], str]:
        def cell(row: RunRow) -> str:
            return _number(row.counters.get(name), digits)

        return cell

    def metric_cell(name: str, part: str) -> Callable[[RunRow], str]:
        def cell(row: RunRow) -> str:
            m = row.metrics.get(name)
            if m is None:
                return ""
            return _number(m.mean, digits) if part == "mean" else str(m.count)

        return cell

    columns = [
        _Column("run", False, lambda r: r.run_id),
        _Column("name", False, lambda r: r.name),
        _Column("status", False, lambda r: r.status),
    ]
    columns += [_Column(s, True, stage_cell(s)) for s in report.stage_names]
    columns += [_Column(c, True, counter_cell(c)) for c in report.counter_names]
    for name in report.metrics:
        columns.append(_Column(f"{name} (mean)", True, metric_cell(name, "mean")))
        columns.append(_Column(f"{name} (n)", True, metric_cell(name, "count")))
    return columns


def _one_line(text: str) -> str:
    """``text`` with every line break and other control character as a space: a table
    cell stays on its row, and a terminal shown the table gets no escape sequence."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else " " for c in text)


def _markdown(report: Report, digits: int) -> str:
    def esc(text: str) -> str:
        return _one_line(text).replace("\\", "\\\\").replace("|", "\\|")

    columns = _columns(report, digits)
    lines = [
        "| " + " | ".join(esc(c.title) for c in columns) + " |",
        "|" + "|".join("---:" if c.numeric else "---" for c in columns) + "|",
    ]
    lines += ["| " + " | ".join(esc(c.cell(r)) for c in columns) + " |" for r in report.rows]
    return "\n".join(lines) + "\n"


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def latex_escape(text: str) -> str:
    """Text safe in a LaTeX table cell."""
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in _one_line(text))


def _latex(report: Report, digits: int) -> str:
    columns = _columns(report, digits)
    spec = "".join("r" if c.numeric else "l" for c in columns)
    lines = [
        "% needs \\usepackage{booktabs}",
        f"\\begin{{tabular}}{{{spec}}}",
        "\\toprule",
        " & ".join(latex_escape(c.title) for c in columns) + " \\\\",
        "\\midrule",
    ]
    lines += [" & ".join(latex_escape(c.cell(r)) for c in columns) + " \\\\" for r in report.rows]
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


def _csv(report: Report) -> str:
    stages, counters = report.stage_names, report.counter_names
    header = ["run_id", "name", "status", "created_at"]
    for s in stages:
        header += [f"{s}.status", f"{s}.records", f"{s}.failures", f"{s}.bytes"]
    header += [f"counter.{c}" for c in counters]
    for m in report.metrics:
        header += [f"{m}.mean", f"{m}.count"]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for r in report.rows:
        row: list[Any] = [r.run_id, r.name, r.status, r.created_at]
        for s in stages:
            st = r.stages.get(s)
            row += [st.status, st.records, st.failures, st.bytes] if st else ["", "", "", ""]
        row += [r.counters.get(c, "") for c in counters]
        for m in report.metrics:
            metric = r.metrics.get(m)
            row += [
                "" if metric is None or metric.mean is None else repr(metric.mean),
                "" if metric is None else metric.count,
            ]
        writer.writerow(row)
    return out.getvalue()


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:2em}
table{border-collapse:collapse}th,td{padding:4px 10px;border-bottom:1px solid #ddd;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.progress{display:flex;width:160px;height:10px;background:#eee;border-radius:3px;overflow:hidden}
.progress span{display:block;height:100%}td{white-space:nowrap}
.ok{background:#3a7}.failed{background:#d44}
.running .ok{background:#48c}.status-failed{color:#b22}.status-running{color:#26a}
small{color:#666}svg text{font:11px system-ui,sans-serif}
"""


def _progress(report: Report) -> str:
    stages = report.stage_names
    largest = {
        s: max((r.stages[s].records for r in report.rows if s in r.stages), default=0)
        for s in stages
    }
    head = "".join(f"<th>{html.escape(s)}</th>" for s in stages)
    body = []
    for r in report.rows:
        cells = []
        for s in stages:
            st = r.stages.get(s)
            if st is None:
                cells.append("<td></td>")
                continue
            top = largest[s] or 1
            ok = 100 * (st.records - st.failures) / top
            bad = 100 * st.failures / top
            label = f"{st.records} records" + (f", {st.failures} failed" if st.failures else "")
            cells.append(
                f'<td class="{html.escape(st.status)}" data-stage="{html.escape(s)}">'
                f'<div class="progress" title="{html.escape(label)}">'
                f'<span class="ok" style="width:{ok:.1f}%"></span>'
                f'<span class="failed" style="width:{bad:.1f}%"></span></div>'
                f"<small>{html.escape(label)} · {html.escape(st.status)}</small></td>"
            )
        body.append(f"<tr><td>{html.escape(r.run_id)}</td>{''.join(cells)}</tr>")
    return (
        f'<table id="progress"><thead><tr><th>run</th>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def _chart(report: Report, name: str, digits: int) -> str:
    """An SVG bar chart of one metric's mean across the runs, in report order."""
    values = [(r, r.metrics[name].mean if name in r.metrics else None) for r in report.rows]
    known = [v for _, v in values if v is not None]
    top = max([*known, 0.0])
    low = min([*known, 0.0])
    span = (top - low) or 1.0
    bar_w, gap, height, pad = 60, 20, 180, 30
    width = pad * 2 + len(values) * (bar_w + gap)
    zero_y = pad + height * top / span
    parts = [
        f'<svg class="chart" data-metric="{html.escape(name)}" xmlns="http://www.w3.org/2000/svg"'
        f' width="{width}" height="{height + pad * 3}" role="img"'
        f' aria-label="{html.escape(name)} by run">',
        f'<line x1="{pad}" x2="{width - pad}" y1="{zero_y:.1f}" y2="{zero_y:.1f}" stroke="#999"/>',
    ]
    for i, (row, value) in enumerate(values):
        x = pad + i * (bar_w + gap)
        label = html.escape(row.name if len(row.name) <= 10 else row.name[:9] + "…")
        parts.append(
            f'<text x="{x + bar_w / 2:.1f}" y="{height + pad * 2:.1f}" text-anchor="middle">'
            f"{label}</text>"
        )
        if value is None:
            continue
        h = height * abs(value) / span
        y = zero_y - h if value >= 0 else zero_y
        text = _number(value, digits)
        parts.append(
            f'<rect class="value" data-run="{html.escape(row.run_id)}" x="{x}" y="{y:.1f}"'
            f' width="{bar_w}" height="{max(h, 0.5):.1f}" fill="#48c">'
            f"<title>{html.escape(row.run_id)}: {text}</title></rect>"
            f'<text x="{x + bar_w / 2:.1f}" y="{(y - 4 if value >= 0 else y + h + 12):.1f}"'
            f' text-anchor="middle">{text}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _html(report: Report, digits: int, title: str) -> str:
    columns = _columns(report, digits)
    head = "".join(f"<th>{html.escape(c.title)}</th>" for c in columns)
    rows = []
    for r in report.rows:
        cells = []
        for c in columns:
            cls = ' class="num"' if c.numeric else ""
            if c.title == "status":
                cls = f' class="status-{html.escape(r.status)}"'
            cells.append(f"<td{cls}>{html.escape(c.cell(r))}</td>")
        rows.append(f'<tr data-run="{html.escape(r.run_id)}">{"".join(cells)}</tr>')
    charts = (
        "".join(
            f"<h2>{html.escape(name)} (mean of stage {html.escape(report.stage or '')})</h2>"
            + _chart(report, name, digits)
            for name in report.metrics
        )
        or "<p><small>No chart: pass --stage and --metric to chart a metric.</small></p>"
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        f'<h2>Runs</h2><table id="runs"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
        f"<h2>Stage progress</h2><p><small>Bars are relative to the run with the most records"
        f" in that stage; red is failures.</small></p>{_progress(report)}"
        f"{charts}</body></html>\n"
    )


def render(report: Report, fmt: Format, *, digits: int = 3, title: str = "runfmt report") -> str:
    """The report as text in ``fmt``: json, md, csv, latex or html."""
    if fmt == "json":
        return json.dumps(report.to_json(), indent=2, ensure_ascii=False) + "\n"
    if fmt == "md":
        return _markdown(report, digits)
    if fmt == "csv":
        return _csv(report)
    if fmt == "latex":
        return _latex(report, digits)
    if fmt == "html":
        return _html(report, digits, title)
    raise InvalidInputError(f"unknown report format {fmt!r} (formats: {', '.join(FORMATS)})")
