"""The report's charts, as plotly figures: one function per chart, None where the job has
nothing to draw for it."""

from __future__ import annotations

from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .data import ReportData

STAGE_COLOURS = {"read": "#8dd3c7", "tokenize": "#ffffb3", "shard": "#bebada",
                 "plan": "#fb8072", "run": "#80b1d3", "write": "#fdb462"}
LAYOUT = {"template": "plotly_white", "height": 340, "margin": {"l": 60, "r": 30, "t": 50,
                                                                 "b": 40},
          "legend": {"orientation": "h", "y": -0.2}}


def _fig(title: str, **layout: Any) -> go.Figure:
    fig = go.Figure()
    fig.update_layout(title=title, **{**LAYOUT, **layout})
    return fig


def _stage_bands(fig: go.Figure, data: ReportData) -> None:
    """The stages (read, tokenize, shard, plan, run, write) as bands on the time axis; each
    run of a resumed job has its own."""
    for span in data.summary.get("stage_spans") or []:
        fig.add_vrect(x0=span["start"] - data.started, x1=span["end"] - data.started,
                      fillcolor=STAGE_COLOURS.get(span["stage"], "#dddddd"), opacity=0.25,
                      line_width=0, layer="below", annotation_text=span["stage"],
                      annotation_position="top left", annotation_font_size=10)


def throughput(data: ReportData) -> go.Figure | None:
    s = data.series
    if s is None:
        return None
    fig = _fig("Throughput over time (tokens/s), stages as bands",
               xaxis_title="seconds since the job started", yaxis_title="tokens/s")
    fig.add_scatter(x=s.seconds, y=s.prompt_per_s.round(1), name="prompt tokens computed/s",
                    mode="lines")
    fig.add_scatter(x=s.seconds, y=s.completion_per_s.round(1), name="completion tokens/s",
                    mode="lines")
    _stage_bands(fig, data)
    return fig


def engine_steps(data: ReportData) -> go.Figure | None:
    s = data.series
    if s is None:
        return None
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.update_layout(title=f"Engine steps ({data.steps:,}): running batch, KV-cache use, "
                            "preemptions", xaxis_title="seconds since the job started", **LAYOUT)
    if s.replica_batch:
        for replica, batch in s.replica_batch.items():
            fig.add_scatter(x=s.seconds, y=batch.round(2), name=f"batch, replica {replica}",
                            mode="lines", connectgaps=False)
    else:
        fig.add_scatter(x=s.seconds, y=s.batch.round(2), name="running batch (mean)",
                        mode="lines")
    fig.add_bar(x=s.seconds, y=s.preempted, name="preemptions", opacity=0.6)
    if not np.isnan(s.kv_usage).all():
        fig.add_scatter(x=s.seconds, y=(100 * s.kv_usage).round(1), name="KV cache used % "
                        "(peak)", mode="lines", line={"dash": "dot"}, secondary_y=True)
        fig.update_yaxes(title_text="KV cache %", range=[0, 100], secondary_y=True)
    fig.update_yaxes(title_text="requests", secondary_y=False)
    return fig


def prefix_tree(data: ReportData) -> go.Figure | None:
    prefixes = data.summary.get("prefixes") or []
    if not prefixes:
        return None
    ids = [p["id"] for p in prefixes]
    labels = [f"{p['tokens']:,} tok x {p['requests']:,}" for p in prefixes]
    fig = _fig("Largest shared prefixes, sized by prompt tokens saved", height=420)
    fig.add_trace(go.Icicle(
        ids=["job", *ids], labels=["job", *labels],
        parents=["", *[p["parent"] or "job" for p in prefixes]],
        values=[sum(p["saved"] for p in prefixes if not p["parent"]),
                *[p["saved"] for p in prefixes]],
        branchvalues="total", hovertemplate="%{label}<br>saved %{value:,} tokens<extra></extra>",
        tiling={"orientation": "v"}))
    return fig


