"""What the report draws, read from a job's files and aggregated: the summary, the per-step
trace binned on the time axis (never one point per step), the results' lengths, finish
reasons and errors. Everything is small enough for the page whatever the job's size."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..io.output.checkpoint import journal_batches, partial_dir_for
from ..io.output.trace import TRACE_SCHEMA, read_saved_trace, read_trace, trace_path_for

SUMMARY_SUFFIX = ".summary.json"
TIME_BINS = 400  # points per series on the time axis
LENGTH_BINS = 60
ERROR_GROUPS = 20
EXAMPLE_IDS = 5


def output_for(summary_path: Path) -> Path:
    """The local output a summary sits beside (`<output>.summary.json`)."""
    name = summary_path.name
    if not name.endswith(SUMMARY_SUFFIX):
        raise ValueError(f"{summary_path} is not a batchrun summary (*{SUMMARY_SUFFIX})")
    return summary_path.with_name(name[:-len(SUMMARY_SUFFIX)])


@dataclass
class TimeSeries:
    """The trace binned over time: bin centres in seconds from the job's start, and per bin
    tokens/s, the mean running batch, the peak KV use (0-1, NaN where unknown) and the
    preemptions; per replica, the mean batch."""

    seconds: np.ndarray
    prompt_per_s: np.ndarray
    completion_per_s: np.ndarray
    batch: np.ndarray
    kv_usage: np.ndarray
    preempted: np.ndarray
    replica_batch: dict[int, np.ndarray] = field(default_factory=dict)


@dataclass
class ReportData:
    summary: dict[str, Any]
    started: float  # seconds since the epoch the time axis counts from
    steps: int
    series: TimeSeries | None
    lengths: dict[str, tuple[np.ndarray, np.ndarray]]  # finish reason -> (bin edges, counts)
    errors: list[tuple[str, int, list[str]]]  # message, rows, example ids


def load(summary_path: Path) -> ReportData:
    summary = json.loads(summary_path.read_text())
    output = output_for(summary_path)
    steps = _steps(output)
    spans = summary.get("stage_spans") or []
    starts = [s["start"] for s in spans]
    if steps.num_rows:
        starts.append(float(pc.min(steps["time"]).as_py()) - float(steps["seconds"][0].as_py()))
    started = min(starts) if starts else 0.0
    results = _results(output)
    return ReportData(summary, started, steps.num_rows, _binned(steps, started),
                      _lengths(results), _errors(results))


def _steps(output: Path) -> pa.Table:
    if trace_path_for(output).exists():
        return read_saved_trace(output)
    partial = partial_dir_for(output)  # a stopped run: the trace is still in the checkpoint
    return read_trace(partial) if partial.is_dir() else TRACE_SCHEMA.empty_table()


def _results(output: Path) -> pa.Table | None:
    """The columns the report draws; an embedding job's rows have no finish reason or
    completion."""
    wanted = ["id", "finish_reason", "completion_tokens", "error"]
    if output.exists():
        names = pq.read_schema(output).names
        return pq.read_table(output, columns=[c for c in wanted if c in names])
    partial = partial_dir_for(output)
    batches = [b.select([c for c in wanted if c in b.schema.names]) for b in journal_batches(
        sorted(partial.glob("journal-*.arrows")))] if partial.is_dir() else []
    return pa.Table.from_batches(batches) if batches else None


def _binned(steps: pa.Table, started: float) -> TimeSeries | None:
    if not steps.num_rows:
        return None
    t = steps["time"].to_numpy() - started
    end = float(t.max())
    bins = min(TIME_BINS, steps.num_rows)
    edges = np.linspace(0.0, max(end, 1e-3), bins + 1)
    width = edges[1] - edges[0]
    which = np.clip(np.searchsorted(edges, t, side="right") - 1, 0, bins - 1)

    def total(column: str) -> np.ndarray:
        return np.bincount(which, steps[column].to_numpy().astype(np.float64), bins)

    counts = np.bincount(which, minlength=bins)
    stepped = counts > 0
    batch = np.full(bins, np.nan)
    batch[stepped] = total("batch")[stepped] / counts[stepped]
    kv = steps["kv_usage"].to_numpy(zero_copy_only=False).astype(np.float64)
    peak = np.full(bins, -1.0)
    known = ~np.isnan(kv)
    np.maximum.at(peak, which[known], kv[known])
    peak[peak < 0] = np.nan
    replicas = steps["replica"].to_numpy()
    per_replica = {}
    if (replicas >= 0).any():
        for r in np.unique(replicas):
            mine = replicas == r
            n = np.bincount(which[mine], minlength=bins)
            sizes = np.bincount(which[mine], steps["batch"].to_numpy()[mine].astype(np.float64),
                                bins)
            mean = np.full(bins, np.nan)
            mean[n > 0] = sizes[n > 0] / n[n > 0]
            per_replica[int(r)] = mean
    return TimeSeries((edges[:-1] + edges[1:]) / 2, total("prompt_tokens") / width,
                      total("completion_tokens") / width, batch, peak,
                      total("preempted"), per_replica)


def _lengths(results: pa.Table | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    if results is None or not results.num_rows or "completion_tokens" not in \
            results.column_names:
        return {}
    ok = results.filter(pc.is_null(results["error"]))
    lengths = ok["completion_tokens"].to_numpy(zero_copy_only=False).astype(np.float64)
    if not len(lengths):
        return {}
    bins = min(LENGTH_BINS, int(lengths.max()) + 1)
    edges = np.histogram_bin_edges(lengths, bins=bins)
    # Equal-width bins by arithmetic and counts by bincount: np.histogram sorts, and 10M
    # rows' reasons as Python strings would take longer than the rest of the report.
    which = np.clip(((lengths - edges[0]) / (edges[-1] - edges[0] or 1) * bins).astype(
        np.int64), 0, bins - 1)
    reasons = pc.fill_null(ok["finish_reason"], "none").combine_chunks().dictionary_encode()
    codes = reasons.indices.to_numpy()
    return {str(reason): (edges, np.bincount(which[codes == k], minlength=bins))
            for k, reason in enumerate(reasons.dictionary.to_pylist())}


def _errors(results: pa.Table | None) -> list[tuple[str, int, list[str]]]:
    if results is None:
        return []
    failed = results.filter(pc.is_valid(results["error"]))
    if not failed.num_rows:
        return []
    counts = Counter(failed["error"].to_pylist())
    examples: dict[str, list[str]] = {}
    for message, row_id in zip(failed["error"].to_pylist(), failed["id"].to_pylist(),
                               strict=True):
        if len(kept := examples.setdefault(message, [])) < EXAMPLE_IDS:
            kept.append(row_id)
    return [(m, n, examples[m]) for m, n in counts.most_common(ERROR_GROUPS)]
