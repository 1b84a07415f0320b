"""What the report draws, read from a job's files and aggregated: the summary, the per-step
trace binned on the time axis (never one point per step), the results' lengths, finish
reasons and errors. Everything is small enough for the page whatever the job's size."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
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
RESULT_BATCH_ROWS = 1 << 16


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
    results = _Results()
    for batch in _result_batches(output):
        results.add(batch)
    return ReportData(summary, started, steps.num_rows, _binned(steps, started),
                      results.length_histograms(), results.errors())


def _steps(output: Path) -> pa.Table:
    if trace_path_for(output).exists():
        return read_saved_trace(output)
    partial = partial_dir_for(output)  # a stopped run: the trace is still in the checkpoint
    return read_trace(partial) if partial.is_dir() else TRACE_SCHEMA.empty_table()


def _result_batches(output: Path) -> Iterator[pa.RecordBatch]:
    """The columns the report reads, batch by batch (a 10M-row job's ids and reasons are a
    gigabyte at once); an embedding job's rows have no finish reason or completion."""
    wanted = ["id", "finish_reason", "completion_tokens", "error"]
    if output.exists():
        names = pq.read_schema(output).names
        yield from pq.ParquetFile(output).iter_batches(
            batch_size=RESULT_BATCH_ROWS, columns=[c for c in wanted if c in names])
        return
    partial = partial_dir_for(output)  # a stopped run: its results are in the journals
    if partial.is_dir():
        for batch in journal_batches(sorted(partial.glob("journal-*.arrows"))):
            yield batch.select([c for c in wanted if c in batch.schema.names])


@dataclass
class _Results:
    """What the report keeps of the results, gathered batch by batch: per finish reason,
    the finished rows counted by completion length (memory grows with the longest
    completion, not with the rows), and the errors."""

    length_counts: dict[str, np.ndarray] = field(default_factory=dict)
    error_rows: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, batch: pa.RecordBatch) -> None:
        failed = pc.is_valid(batch.column("error"))
        if pc.any(failed).as_py():
            errors = batch.filter(failed)
            for message, row_id in zip(errors.column("error").to_pylist(),
                                       errors.column("id").to_pylist(), strict=True):
                self.error_rows[message] += 1
                if len(kept := self.examples.setdefault(message, [])) < EXAMPLE_IDS:
                    kept.append(row_id)
        if "completion_tokens" not in batch.schema.names:
            return
        ok = batch.filter(pc.invert(failed))
        lengths = ok.column("completion_tokens").to_numpy(zero_copy_only=False)
        reasons = pc.fill_null(ok.column("finish_reason"), "none").dictionary_encode()
        codes = reasons.indices.to_numpy()
        for k, reason in enumerate(reasons.dictionary.to_pylist()):
            counts = np.bincount(lengths[codes == k].astype(np.int64))
            before = self.length_counts.get(reason, np.zeros(0, np.int64))
            grown = np.zeros(max(len(before), len(counts)), np.int64)
            grown[:len(before)] += before
            grown[:len(counts)] += counts
            self.length_counts[reason] = grown

    def errors(self) -> list[tuple[str, int, list[str]]]:
        return [(m, n, self.examples[m]) for m, n in self.error_rows.most_common(ERROR_GROUPS)]

    def length_histograms(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per finish reason: (bin edges, rows per bin) of the completion lengths, in
        LENGTH_BINS equal bins from the shortest completion to the longest."""
        present = [np.flatnonzero(c) for c in self.length_counts.values()]
        present = [p for p in present if len(p)]
        if not present:
            return {}
        shortest, longest = min(int(p[0]) for p in present), max(int(p[-1]) for p in present)
        bins = min(LENGTH_BINS, longest + 1)
        edges = np.histogram_bin_edges(np.array([shortest, longest], np.float64), bins=bins)
        out = {}
        for reason, counts in self.length_counts.items():
            value = np.arange(len(counts), dtype=np.float64)
            which = np.clip(((value - edges[0]) / (edges[-1] - edges[0] or 1) * bins).astype(
                np.int64), 0, bins - 1)
            out[reason] = (edges, np.bincount(which, weights=counts, minlength=bins).astype(
                np.int64))
        return out


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
