"""Parquet input, read in record batches of only the columns batchrun needs.

Each input column chunk first gets a vectorized check: if its Arrow type is the natural one for
the field and every value in the chunk is valid, it is cast and used as is. Otherwise the chunk
goes value by value through the shared checks in batchrun.io.input.rows, which decide what is valid
and word the errors. So clean files never touch Python per row, and a bad value reads the same
as it would in JSONL. (Chat messages always take the per-value path: they become JSON text.)
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ... import structured
from ...config import ColumnMap
from ...errors import InputError, one_line
from ..schema import DICTIONARY_STRING, ENDPOINT_CHAT, ENDPOINT_COMPLETION
from ..storage import Location
from .rows import (
    ADAPTER_FIELDS,
    CONSTRAINT_FIELDS,
    DRAFT_SCHEMA,
    FIELDS,
    INT32_MAX,
    INT64_MAX,
    INT64_MIN,
    PROMPT_SOURCES,
    DraftBatch,
    RowError,
    logprobs_problem,
    parse_adapter,
    parse_constraint,
    parse_field,
    sources_problem,
)

# --- Vectorized checks: the cast column if its type fits and all its values pass, else None ---

def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t)


def _within(arr: pa.Array, low: int, high: int) -> bool:
    """Whether every non-null value is in [low, high] (true when there is none)."""
    bounds = pc.min_max(arr)
    least, most = bounds["min"].as_py(), bounds["max"].as_py()
    return least is None or (low <= least and most <= high)


def _at_least(arr: pa.Array, low: int) -> bool:
    least = pc.min(arr).as_py()
    return least is None or least >= low


def _fast_id(arr: pa.Array) -> pa.Array | None:
    if _is_text(arr.type) or pa.types.is_integer(arr.type):
        return arr.cast(pa.string())
    return None


def _fast_prompt(arr: pa.Array) -> pa.Array | None:
    if _is_text(arr.type) and _at_least(pc.binary_length(arr), 1):
        return arr.cast(pa.string())
    return None


def _fast_token_ids(arr: pa.Array) -> pa.Array | None:
    if not (_is_list(arr.type) and pa.types.is_integer(arr.type.value_type)):
        return None
    tokens = pc.list_flatten(arr)
    if (tokens.null_count or not _at_least(pc.list_value_length(arr), 1)
            or not _within(tokens, 0, INT32_MAX)):
        return None
    return arr.cast(pa.list_(pa.int32()))


def _fast_integer(low: int, high: int) -> Callable[[pa.Array], pa.Array | None]:
    def check(arr: pa.Array) -> pa.Array | None:
        if pa.types.is_integer(arr.type) and _within(arr, low, high):
            return arr.cast(pa.int64())
        return None

    return check


def _fast_number(valid: Callable[[pa.Array], pa.Array]) -> Callable[[pa.Array], pa.Array | None]:
    def check(arr: pa.Array) -> pa.Array | None:
        if not (pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type)):
            return None
        numbers = arr.cast(pa.float64(), safe=False)  # rounds huge ints, as float() does
        if not pc.all(pc.and_(pc.is_finite(numbers), valid(numbers))).as_py():
            return None
        return numbers

    return check


def _fast_stop(arr: pa.Array) -> pa.Array | None:
    if _is_text(arr.type):  # one stop string per row: wrap each in a list of one
        strings = arr.cast(pa.string())
        offsets = pa.array(np.arange(len(arr) + 1, dtype=np.int32))
        return pa.ListArray.from_arrays(offsets, strings, mask=strings.is_null())
    if _is_list(arr.type) and _is_text(arr.type.value_type) \
            and not pc.list_flatten(arr).null_count:
        return arr.cast(pa.list_(pa.string()))
    return None


def _fast_bool(arr: pa.Array) -> pa.Array | None:
    return arr if pa.types.is_boolean(arr.type) else None


_FAST: dict[str, Callable[[pa.Array], pa.Array | None]] = {
    "id": _fast_id,
    "prompt": _fast_prompt,
    "prompt_token_ids": _fast_token_ids,
    "max_tokens": _fast_integer(1, INT64_MAX),
    "temperature": _fast_number(lambda x: pc.greater_equal(x, 0)),
    "top_p": _fast_number(lambda x: pc.and_(pc.greater(x, 0), pc.less_equal(x, 1))),
    "seed": _fast_integer(INT64_MIN, INT64_MAX),
    "stop": _fast_stop,
    "completion_tokens": _fast_integer(0, INT64_MAX),
    "logprobs": _fast_bool,
    "top_logprobs": _fast_integer(0, structured.MAX_TOP_LOGPROBS),
}
_TYPES = {name: DRAFT_SCHEMA.field(name).type for name in ("id", *FIELDS)}


def column_values(name: str, arr: pa.Array, label: str) -> tuple[pa.Array, dict[int, str]]:
    """One input column chunk as the request table stores field `name`, with an error message
    (without the row prefix) per index whose value fails. Null in, null out."""
    if arr.null_count == len(arr):  # e.g. a column the file does not have
        return pa.nulls(len(arr), _TYPES[name]), {}
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    fast = _FAST[name](arr) if name in _FAST else None
    if fast is not None:
        return fast, {}
    values, errors = [], {}
    for i, value in enumerate(arr.to_pylist()):
        try:
            values.append(None if value is None else parse_field(name, value, label))
        except RowError as e:
            values.append(None)
            errors[i] = str(e)
    return pa.array(values, type=_TYPES[name]), errors


def _draft_batch(batch: pa.RecordBatch, start: int, labels: dict[str, str]) -> pa.RecordBatch:
    n = batch.num_rows
    rows = pa.array(np.arange(start, start + n, dtype=np.int64))
    raw = {name: batch.column(label) if label in batch.schema.names else pa.nulls(n)
           for name, label in labels.items()}
    # `errors` keeps the first problem of each row, in the order the JSONL reader finds them.
    ids, errors = column_values("id", raw["id"], labels["id"])
    ids = pc.if_else(raw["id"].is_null(), rows.cast(pa.string()), ids)  # no id: the row number

    given = np.column_stack([np.asarray(raw[f].is_valid()) for f in FIELDS[:PROMPT_SOURCES]])
    source_labels = [labels[f] for f in FIELDS]
    for i in np.flatnonzero(given.sum(axis=1) != 1):
        errors.setdefault(int(i), sources_problem(np.flatnonzero(given[i]).tolist(), source_labels))

    values = []
    for name in FIELDS:
        column, column_errors = column_values(name, raw[name], labels[name])
        values.append(column)
        for i, message in column_errors.items():
            errors.setdefault(i, message)

    logprobs, top_logprobs = values[FIELDS.index("logprobs")], values[FIELDS.index("top_logprobs")]
    if top_logprobs.null_count < n and pc.any(pc.equal(logprobs, False)).as_py():
        pair = (labels["logprobs"], labels["top_logprobs"])
        for i, (lp, top) in enumerate(zip(logprobs.to_pylist(), top_logprobs.to_pylist(),
                                          strict=True)):
            if (problem := logprobs_problem(lp, top, pair)) is not None:
                errors.setdefault(i, problem)
    constraint, spec = _constraints(raw, labels, errors)
    adapter = _adapters(raw, labels, errors)

    endpoint = pc.if_else(raw["messages"].is_valid(), ENDPOINT_CHAT, ENDPOINT_COMPLETION)
    error = [None] * n
    for i, message in errors.items():
        error[i] = f"row {start + i}: {message}"
    return pa.RecordBatch.from_arrays(
        [rows, ids, endpoint, *values, constraint, spec, adapter,
         *(pa.nulls(n, DRAFT_SCHEMA.field(name).type) for name in ("inputs", "input_lengths")),
         pa.array(error, pa.string())],
        schema=DRAFT_SCHEMA)


def _without_nulls(value: Any) -> Any:
    """A Parquet struct as JSON: a struct column holds every key of every row, null where a
    row lacks it, and a schema must not gain keys it never had."""
    if type(value) is dict:
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if type(value) is list:
        return [_without_nulls(v) for v in value]
    return value


def _constraints(raw: dict[str, pa.Array], labels: dict[str, str],
                 errors: dict[int, str]) -> tuple[pa.Array, pa.Array]:
    """The constraint and spec columns of a batch; a bad value's message goes to `errors`."""
    columns = [raw[name] for name in CONSTRAINT_FIELDS]
    n = len(columns[0])
    if all(c.null_count == n for c in columns):
        return pa.nulls(n, DICTIONARY_STRING), pa.nulls(n, DICTIONARY_STRING)
    values = []
    for c in columns:
        if pa.types.is_dictionary(c.type):
            c = c.dictionary_decode()
        nested = pa.types.is_nested(c.type) and not pa.types.is_list(c.type)
        values.append([_without_nulls(v) for v in c.to_pylist()] if nested else c.to_pylist())
    names = [labels[name] for name in CONSTRAINT_FIELDS]
    kinds, specs = [None] * n, [None] * n
    for i, row in enumerate(zip(*values, strict=True)):
        if row.count(None) == len(row):
            continue
        try:
            kinds[i], specs[i] = parse_constraint(row, names)
        except RowError as e:
            errors.setdefault(i, str(e))
    return pa.array(kinds, DICTIONARY_STRING), pa.array(specs, DICTIONARY_STRING)


