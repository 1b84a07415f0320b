"""Read a job's input file into the request table (batchrun.io.schema.REQUEST_SCHEMA).

Formats, told apart by content rather than by file name:
  * Parquet: the file starts with the magic bytes PAR1.
  * OpenAI Batch API JSONL: the first line holding a JSON object has `custom_id` and `body`.
  * JSONL: anything else.
In JSONL and Parquet a row has an optional id, exactly one of prompt (text), messages (a chat
list, or that list as JSON text) or prompt_token_ids, and optional max_tokens, temperature,
top_p, seed, stop (a string or a list of strings), completion_tokens (an integer >= 0: the
length the sim engine gives the row's completion), logprobs (a bool), top_logprobs (0-20) and
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
A stream raises InputError before its first batch wherever the problem shows without reading
rows (every file of a dataset is opened first: missing, empty, compressed, the wrong format,
Parquet that cannot be opened or has no prompt column); otherwise at the batch where it is
found (a JSON array: at its first line; a corrupt Parquet page: at its batch; a file in which
no line is a JSON object: once it was read to its end).

Passthrough columns are typed per batch (JSONL values as Arrow infers them for that batch);
unified_passthrough_schema gives the one type each column takes in the output: the type all
batches agree on, integers and floats as float64, and text (JSON text of non-text values)
where batches disagree otherwise.

Ids: a row's own id (an int is stored as text; `custom_id` in OpenAI files), or its row number
when it gives none. Ids must be unique: the first row with an id keeps it, a later row with the
same id becomes an error row. Rows whose id could not be read (bad JSON, a bad id, a repeated
id) get their row number as id, or `<row>~<k>` if another row already holds that.

The input is read as a stream of batches (BATCH_ROWS rows; a file of a dataset starts a new
one), each finished before the next is read, and uniqueness is checked against every id held
before (batchrun.io.input.ids). So "another row" in the last rule means a row before it or one in
its own batch: a row without a readable id may take an id that a row of a LATER batch claims
as its own. That later row is then the repeat, an error row like any other: ids stay unique
and no row is lost, and the file order decides, as it does for two rows with the same id.
"""


from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ...config import ColumnMap, InputFormat
from ...errors import InputError, show
from ..datasets import expand
from ..schema import REQUEST_SCHEMA
from ..storage import Location, reading_input
from .ids import HeldIds, IdHashes
from .jsonl import iter_jsonl
from .parquet import iter_parquet, open_parquet
from .rows import DraftBatch, json_text

__all__ = ["BATCH_ROWS", "FILENAME_COLUMN", "RequestBatch", "RequestSet",
           "RequestStream", "cast_passthrough", "open_request_stream", "read_request_set",
           "read_requests", "unified_passthrough_schema"]

# `--passthrough source_file`: the file each row came from (its path or URI). The name is
# reserved: it means this, whatever the input's own columns are. (Not pyarrow's `__filename`:
# a Parquet column of that name breaks pyarrow.parquet.read_table on the output.)
FILENAME_COLUMN = "source_file"

# Rows a batch holds. A batch's Python objects (JSONL) and its Arrow tables are what reading
# keeps in memory at a time; 64Ki rows of ~700-byte prompts is ~50 MB of Arrow.
BATCH_ROWS = 65_536

