"""Read a job's input file into the request table (batchrun.io.schema.REQUEST_SCHEMA).

Formats, told apart by content rather than by file name:
  * Parquet: the file starts with the magic bytes PAR1.
  * OpenAI Batch API JSONL: the first line holding a JSON object has `custom_id` and `body`.
  * JSONL: anything else.
In JSONL and Parquet a row has an optional id, exactly one of prompt (text), messages (a chat
list, or that list as JSON text) or prompt_token_ids, and optional max_tokens, temperature,
top_p, seed, stop (a string or a list of strings), logprobs (a bool), top_logprobs (0-20) and
at most one output constraint: response_format (OpenAI's shape), choices (a list of strings),
regex, or json_schema (an object or its JSON text); ColumnMap names the columns. In OpenAI
files the body's response_format, logprobs and top_logprobs are read (/v1/completions takes
logprobs as a count). A null value is the same as a missing one. A bad schema or regex is the
row's error (batchrun.structured checks each distinct one once).

Rows are numbered from 0 in input order. Blank (whitespace-only) JSONL lines are not rows;
every other line is exactly one row, whatever it holds.

Two kinds of problem:
  * The file as a whole is unusable (missing, a directory, empty, a JSON array instead of JSONL,
    no line is a JSON object, Parquet that cannot be opened or read or has no prompt column):
    InputError, whose one-line message names the file and the fix.
  * One row is bad (bad JSON, invalid UTF-8, over 8 MiB, no prompt, a wrong type or value):
    the row is kept with `error` set and every request field null. The job goes on.

Ids: a row's own id (an int is stored as text; `custom_id` in OpenAI files), or its row number
when it gives none. Ids must be unique: the first row with an id keeps it, a later row with the
same id becomes an error row. Rows whose id could not be read (bad JSON, a bad id, a repeated
id) get their row number as id, or `<row>~<k>` if another row already holds that.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batchrun.config import INPUT_FORMATS, ColumnMap
from batchrun.io.jsonl_reader import read_jsonl
from batchrun.io.parquet_reader import read_parquet
from batchrun.io.rows import DRAFT_SCHEMA, InputError, show
from batchrun.io.schema import REQUEST_SCHEMA
from batchrun.io.storage import Location, expand, is_dir, is_uri, open_binary, size

__all__ = ["FILENAME_COLUMN", "InputError", "RequestSet", "read_request_set", "read_requests",
           "validate_summary"]

# `--passthrough source_file`: the file each row came from (its path or URI). The name is
# reserved: it means this, whatever the input's own columns are. (Not pyarrow's `__filename`:
# a Parquet column of that name breaks pyarrow.parquet.read_table on the output.)
FILENAME_COLUMN = "source_file"

PARQUET_MAGIC = b"PAR1"
_DEFAULT_COLUMNS = ColumnMap()
_COMPRESSED = {b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd", b"PK\x03\x04": "zip"}


@dataclass(frozen=True)
class RequestSet:
    """What an input file holds.

    requests: REQUEST_SCHEMA, one row per input row, in input order.
    passthrough: the columns named in ColumnMap.passthrough, one row per request, null where a
        row lacks one (no columns when none are named). From JSONL, nested values come as JSON
        text, and a column whose values do not share one type comes as text.
    input_format: what the file turned out to be: "jsonl", "openai" or "parquet".
    """

    requests: pa.Table
    passthrough: pa.Table
    input_format: str


def read_requests(path: Location, columns: ColumnMap = _DEFAULT_COLUMNS,
                  input_format: str = "auto") -> pa.Table:
    """The request table of `path` (see read_request_set)."""
    return read_request_set(path, columns, input_format).requests


def read_request_set(path: Location, columns: ColumnMap = _DEFAULT_COLUMNS,
                     input_format: str = "auto") -> RequestSet:
    """Read and check every row of `path`: a file, a folder of data files or a glob (a
    dataset: its files in sorted path order, rows numbered across them), local or a URI.
    input_format: "auto", "jsonl", "openai" or "parquet" (with "auto", each file of a dataset
    is detected on its own). Raises InputError for an input that cannot be used at all; bad
    rows become error rows."""
    if isinstance(path, str) and not is_uri(path):
        path = Path(path)
    if input_format not in INPUT_FORMATS:
        raise InputError(f"{path}: unknown input format {input_format!r}; "
                         f"use one of {', '.join(INPUT_FORMATS)}")
    files = expand(path)
    dataset = files != [path]
    inner = replace(columns, passthrough=tuple(c for c in columns.passthrough
                                               if c != FILENAME_COLUMN))
    batches: list[pa.RecordBatch] = []
    passthroughs: list[pa.Table] = []
    formats: list[str] = []
    first_row = 0
    for file in files:
        try:
            if dataset and size(file) == 0:
                continue  # an empty part file holds no rows
            one_batches, passthrough, found = _read_file(file, inner, input_format, first_row)
        except InputError as e:
            if not dataset:
                raise
            what = "is a directory, read as a dataset" if is_dir(path) else "is a dataset"
            raise InputError(f"{path}: {what}; {e}") from None
        rows = sum(b.num_rows for b in one_batches)
        if FILENAME_COLUMN in columns.passthrough:
            names = pa.array([str(file)] * rows, pa.string())
            passthrough = (passthrough.append_column(FILENAME_COLUMN, names)
                           if passthrough.num_columns else pa.table({FILENAME_COLUMN: names}))
        batches.extend(one_batches)
        passthroughs.append(passthrough)
        formats.append(found)
        first_row += rows
    draft = pa.Table.from_batches(batches, schema=DRAFT_SCHEMA)
    if not draft.num_rows:
        raise InputError(f"{path}: holds no rows; write at least one request")
    passthrough = _concat_passthrough(passthroughs, columns.passthrough)
    return RequestSet(_finish(draft), passthrough, "+".join(sorted(set(formats))))


def _read_file(path: Location, columns: ColumnMap, input_format: str,
               first_row: int) -> tuple[list[pa.RecordBatch], pa.Table, str]:
    """One file's draft batches (rows numbered from first_row), passthrough, format."""
    head = _head(path)
    if input_format == "parquet" and head != PARQUET_MAGIC:
        raise InputError(f'{path}: is not a Parquet file (it does not start with "PAR1"); '
                         'set input_format to "auto" or write the file as Parquet')
    if head == PARQUET_MAGIC and input_format in ("auto", "parquet"):
        parquet = read_parquet(path, columns, first_row)
        rows = sum(b.num_rows for b in parquet.batches)
        if parquet.passthrough:
            passthrough = pa.Table.from_batches(parquet.passthrough)
        else:
            passthrough = pa.table({name: pa.nulls(rows, pa.string())
                                    for name in columns.passthrough})
        return parquet.batches, passthrough, "parquet"
    if head == PARQUET_MAGIC:
        raise InputError(f'{path}: is a Parquet file, but input_format is "{input_format}"; '
                         'set input_format to "parquet" or "auto"')
    for magic, kind in _COMPRESSED.items():
        if head.startswith(magic):
            raise InputError(f"{path}: is {kind}-compressed; decompress it first")
    jsonl = read_jsonl(path, columns, input_format, first_row)
    passthrough = pa.table({name: _passthrough_column(values)
                            for name, values in jsonl.passthrough.items()})
    return jsonl.batches, passthrough, jsonl.input_format