def text_columns(columns: ColumnMap, names: list[str]) -> ColumnMap:
    """The columns to read: the `input` column (ColumnMap.input) as the prompt in a file
    with no prompt, messages or token-ids column."""
    sources = [getattr(columns, f) for f in FIELDS[:PROMPT_SOURCES]]
    if columns.input in names and not set(sources) & set(names):
        return replace(columns, prompt=columns.input)
    return columns


def _adapters(raw: dict[str, pa.Array], labels: dict[str, str],
              errors: dict[int, str]) -> pa.Array:
    """The adapter column of a batch; a bad value's message goes to `errors`."""
    columns = [raw[name] for name in ADAPTER_FIELDS]
    n = len(columns[0])
    if all(c.null_count == n for c in columns):
        return pa.nulls(n, DICTIONARY_STRING)
    names = [labels[name] for name in ADAPTER_FIELDS]
    values = [c.dictionary_decode() if pa.types.is_dictionary(c.type) else c for c in columns]
    out: list[str | None] = [None] * n
    for i, row in enumerate(zip(*(v.to_pylist() for v in values), strict=True)):
        try:
            out[i] = parse_adapter(row, names)
        except RowError as e:
            errors.setdefault(i, str(e))
    return pa.array(out, pa.string()).dictionary_encode().cast(DICTIONARY_STRING)


