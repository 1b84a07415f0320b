"""The report page: one self-contained HTML file (plotly's JavaScript embedded, no network
needed to open it), its charts (charts.py) and tables drawn from the job's files
(data.py). `<output>.report.html` is written beside the summary."""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import plotly.offline

from ..io.files import temp_path
from . import charts
from .data import ReportData, load, output_for

STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1200px; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 28px; }
table { border-collapse: collapse; font-size: 13px; margin: 6px 0 16px; }
td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
.chart { border: 1px solid #eee; margin: 10px 0; }
.note { color: #666; font-size: 13px; }
"""


def report_path_for(output: Path) -> Path:
    return output.with_name(output.name + ".report.html")


def write_report(summary_path: Path, dest: Path | None = None) -> Path:
    """Build the report of the job whose summary is `summary_path`; where it was written
    (default: `<output>.report.html`)."""
    dest = dest or report_path_for(output_for(summary_path))
    _write(dest, render(load(summary_path)))
    return dest


def write_plan_report(figures: dict[str, Any], dest: Path) -> Path:
    """The plan of a job not run yet (`batchrun plan --report`): its prefill figures, and
    the simulated estimate when there is one."""
    estimate = figures.get("estimate") or {}
    summary = {"plan": figures, "tokens": {"prompt": figures.get("prompt_tokens")},
               "estimate": {k: v for k, v in estimate.items() if k != "measured"}}
    data = ReportData(summary, 0.0, 0, None, {}, [])
    parts = [_chart(fig, i) for i, fig in enumerate(
        filter(None, (charts.prefill_work(data), _estimate_bars(estimate))))]
    body = [f"<h1>Plan of {html.escape(str(figures.get('input', 'the job')))}</h1>",
            "<p class=note>Before any engine started; figures marked simulated come from the "
            "sim engine's cost profile (an assumption until measured).</p>", *parts,
            "<h2>Plan figures</h2>", _table(figures)]
    _write(dest, _page("batchrun plan", body))
    return dest


def _estimate_bars(estimate: dict[str, Any]) -> go.Figure | None:
    keys = [k for k in ("engine_steps", "computed_prompt", "completion", "run_seconds")
            if isinstance(estimate.get(k), (int, float))]
    if not keys:
        return None
    fig = charts._fig("Estimate (simulated): " + ", ".join(keys))
    fig.add_bar(x=keys, y=[estimate[k] for k in keys], text=[f"{estimate[k]:,}" for k in keys])
    return fig


def render(data: ReportData) -> str:
    s = data.summary
    figures = [fig for chart in charts.CHARTS if (fig := chart(data)) is not None]
    body = [f"<h1>batchrun job: {html.escape(str(s.get('output', '')))}</h1>",
            f"<p>{_headline(s)}</p>", _notes(s),
            *(_chart(fig, i) for i, fig in enumerate(figures)),
            "<h2>Errors, grouped by message</h2>", _errors(data),
            "<h2>Structured outputs</h2>", _table(s.get("structured_outputs") or {}),
            "<h2>Engine sizing (the settings that sized the engine, and why)</h2>",
            _table(s.get("engine_sizing") or {"engine_sizing": "not recorded (a shared "
                                                                "engine, or nothing to run)"}),
            "<h2>Model and engine</h2>", _table({"model": s.get("model"),
                                                 **(s.get("engine") or {})}),
            "<h2>Hardware</h2>", _table(s.get("host") or {}),
            "<h2>Plan</h2>", _table(s.get("plan") or {}),
            "<h2>Stages</h2>", _table(s.get("stages") or {})]
    return _page(f"batchrun report: {s.get('output', '')}", body)


def _headline(s: dict[str, Any]) -> str:
    tokens = s.get("tokens") or {}
    parts = [f"status <b>{html.escape(str(s.get('status')))}</b>",
             f"{s.get('rows', 0):,} rows ({s.get('succeeded', 0):,} ok, {s.get('failed', 0):,} "
             "failed)", f"{tokens.get('prompt', 0):,} prompt and {tokens.get('completion', 0):,} "
             "completion tokens", f"wall time {s.get('wall_time_s', 0):,.1f} s",
             f"{s.get('tokens_per_s', 0):,.0f} tokens/s",
             f"{s.get('duplicate_rows', 0):,} duplicate rows served once (dedupe)"]
    return " &middot; ".join(parts)


def _notes(s: dict[str, Any]) -> str:
    notes = []
    if "simulated" in s:
        notes.append("This run used the sim engine (or a simulated fleet): its seconds are "
                     "simulated from a cost profile, not measured, and the time axis of the "
                     "step charts is the simulation's own wall time (its steps and tokens are "
                     "vLLM's scheduler's).")
    if s.get("status") != "ok":
        notes.append(f"The job did not complete ({html.escape(str(s.get('status')))}): this "
                     "report covers the rows finished so far.")
    return "".join(f"<p class=note>{n}</p>" for n in notes)


def _chart(fig: go.Figure, n: int) -> str:
    div = fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"chart-{n}",
                      config={"displaylogo": False, "responsive": True})
    return f"<div class=chart>{div}</div>"


def _errors(data: ReportData) -> str:
    if not data.errors:
        return "<p class=note>No row failed.</p>"
    rows = "".join(f"<tr><td>{html.escape(m)}</td><td>{n:,}</td>"
                   f"<td>{html.escape(', '.join(ids))}</td></tr>" for m, n, ids in data.errors)
    return f"<table><tr><th>error</th><th>rows</th><th>example row ids</th></tr>{rows}</table>"


def _table(values: dict[str, Any]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, dict):
            return _table(v)
        if isinstance(v, float):
            return f"{v:,.4g}"
        if isinstance(v, int) and not isinstance(v, bool):
            return f"{v:,}"
        return html.escape(v if isinstance(v, str) else json.dumps(v, default=str))

    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{cell(v)}</td></tr>"
                   for k, v in values.items())
    return f"<table>{rows}</table>"


def _page(title: str, body: list[str]) -> str:
    # plotly's JavaScript inline (~4.8 MB): the file opens with no network.
    return (f"<!DOCTYPE html><html><head><meta charset=utf-8><title>{html.escape(title)}"
            f"</title><style>{STYLE}</style><script>{plotly.offline.get_plotlyjs()}</script>"
            f"</head><body>{''.join(body)}</body></html>")


def _write(dest: Path, page: str) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(dest)
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, dest)