PARQUET_MAGIC = b"PAR1"
_DEFAULT_COLUMNS = ColumnMap()
_COMPRESSED = {b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd", b"PK\x03\x04": "zip"}


@dataclass(frozen=True)
class RequestSet:
    """What an input file holds.

    table: REQUEST_SCHEMA, one row per input row, in input order.
    passthrough: the columns named in ColumnMap.passthrough, one row per request, null where a
        row lacks one (no columns when none are named). From JSONL, nested values come as JSON
        text, and a column whose values do not share one type comes as text.
    input_format: what the file turned out to be: "jsonl", "openai" or "parquet".
    """

    table: pa.Table
    passthrough: pa.Table
    input_format: str


@dataclass(frozen=True)
class RequestBatch:
    """Consecutive rows of an input, finished: nothing later in the input changes them.

    requests: REQUEST_SCHEMA, ids checked against every row before; `row` numbers the rows of
        the whole input from 0 in input order, contiguous within the batch.
    passthrough: the ColumnMap.passthrough columns of the same rows, in the order named, typed
        for this batch alone (bring batches to one type with unified_passthrough_schema and
        cast_passthrough); no columns when none are named.
    input_format: what the batch's file is: "jsonl", "openai" or "parquet".
    """

    requests: pa.Table
    passthrough: pa.Table
    input_format: str | None = None


class RequestStream:
    """An input read batch by batch, in input order. Iterating it again reads it again.

    Memory does not grow with the input, except for the ids it holds (24 bytes an id, see
    batchrun.io.input.ids). Raises InputError as the module notes say; "holds no rows" at the end.
    """

    def __init__(self, path: Location, files: list[tuple[Location, str]], dataset: bool,
                 columns: ColumnMap, input_format: str, batch_rows: int) -> None:
        self.path = path
        self._files = files  # (file, "parquet" or "jsonl"), each checked already
        self._dataset = dataset
        self._columns = columns
        self._input_format = input_format
        self._batch_rows = batch_rows
        # What each file turned out to be; a JSONL file with format "auto" tells at its first
        # JSON object.
        self._formats = {i: "parquet" if kind == "parquet" else input_format
                         for i, (_, kind) in enumerate(files)
                         if kind == "parquet" or input_format != "auto"}

    @property
    def input_format(self) -> str:
        """"jsonl", "openai" or "parquet" ("+"-joined for a dataset of several). Known for a
        file from its first batch on, for Parquet and a given format before any."""
        return "+".join(sorted(set(self._formats.values())))

    def __iter__(self) -> Iterator[RequestBatch]:
        names = tuple(dict.fromkeys(self._columns.passthrough))
        inner = replace(self._columns, passthrough=tuple(n for n in names if n != FILENAME_COLUMN))
        held = HeldIds()
        first_row = 0
        for i, (file, kind) in enumerate(self._files):
            try:
                for part in self._read(file, kind, inner, first_row):
                    if part.input_format:
                        self._formats[i] = part.input_format
                    requests = _finish(part.draft, held)
                    passthrough = _with_file_name(part.passthrough, requests.num_rows, file,
                                                  names)
                    first_row += requests.num_rows
                    yield RequestBatch(requests, passthrough, self._formats.get(i))
            except InputError as e:
                if not self._dataset:
                    raise
                raise _in_dataset(self.path, e) from None
        if not first_row:
            raise InputError(f"{self.path}: holds no rows; write at least one request")

    def _read(self, file: Location, kind: str, columns: ColumnMap,
              first_row: int) -> Iterator[DraftBatch]:
        if kind == "parquet":
            return iter_parquet(file, columns, first_row, self._batch_rows)
        return iter_jsonl(file, columns, self._input_format, first_row, self._batch_rows)


def open_request_stream(path: Location | str | os.PathLike[str],
                        columns: ColumnMap = _DEFAULT_COLUMNS,
                        input_format: str = "auto", *,
                        batch_rows: int = BATCH_ROWS) -> RequestStream:
    """The rows of `path` as a stream of batches: a file, a folder of data files or a glob (a
    dataset: its files in sorted path order, rows numbered across them), local or a URI.
    input_format: "auto", "jsonl", "openai" or "parquet" (with "auto", each file of a dataset
    is detected on its own). Every file is checked here, before any row is read: InputError
    for one that cannot be used at all. Bad rows become error rows."""
    path = Location.coerce(path)
    if input_format not in InputFormat.values():
        raise InputError(f"{path}: unknown input format {input_format!r}; "
                         f"use one of {', '.join(InputFormat.values())}")
    files = expand(path)
    dataset = files != [path]
    checked = []
    for file in files:
        try:
            if dataset and file.size() == 0:
                continue  # an empty part file holds no rows
            checked.append((file, _file_kind(file, columns, input_format)))
        except InputError as e:
            if not dataset:
                raise
            raise _in_dataset(path, e) from None
    return RequestStream(path, checked, dataset, columns, input_format, batch_rows)


def read_requests(path: Location | str | os.PathLike[str], columns: ColumnMap = _DEFAULT_COLUMNS,
                  input_format: str = "auto") -> pa.Table:
    """The request table of `path` (see read_request_set)."""
    return read_request_set(path, columns, input_format).table


def read_request_set(path: Location | str | os.PathLike[str],
                     columns: ColumnMap = _DEFAULT_COLUMNS,
                     input_format: str = "auto", *,
                     batch_rows: int = BATCH_ROWS) -> RequestSet:
    """Every row of `path` at once: the batches of open_request_stream, concatenated."""
    stream = open_request_stream(path, columns, input_format, batch_rows=batch_rows)
    batches = list(stream)
    requests = pa.concat_tables([b.requests for b in batches])
    names = tuple(dict.fromkeys(columns.passthrough))
    passthrough = pa.table({})
    if names:
        schema = unified_passthrough_schema([b.passthrough.schema for b in batches], names)
        passthrough = pa.concat_tables([cast_passthrough(b.passthrough, schema)
                                        for b in batches])
    return RequestSet(requests, passthrough, stream.input_format)


def _in_dataset(path: Location, error: InputError) -> InputError:
    what = "is a directory, read as a dataset" if path.is_dir() else "is a dataset"
    return InputError(f"{path}: {what}; {error}")


def _file_kind(path: Location, columns: ColumnMap, input_format: str) -> str:
    """"parquet" or "jsonl": how to read `path`. Raises InputError for a file that cannot be
    read as input_format asks, or at all."""
    head = _head(path)
    if input_format == "parquet" and head != PARQUET_MAGIC:
        raise InputError(f'{path}: is not a Parquet file (it does not start with "PAR1"); '
                         'set input_format to "auto" or write the file as Parquet')
    if head == PARQUET_MAGIC and input_format in ("auto", "parquet"):
        open_parquet(path, columns).close()
        return "parquet"
    if head == PARQUET_MAGIC:
        raise InputError(f'{path}: is a Parquet file, but input_format is "{input_format}"; '
                         'set input_format to "parquet" or "auto"')
    for magic, kind in _COMPRESSED.items():
        if head.startswith(magic):
            raise InputError(f"{path}: is {kind}-compressed; decompress it first")
    return "jsonl"


def _head(path: Location) -> bytes:
    with reading_input(path), path.open_binary() as f:
        head = f.read(len(PARQUET_MAGIC))
    if not head:
        raise InputError(f"{path}: is empty; write at least one request")
    return head


# --- Passthrough columns: typed per batch, one type per column in the output ----------------

def _with_file_name(passthrough: pa.Table, rows: int, file: Location,
                    names: tuple[str, ...]) -> pa.Table:
    """A batch's passthrough columns in the order named, with FILENAME_COLUMN if named."""
    if not names:
        return pa.table({})
    if FILENAME_COLUMN in names:
        column = pa.repeat(pa.scalar(str(file), pa.string()), rows)
        passthrough = (passthrough.append_column(FILENAME_COLUMN, column)
                       if passthrough.num_columns else pa.table({FILENAME_COLUMN: column}))
    return passthrough.select(list(names))


def unified_passthrough_schema(schemas: list[pa.Schema], names: Iterable[str]) -> pa.Schema:
    """The one type each passthrough column takes across batches with these schemas: the type
    every batch that has values agrees on; int64 or float64 for integers and floats together
    (as JSON numbers are); else text. A column no batch has values in is text."""
    fields = []
    for name in dict.fromkeys(names):
        types = {s.field(name).type for s in schemas if name in s.names} - {pa.null()}
        fields.append(pa.field(name, _common_type(types)))
    return pa.schema(fields)


def _common_type(types: set[pa.DataType]) -> pa.DataType:
    if len(types) == 1:
        return next(iter(types))
    numbers = all(pa.types.is_floating(t) or pa.types.is_signed_integer(t)
                  or pa.types.is_unsigned_integer(t) and t != pa.uint64() for t in types)
    if types and numbers:
        return pa.float64() if any(pa.types.is_floating(t) for t in types) else pa.int64()
    return pa.string()


def cast_passthrough(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """A batch's passthrough columns in the types of `schema` (unified_passthrough_schema's):
    values of another type in a text column become their JSON text."""
    columns = []
    for f in schema:
        column = table.column(f.name)
        if pa.types.is_null(column.type):
            column = pa.nulls(len(column), f.type)
        elif column.type != f.type:
            if pa.types.is_string(f.type):
                column = json_text(column.to_pylist())
            else:  # integers to float64, as JSON numbers read: may round beyond 2**53
                column = column.cast(f.type, safe=False)
        columns.append(column)
    return pa.table(columns, schema=schema)


# --- Finishing a batch: unique ids, request fields null on error rows ------------------------

def _finish(draft: pa.RecordBatch, held: HeldIds) -> pa.Table:
    """Draft rows -> REQUEST_SCHEMA: unique ids for all (against `held` too, which then holds
    this batch's ids), request fields null on error rows."""
    rows = draft.column("row")
    ids, errors = _drop_repeated_ids(rows, draft.column("id"), draft.column("error"), held)
    ids = _give_free_ids(rows, ids, held)
    held.add(IdHashes.of(ids), rows.to_numpy())
    values = [draft.column(name) for name in REQUEST_SCHEMA.names[2:-1]]
    if errors.null_count < len(errors):
        ok = errors.is_null()
        values = [pc.if_else(ok, column, pa.scalar(None, column.type)) for column in values]
    return pa.Table.from_arrays([rows, ids, *values, errors], schema=REQUEST_SCHEMA)


def _drop_repeated_ids(rows: pa.Array, ids: pa.Array, errors: pa.Array,
                       held: HeldIds) -> tuple[pa.Array, pa.Array]:
    """The first row with an id keeps it, whether in an earlier batch (`held`) or in this
    one; later rows with it lose it and become error rows."""
    # dictionary_encode numbers the distinct ids in order of first appearance (cheaper than a
    # group_by), so a row repeats an id within the batch exactly when its code is no higher
    # than one before it.
    encoded = pc.dictionary_encode(ids)
    distinct = encoded.dictionary
    earlier = (held.holders(IdHashes.of(distinct)) if len(held) and len(distinct)
               else np.full(len(distinct), -1, dtype=np.int64))
    if len(distinct) == len(ids) - ids.null_count and not (earlier >= 0).any():
        return ids, errors
    codes = encoded.indices.fill_null(-1).to_numpy()
    highest_before = np.maximum.accumulate(np.concatenate([[-1], codes[:-1]]))
    row_numbers = rows.to_numpy()
    first_in_batch = row_numbers[(codes >= 0) & (codes > highest_before)]  # by code
    holder = np.where(earlier >= 0, earlier, first_in_batch)  # by code
    has_id = codes >= 0
    later = has_id & (holder[np.where(has_id, codes, 0)] != row_numbers)
    where = np.flatnonzero(later)
    messages = [
        f"row {row}: duplicate id {show(id_)} (first at row {first}); ids must be unique "
        "— fix the input or drop the id column to use row numbers"
        for row, id_, first in zip(row_numbers[where].tolist(), ids.take(where).to_pylist(),
                                   holder[codes[where]].tolist(), strict=True)]
    mask = pa.array(later)
    repeat_errors = pc.replace_with_mask(pa.nulls(len(rows), pa.string()), mask,
                                         pa.array(messages, pa.string()))
    ids = pc.replace_with_mask(ids, mask, pa.nulls(len(where), pa.string()))
    return ids, pc.coalesce(errors, repeat_errors)


def _give_free_ids(rows: pa.Array, ids: pa.Array, held: HeldIds) -> pa.Array:
    """Fill null ids with the row number, or `<row>~<k>` where a row of this batch or an
    earlier one holds that id."""
    missing = ids.is_null()
    if not ids.null_count:
        return ids
    base = rows.filter(missing).cast(pa.string())
    taken = ids.drop_null()
    candidates = base
    for k in itertools.count(1):
        clash = pc.is_in(candidates, value_set=taken)
        if len(held):
            clash = pc.or_(clash, pa.array(held.holders(IdHashes.of(candidates)) >= 0))
        if not pc.any(clash).as_py():
            break
        candidates = pc.if_else(clash, pc.binary_join_element_wise(base, f"~{k}", ""),
                                candidates)
    return pc.replace_with_mask(ids, missing, candidates)