def _concat_passthrough(tables: list[pa.Table], names: tuple[str, ...]) -> pa.Table:
    """The files' passthrough columns as one table, columns in the order the user named them.
    Where files disagree on a column's type, the column becomes text (as in JSONL)."""
    if not names:
        return pa.table({})
    names = tuple(dict.fromkeys(names))
    if len(tables) == 1:
        return tables[0].select(list(names))
    columns = {}
    for name_ in names:
        parts = [t[name_] for t in tables]
        types = {p.type for p in parts if not pa.types.is_null(p.type) and p.null_count < len(p)}
        if len(types) <= 1:
            target = next(iter(types), pa.string())
            try:
                columns[name_] = pa.chunked_array([p.cast(target) for p in parts], target)
                continue
            except (pa.ArrowException, ValueError):
                pass
        values = [v for p in parts for v in p.to_pylist()]
        columns[name_] = _passthrough_column(
            [v if v is None or type(v) is str else json.dumps(v, default=str) for v in values])
    return pa.table(columns)


def validate_summary(requests: pa.Table, max_errors: int = 10) -> dict[str, Any]:
    """Counts of a request table, and the first `max_errors` row errors, for `validate`."""
    errors = requests["error"].drop_null()
    return {
        "rows": requests.num_rows,
        "ok": requests.num_rows - len(errors),
        "errors": len(errors),
        "first_errors": errors[:max_errors].to_pylist(),
    }


def _head(path: Location) -> bytes:
    try:
        with open_binary(path) as f:
            head = f.read(len(PARQUET_MAGIC))
    except FileNotFoundError:
        raise InputError(f"{path}: no such file; check the input path") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory; point the input at one file") from None
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e.strerror or e}); check its permissions") \
            from None
    if not head:
        raise InputError(f"{path}: is empty; write at least one request")
    return head


