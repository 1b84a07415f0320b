"""Stage "write": the final output in input order, from the result journals, in bounded memory.

Results reach the journals in run order (prefix order, shard by shard), never in input
order, and a big job's results do not fit in memory at once. So the output is written row
range by row range: the journals are read once and their rows sorted into range files
(`bucket-*.arrows` beside the journals); then each range is read, put in row order, joined
with the input's pass-through columns for the same rows (`InputColumns`, kept from the read)
and appended to the Parquet file (and the OpenAI JSONL file) as its own row groups. A job
whose results fit in one range skips the range files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ...plan.blocks import ceil_div
from ..files import fsync_dir, temp_path
from ..input.readers import cast_passthrough, unified_passthrough_schema
from ..schema import ADAPTER, RESULT_SCHEMA, output_result_schema
from .checkpoint import journal_batches
from .openai_batch import write_openai_lines

ENDPOINT = "endpoint"
# An embedding job's OpenAI lines: how many inputs each has where it has several (null: one).
INPUT_COUNT = "input_count"
ROW_GROUP_SIZE = 65_536  # rows per row group of the output Parquet file


@dataclass
class InputColumns:
    """Columns of the input that the output repeats (pass-through columns, and each row's
    endpoint for the OpenAI output), in row order, as read. Kept in memory up to
    `memory_bytes`, then written to `spill_dir` part by part."""

    spill_dir: Path
    memory_bytes: int
    parts: list[tuple[int, pa.Table | Path]] = field(default_factory=list)  # (first row, part)
    schemas: list[pa.Schema] = field(default_factory=list)
    rows: int = 0
    in_memory: int = 0

    def append(self, table: pa.Table) -> None:
        """The next rows' columns (the rows right after those appended before)."""
        self.schemas.append(table.schema)
        part: pa.Table | Path = table
        if self.in_memory + table.nbytes > self.memory_bytes:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            part = self.spill_dir / f"input-columns-{len(self.parts):05d}.arrow"
            with pa.OSFile(str(part), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
                w.write_table(table)
        else:
            self.in_memory += table.nbytes
        self.parts.append((self.rows, part))
        self.rows += table.num_rows

    def schema(self) -> pa.Schema:
        """One schema for all parts (the readers' rule for pass-through columns)."""
        if not self.schemas:
            return pa.schema([])
        return unified_passthrough_schema(self.schemas, self.schemas[0].names)

    def rows_between(self, start: int, stop: int, schema: pa.Schema) -> pa.Table:
        """Rows [start, stop) in `schema`."""
        starts = [s for s, _ in self.parts]
        first = max(int(np.searchsorted(starts, start, side="right")) - 1, 0)
        pieces = []
        for k in range(first, len(self.parts)):
            at, part = self.parts[k]
            if at >= stop:
                break
            table = part if isinstance(part, pa.Table) else _read_ipc_file(part)
            lo, hi = max(start - at, 0), min(stop - at, table.num_rows)
            if hi > lo:
                pieces.append(cast_passthrough(table.slice(lo, hi - lo), schema))
        if not pieces:
            return schema.empty_table()
        return pa.concat_tables(pieces)


def input_counts(requests: pa.Table) -> pa.ChunkedArray:
    """Each request row's inputs where it has several (its `inputs` or `input_lengths`), else
    null: the INPUT_COUNT column."""
    return pc.coalesce(pc.list_value_length(requests["inputs"]),
                       pc.list_value_length(requests["input_lengths"]))


def _read_ipc_file(path: Path) -> pa.Table:
    with pa.OSFile(str(path), "rb") as f:
        return pa.ipc.open_file(f).read_all()


@dataclass(frozen=True)
class OutputFiles:
    """Where the output goes: the Parquet file and, if asked for, the OpenAI JSONL file."""

    parquet: Path
    openai: Path | None = None
    model: str = ""
    embeds: bool = False  # an embedding job: its columns, and /v1/embeddings OpenAI lines


# Ranges are bucket files open at once while the journals are split: past this many, each
# range holds more than `range_bytes`.
MAX_RANGES = 256


def write_in_row_order(journals: list[Path], rows: int, columns: InputColumns,
                       files: OutputFiles, metadata: dict[str, Any], *,
                       range_bytes: int, scratch: Path) -> int:
    """Write one output row per input row, in row order, atomically: each file appears whole
    or not at all (the OpenAI file first: the Parquet file appearing marks the job done).
    Returns the rows written. A row journaled twice is written once (the first)."""
    total = sum(j.stat().st_size for j in journals)
    ranges = min(max(1, ceil_div(total, max(range_bytes, 1))), MAX_RANGES)
    step = ceil_div(rows, ranges) if rows else 1
    ranges = max(1, ceil_div(rows, step))  # no range past the last row
    schema = columns.schema()
    passthrough = [f for f in schema if f.name not in (ENDPOINT, INPUT_COUNT)
                   and f.name not in RESULT_SCHEMA.names]
    embeds = files.embeds
    several = INPUT_COUNT in schema.names
    results = output_result_schema(
        embeds, _embedding_dim(journals, columns, schema) if embeds else None, several)
    out_schema = pa.schema([*results, *passthrough]).with_metadata(
        {b"batchrun": json.dumps(metadata, sort_keys=True, default=str).encode()})
    with _AtomicOutput(files, out_schema) as out:
        for table in _row_ranges(journals, rows, step, scratch, ranges):
            start = int(table["row"][0].as_py()) if table.num_rows else 0
            extra = columns.rows_between(start, start + table.num_rows, schema)
            out.write(table, extra)
        return out.rows


def _embedding_dim(journals: list[Path], columns: InputColumns,
                   schema: pa.Schema) -> int | None:
    """The length of the first vector in the journals (every vector of a job has it; a line
    of several inputs has its vectors one after another)."""
    for batch in journal_batches(journals):
        vectors = batch.column(RESULT_SCHEMA.get_field_index("embedding"))
        if vectors.null_count == len(vectors):
            continue
        at = int(np.flatnonzero(vectors.is_valid().to_numpy(zero_copy_only=False))[0])
        count = None
        if INPUT_COUNT in schema.names:
            row = batch.column(0)[at].as_py()
            count = columns.rows_between(row, row + 1, schema)[INPUT_COUNT][0].as_py()
        return len(vectors[at]) // (count or 1)
    return None


def several_vectors(results: pa.Table, counts: pa.ChunkedArray | pa.Array,
                    dim: int | None) -> pa.Table:
    """An embedding job's results with the vectors of each line of several inputs (`counts`:
    INPUT_COUNT) moved from `embedding` (where they lie one after another) to `embeddings`,
    a list of vectors; a line of one input keeps its vector in `embedding`."""
    vectors = results["embedding"].combine_chunks()
    counts = pa.chunked_array([counts]).combine_chunks() if isinstance(counts, pa.Array) \
        else counts.combine_chunks()
    several = pc.and_(counts.is_valid(), vectors.is_valid())
    mask = np.asarray(several.to_numpy(zero_copy_only=False), dtype=bool)
    inner = pa.list_(pa.float32(), dim) if dim else pa.list_(pa.float32())
    if mask.any() and dim:
        per_row = np.where(mask, counts.fill_null(0).to_numpy(zero_copy_only=False), 0)
        flat = vectors.filter(several).flatten()
        embeddings = pa.ListArray.from_arrays(
            pa.array(np.concatenate(([0], np.cumsum(per_row))).astype(np.int32)),
            pa.FixedSizeListArray.from_arrays(flat, dim), mask=pa.array(~mask))
        vectors = pc.if_else(several, pa.scalar(None, vectors.type), vectors)
    else:
        embeddings = pa.nulls(results.num_rows, pa.list_(inner))
    table = results.set_column(results.schema.get_field_index("embedding"), "embedding",
                               vectors)
    return table.append_column("embeddings", embeddings)


def _row_ranges(journals: list[Path], rows: int, step: int, scratch: Path,
                ranges: int) -> Iterator[pa.Table]:
    """The results in row order, `step` rows at a time, each row once."""
    if ranges == 1:
        batches = list(journal_batches(journals))
        yield _in_row_order(batches, 0, rows)
        return
    scratch.mkdir(parents=True, exist_ok=True)
    paths = [scratch / f"bucket-{k:05d}.arrows" for k in range(ranges)]
    sinks = [pa.OSFile(str(p), "wb") for p in paths]
    writers = [pa.ipc.new_stream(s, RESULT_SCHEMA) for s in sinks]
    try:
        for batch in journal_batches(journals):
            bucket = batch.column(0).to_numpy() // step
            for k in np.unique(bucket):
                writers[int(k)].write_batch(batch.filter(pa.array(bucket == k)))
    finally:
        for w, s in zip(writers, sinks, strict=True):
            w.close()
            s.close()
    for k, path in enumerate(paths):
        yield _in_row_order(list(journal_batches([path])), k * step, min((k + 1) * step, rows))
        path.unlink()


def _in_row_order(batches: list[pa.RecordBatch], start: int, stop: int) -> pa.Table:
    """Rows [start, stop) from `batches`, sorted, the first of any repeated row kept; every
    row must be there."""
    table = pa.Table.from_batches(batches, schema=RESULT_SCHEMA) if batches else \
        RESULT_SCHEMA.empty_table()
    row = table["row"].to_numpy()
    _, first = np.unique(row, return_index=True)
    table = table.take(pa.array(first)).sort_by("row")
    if table.num_rows != stop - start:
        raise RuntimeError(f"internal: {table.num_rows} results for rows {start}-{stop - 1}")
    return table


class _AtomicOutput:
    """The Parquet file (and OpenAI file) written to temporary names, renamed at the end."""

    def __init__(self, files: OutputFiles, schema: pa.Schema) -> None:
        self.files, self.schema, self.rows = files, schema, 0
        files.parquet.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = temp_path(files.parquet)
        self.parquet = pq.ParquetWriter(self.tmp, schema, compression="zstd")
        self.openai_tmp: Path | None = None
        self.openai: TextIO | None = None
        if files.openai is not None:
            files.openai.parent.mkdir(parents=True, exist_ok=True)
            self.openai_tmp = temp_path(files.openai)
            self.openai = open(self.openai_tmp, "w")  # noqa: SIM115 (closed in __exit__)

    def write(self, results: pa.Table, columns: pa.Table) -> None:
        table = results
        if "embeddings" in self.schema.names:
            table = several_vectors(results, columns[INPUT_COUNT],
                                    self.schema.field("embedding").type.list_size)
        for f in self.schema:
            if f.name not in table.column_names:
                table = table.append_column(f, columns[f.name])
        self.parquet.write_table(table.select(self.schema.names).cast(self.schema),
                                 row_group_size=ROW_GROUP_SIZE)
        if self.openai is not None:
            for name in (ENDPOINT, ADAPTER, INPUT_COUNT):  # its kind, model, inputs
                if name in columns.column_names:
                    results = results.append_column(name, columns[name])
            write_openai_lines(self.openai, results, self.files.model, embeds=self.files.embeds)
        self.rows += results.num_rows

    def __enter__(self) -> _AtomicOutput:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        try:
            self.parquet.close()
            if self.openai is not None:
                self.openai.flush()
                os.fsync(self.openai.fileno())
                self.openai.close()
            if exc_type is None:
                if self.openai_tmp is not None and self.files.openai is not None:
                    os.replace(self.openai_tmp, self.files.openai)
                with open(self.tmp, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(self.tmp, self.files.parquet)
                fsync_dir(self.files.parquet.parent)
        finally:
            self.tmp.unlink(missing_ok=True)
            if self.openai_tmp is not None:
                self.openai_tmp.unlink(missing_ok=True)


def read_finished_rows(journals: list[Path],
                       count: Callable[[pa.Table], None]) -> np.ndarray:
    """The rows finished in earlier runs (sorted row numbers), read batch by batch; each
    row's result is passed to `count` once."""
    seen = np.zeros(0, dtype=bool)
    for batch in journal_batches(journals):
        row = batch.column(0).to_numpy()
        if len(row) and row.max() >= len(seen):
            grown = np.zeros(max(int(row.max()) + 1, 2 * len(seen)), dtype=bool)
            grown[:len(seen)] = seen
            seen = grown
        _, first = np.unique(row, return_index=True)
        new = np.zeros(len(row), dtype=bool)
        new[first] = ~seen[row[first]]
        seen[row] = True
        if new.any():
            count(pa.Table.from_batches([batch.filter(pa.array(new))]))
    return np.flatnonzero(seen)