def open_parquet(path: Location, columns: ColumnMap) -> pq.ParquetFile:
    """`path` opened as Parquet, its footer read. Raises InputError when it cannot be opened or
    holds no prompt column."""
    try:
        parquet = pq.ParquetFile(path.open_random())
        names = parquet.schema_arrow.names
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{path}: cannot be opened as Parquet ({one_line(e)}); "
                         "the file is cut short or corrupt: write it again") from None
    sources = [getattr(text_columns(columns, names), f) for f in FIELDS[:PROMPT_SOURCES]]
    if not set(sources) & set(names):
        wanted = ", ".join(f'"{s}"' for s in sources)
        raise InputError(f"{path}: has none of the columns {wanted} (it has {_short(names)}); "
                         "rename the prompt column or set `prompt = \"...\"` under [columns] "
                         "in the job file")
    return parquet


DECODE_ROWS = 8192


def iter_parquet(path: Location, columns: ColumnMap, first_row: int,
                 batch_rows: int) -> Iterator[DraftBatch]:
    """Read `path` as Parquet, row group by row group, at most `batch_rows` rows at a time,
    rows numbered from `first_row`. Raises InputError as open_parquet does, and when a batch
    cannot be read (found at that batch)."""
    parquet = open_parquet(path, columns)
    names = parquet.schema_arrow.names
    columns = text_columns(columns, names)
    labels = {name: getattr(columns, name)
              for name in ("id", *FIELDS, *CONSTRAINT_FIELDS, *ADAPTER_FIELDS)}
    read = [c for c in dict.fromkeys([*labels.values(), *columns.passthrough]) if c in names]
    # A reader per row group: one reader over the whole file keeps the raw bytes of every row
    # group it has read (pyarrow's pre-buffering) until it ends, so its memory grows with the
    # file. Decoded in small batches: a list<int32> token column decodes about twice as fast
    # 8,192 rows at a time as 65,536 (benchmarks/README.md).
    batches = itertools.chain.from_iterable(
        parquet.iter_batches(batch_size=min(batch_rows, DECODE_ROWS), row_groups=[group],
                             columns=read)
        for group in range(parquet.num_row_groups))
    start = first_row
    while True:
        try:
            batch = next(batches, None)
            if batch is None:
                return
            batch.validate(full=True)  # catches invalid UTF-8 in a corrupt file
            draft = _draft_batch(batch, start, labels)
        except (pa.ArrowException, OSError) as e:
            raise InputError(f"{path}: cannot be read after row {start - first_row} "
                             f"({one_line(e)}); the file "
                             "is cut short or corrupt: write it again") from None
        passthrough = pa.table({name: batch.column(name) if name in names
                                else pa.nulls(batch.num_rows)
                                for name in columns.passthrough})
        yield DraftBatch(draft, passthrough, "parquet")
        start += batch.num_rows


def _short(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(f'"{n}"' for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "") or "none"