def _passthrough_column(values: list[Any]) -> pa.Array:
    """JSON scalars as Arrow infers them; text for a column whose values share no type."""
    try:
        column = pa.array(values)
    except (pa.ArrowException, OverflowError):
        return pa.array([v if v is None or type(v) is str else json.dumps(v) for v in values],
                        pa.string())
    return column.cast(pa.string()) if pa.types.is_null(column.type) else column


def _finish(draft: pa.Table) -> pa.Table:
    """Draft rows -> REQUEST_SCHEMA: unique ids for all, request fields null on error rows."""
    rows = draft["row"].combine_chunks()
    ids, errors = _drop_repeated_ids(rows, draft["id"].combine_chunks(),
                                     draft["error"].combine_chunks())
    ids = _give_free_ids(rows, ids)
    fields = REQUEST_SCHEMA.names[2:-1]
    values = [draft[name] for name in fields]
    if errors.null_count < len(errors):
        ok = errors.is_null()
        values = [pc.if_else(ok, column, pa.scalar(None, column.type)) for column in values]
    return pa.Table.from_arrays([rows, ids, *values, errors], schema=REQUEST_SCHEMA)


def _drop_repeated_ids(rows: pa.Array, ids: pa.Array,
                       errors: pa.Array) -> tuple[pa.Array, pa.Array]:
    """The first row with an id keeps it; later rows with it lose it and become error rows."""
    # dictionary_encode numbers the distinct ids in order of first appearance (cheaper than a
    # group_by), so a row repeats an id exactly when its code is no higher than one before it.
    encoded = pc.dictionary_encode(ids)
    if len(encoded.dictionary) == len(ids) - ids.null_count:
        return ids, errors
    codes = encoded.indices.fill_null(-1).to_numpy()
    highest_before = np.maximum.accumulate(np.concatenate([[-1], codes[:-1]]))
    later = (codes >= 0) & (codes <= highest_before)
    first_rows = np.flatnonzero((codes >= 0) & ~later)  # by code; positions are row numbers
    where = np.flatnonzero(later)
    messages = [
        f"row {row}: duplicate id {show(id_)} (first at row {first}); ids must be unique "
        "— fix the input or drop the id column to use row numbers"
        for row, id_, first in zip(rows.take(where).to_pylist(), ids.take(where).to_pylist(),
                                   first_rows[codes[where]].tolist(), strict=True)]
    mask = pa.array(later)
    repeat_errors = pc.replace_with_mask(pa.nulls(len(rows), pa.string()), mask,
                                         pa.array(messages, pa.string()))
    ids = pc.replace_with_mask(ids, mask, pa.nulls(len(where), pa.string()))
    return ids, pc.coalesce(errors, repeat_errors)


def _give_free_ids(rows: pa.Array, ids: pa.Array) -> pa.Array:
    """Fill null ids with the row number, or `<row>~<k>` where another row holds that id."""
    missing = ids.is_null()
    if not ids.null_count:
        return ids
    base = rows.filter(missing).cast(pa.string())
    taken = ids.drop_null()
    candidates = base
    for k in itertools.count(1):
        clash = pc.is_in(candidates, value_set=taken)
        if not pc.any(clash).as_py():
            break
        candidates = pc.if_else(clash, pc.binary_join_element_wise(base, f"~{k}", ""),
                                candidates)
    return pc.replace_with_mask(ids, missing, candidates)


@dataclass(frozen=True)
class RequestBatch:
    """Consecutive rows of the input: requests (REQUEST_SCHEMA) and pass-through columns."""

    requests: pa.Table
    passthrough: pa.Table


class RequestStream:
    """The input's rows batch by batch, in input order. (Stand-in: reads the whole input,
    then hands it out in batches.)"""

    def __init__(self, path: Location, columns: ColumnMap, input_format: str,
                 batch_rows: int) -> None:
        self._read = read_request_set(path, columns, input_format)
        self.input_format = self._read.input_format
        self.batch_rows = batch_rows

    def __iter__(self) -> Iterator[RequestBatch]:
        table, passthrough = self._read.requests, self._read.passthrough
        for start in range(0, table.num_rows, self.batch_rows):
            n = min(self.batch_rows, table.num_rows - start)
            extra = (passthrough.slice(start, n) if passthrough.num_columns
                     else pa.table({"_": pa.nulls(n)}).drop(["_"]))
            yield RequestBatch(table.slice(start, self.batch_rows), extra)


def open_request_stream(path: Location, columns: ColumnMap = _DEFAULT_COLUMNS,
                        input_format: str = "auto", *,
                        batch_rows: int = 65_536) -> RequestStream:
    return RequestStream(path, columns, input_format, batch_rows)