def prefill_work(data: ReportData) -> go.Figure | None:
    plan, tokens = data.summary.get("plan") or {}, data.summary.get("tokens") or {}
    bars = {"prompt tokens": tokens.get("prompt"),
            "distinct (least possible)": plan.get("distinct_prompt_tokens"),
            "block ideal (planned)": plan.get("block_ideal_computed_tokens"),
            "computed (achieved)": tokens.get("computed_prompt")}
    estimate = data.summary.get("estimate") or {}
    if estimate.get("computed_prompt") is not None:
        bars["computed (estimated, simulated)"] = estimate["computed_prompt"]
    bars = {k: v for k, v in bars.items() if v is not None}
    if not bars:
        return None
    fig = _fig("Prefill work: planned against achieved computed prompt tokens",
               yaxis_title="tokens")
    fig.add_bar(x=list(bars), y=list(bars.values()), text=[f"{v:,}" for v in bars.values()],
                marker_color=["#999999", "#66c2a5", "#8da0cb", "#fc8d62", "#e78ac3"][:len(bars)])
    return fig


def replicas_timeline(data: ReportData) -> go.Figure | None:
    replicas = data.summary.get("replicas") or []
    if not any(r.get("spans") for r in replicas):
        return None
    simulated = "simulated" in data.summary
    origin = 0.0 if simulated else data.started
    fig = make_subplots(rows=1, cols=2, column_widths=[0.7, 0.3], horizontal_spacing=0.08,
                        subplot_titles=("pieces over time", "busy seconds per replica"))
    fig.update_layout(title="Replicas: who ran what, when" + (" (simulated seconds)"
                                                              if simulated else ""), **LAYOUT)
    for r in replicas:
        spans = r.get("spans") or []
        name = f"replica {r['replica']}"
        fig.add_bar(y=[name] * len(spans), x=[e - s for s, e, _ in spans],
                    base=[s - origin for s, _, _ in spans], orientation="h", name=name,
                    text=[f"{rows:,} rows" for _, _, rows in spans], showlegend=False,
                    row=1, col=1)
    busy = [r.get("busy_s", 0.0) for r in replicas]
    fig.add_bar(x=[f"replica {r['replica']}" for r in replicas], y=busy, showlegend=False,
                row=1, col=2)
    mean = sum(busy) / len(busy)
    fig.add_hline(y=mean, line_dash="dash", annotation_text=f"mean {mean:.1f} s; busiest "
                  f"{max(busy) / mean if mean else 0:.2f}x", row=1, col=2)
    fig.update_xaxes(title_text="seconds", row=1, col=1)
    return fig


def output_lengths(data: ReportData) -> go.Figure | None:
    if not data.lengths:
        return None
    fig = _fig("Output lengths (completion tokens) by finish reason", barmode="stack",
               xaxis_title="completion tokens", yaxis_title="rows")
    for reason, (edges, counts) in data.lengths.items():
        fig.add_bar(x=((edges[:-1] + edges[1:]) / 2).round(1), y=counts, name=reason)
    return fig


def finish_reasons(data: ReportData) -> go.Figure | None:
    reasons = dict(data.summary.get("finish_reasons") or {})
    if data.summary.get("failed"):
        reasons["error"] = data.summary["failed"]
    if not reasons:
        return None
    fig = _fig("Finish reasons (rows)")
    fig.add_bar(x=list(reasons), y=list(reasons.values()),
                text=[f"{v:,}" for v in reasons.values()])
    return fig


def estimate_vs_run(data: ReportData) -> go.Figure | None:
    estimate = data.summary.get("estimate") or {}
    measured = estimate.get("measured") or {}
    keys = [k for k in ("run_seconds", "engine_steps", "computed_prompt")
            if estimate.get(k) is not None and measured.get(k) is not None]
    if not keys:
        return None
    fig = make_subplots(rows=1, cols=len(keys), subplot_titles=keys)
    fig.update_layout(title="plan --estimate (simulated) beside what happened", **LAYOUT)
    for i, key in enumerate(keys, start=1):
        fig.add_bar(x=["estimate (simulated)", "measured"], y=[estimate[key], measured[key]],
                    marker_color=["#e78ac3", "#fc8d62"], showlegend=False, row=1, col=i)
    return fig


CHARTS = (throughput, engine_steps, prefix_tree, prefill_work, replicas_timeline,
          output_lengths, finish_reasons, estimate_vs_run)
