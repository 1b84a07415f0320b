"""Hostile inputs: whatever a file holds, the readers raise nothing but InputError, and a file
they accept gives exactly one row per non-blank line, each with a unique id.

Bounded: 200 examples per property, no database, no deadline. The number of cases tried is
printed at the end of the module ("fuzz cases tried: N") and kept in CASES_TRIED.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchrun.config import ColumnMap
from batchrun.errors import InputError
from batchrun.io.input.parquet import column_values
from batchrun.io.input.readers import read_request_set
from batchrun.io.input.rows import (
    CONSTRAINT_FIELDS,
    FIELDS,
    RowError,
    parse_field,
)
from batchrun.io.schema import ENDPOINT_CHAT, REQUEST_SCHEMA
from batchrun.job.commands import validate_summary

CASES_TRIED: Counter[str] = Counter()
FUZZ = settings(max_examples=200, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PASSTHROUGH = ColumnMap(passthrough=("id", "meta"))


@pytest.fixture(scope="module", autouse=True)
def report_cases(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        by_test = ", ".join(f"{name} {n}" for name, n in sorted(CASES_TRIED.items()))
        with capture.global_and_fixture_disabled():  # teardown output is captured otherwise
            reporter.write_line(f"\nfuzz cases tried: {sum(CASES_TRIED.values())} ({by_test})")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def expected_rows(data: bytes) -> int:
    """Rows per the reader's rule: every line but blank ones, a UTF-8 BOM ignored up front."""
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    rows = 0
    for line in lines:
        if rows == 0:
            line = line.removeprefix(b"\xef\xbb\xbf")
        rows += bool(line.strip())
    return rows


def check_requests(path: Path, rows: int, columns: ColumnMap = PASSTHROUGH) -> pa.Table | None:
    """Read `path`; if it is accepted, check the table's promises. None if InputError."""
    try:
        found = read_request_set(path, columns)
    except InputError as e:
        assert "\n" not in str(e) and str(e).startswith(f"{path}: ")
        return None
    table = found.table
    assert table.schema == REQUEST_SCHEMA
    assert table["row"].to_pylist() == list(range(rows))
    ids = table["id"].to_pylist()
    assert None not in ids and len(set(ids)) == rows
    assert found.passthrough.num_rows == rows
    summary = validate_summary(table)
    assert summary["ok"] + summary["errors"] == rows
    for request in table.to_pylist():
        error = request.pop("error")
        sources = [request[name] is not None for name in FIELDS[:3]]
        if error is None:
            assert sum(sources) == 1
            assert (request["endpoint"] == ENDPOINT_CHAT) == (request["messages"] is not None)
            if request["messages"] is not None:
                assert isinstance(json.loads(request["messages"]), list)
        else:
            assert error.startswith(f"row {request['row']}: ") and "\n" not in error
            assert all(request[name] is None for name in REQUEST_SCHEMA.names[2:-1])
    return table


# --- Strategies ----------------------------------------------------------------------------

json_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
                | st.floats(allow_nan=True) | st.text(max_size=20))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=8)
field_names = st.sampled_from(["id", *FIELDS, *CONSTRAINT_FIELDS, "meta", "custom_id", "body",
                               "url", "method"])
# Values a request field is likely to meet: right, nearly right, and wrong.
field_values = (json_values | st.integers(-3, 2**40) | st.floats(-2, 2)
                | st.lists(st.integers(-2, 2**32), max_size=5)
                | st.lists(st.fixed_dictionaries({"role": json_scalars, "content": json_scalars}),
                           max_size=3)
                | st.sampled_from(["", "x", "/v1/completions", "/v1/chat/completions", "POST",
                                   "[a-z]+", "((", '{"type": "object"}', "{"])
                | st.fixed_dictionaries({"type": st.sampled_from(
                    ["text", "json_object", "json_schema", "xml"])},
                    optional={"json_schema": json_values}))
request_like = st.dictionaries(field_names, field_values, max_size=6)
valid_requests = st.fixed_dictionaries(
    {"prompt": st.text(min_size=1, max_size=30)},
    optional={"id": st.integers(0, 20) | st.text(max_size=3),
              "max_tokens": st.integers(1, 100), "temperature": st.floats(0, 2),
              "top_p": st.floats(0.01, 1), "seed": st.integers(-5, 5),
              "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=2),
              "meta": json_values})



def arrow_values(t: pa.DataType) -> st.SearchStrategy:
    """Values of Arrow type `t` (None: a null), edge cases included."""
    if pa.types.is_integer(t):
        signed = pa.types.is_signed_integer(t)
        low, high = (-(2 ** (t.bit_width - 1)), 2 ** (t.bit_width - 1) - 1) if signed \
            else (0, 2**t.bit_width - 1)
        edges = [v for v in (low, high, -1, 0, 1, 2**31 - 1, 2**31) if low <= v <= high]
        return st.none() | st.sampled_from(edges) | st.integers(low, high)
    if pa.types.is_floating(t):
        return (st.none() | st.floats(width=t.bit_width)
                | st.sampled_from([0.0, -0.0, 0.5, 1.0, 3.0]))
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return st.none() | st.text(max_size=5)
    if pa.types.is_boolean(t):
        return st.none() | st.booleans()
    return st.none() | st.lists(arrow_values(t.value_type), max_size=4)


arrow_types = st.sampled_from([
    pa.int8(), pa.uint64(), pa.int64(), pa.float32(), pa.float64(), pa.string(),
    pa.large_string(), pa.list_(pa.int64()), pa.large_list(pa.int32()), pa.list_(pa.string()),
    pa.bool_()])
arrow_columns = st.tuples(
    st.sampled_from(FIELDS + ("id",)),
    arrow_types.flatmap(lambda t: st.tuples(st.just(t), st.lists(arrow_values(t), max_size=8))))


def dumps(value: Any) -> bytes:
    return json.dumps(value).encode()


def write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


# --- Properties ----------------------------------------------------------------------------

@FUZZ
@given(data=st.binary(max_size=400))
def test_random_bytes(folder: Path, data: bytes) -> None:
    CASES_TRIED["random bytes"] += 1
    check_requests(write(folder, "bytes.jsonl", data), expected_rows(data))


@FUZZ
@given(lines=st.lists(st.binary(max_size=60).filter(lambda b: b"\n" not in b)
                      | valid_requests.map(dumps), min_size=1, max_size=8),
       end=st.sampled_from([b"", b"\n", b"\r\n"]))
def test_random_lines_among_valid_ones(folder: Path, lines: list[bytes], end: bytes) -> None:
    CASES_TRIED["random lines"] += 1
    data = b"\n".join(lines) + end
    check_requests(write(folder, "lines.jsonl", data), expected_rows(data))


@FUZZ
@given(values=st.lists(json_values | request_like, min_size=1, max_size=6))
def test_random_json_values(folder: Path, values: list[Any]) -> None:
    CASES_TRIED["random JSON"] += 1
    data = b"\n".join(map(dumps, values)) + b"\n"
    check_requests(write(folder, "values.jsonl", data), expected_rows(data))


@FUZZ
@given(rows=st.lists(request_like, min_size=1, max_size=6),
       openai=st.booleans())
def test_request_like_objects(folder: Path, rows: list[dict], openai: bool) -> None:
    """Objects with the right keys and hostile values; with openai, wrapped as batch lines."""
    CASES_TRIED["request-like objects"] += 1
    if openai:
        rows = [{"custom_id": row.pop("custom_id", str(i)), "url": row.pop("url", None),
                 "method": "POST", "body": row} for i, row in enumerate(rows)]
    data = b"\n".join(map(dumps, rows))
    table = check_requests(write(folder, "objects.jsonl", data), len(rows))
    assert table is not None  # every line is an object: the file is usable


@FUZZ
@given(rows=st.lists(valid_requests, min_size=1, max_size=8),
       edits=st.lists(st.tuples(st.sampled_from(["delete", "insert", "replace", "cut"]),
                                st.integers(0, 10**6), st.binary(min_size=1, max_size=3)),
                      min_size=1, max_size=4))
def test_mutated_valid_lines(folder: Path, rows: list[dict],
                             edits: list[tuple[str, int, bytes]]) -> None:
    CASES_TRIED["mutated lines"] += 1
    data = bytearray(b"\n".join(map(dumps, rows)) + b"\n")
    for kind, at, piece in edits:
        at %= len(data) + 1
        if kind == "delete":
            del data[at:at + len(piece)]
        elif kind == "insert":
            data[at:at] = piece
        elif kind == "replace":
            data[at:at + len(piece)] = piece
        else:
            del data[at:]
    data = bytes(data)
    check_requests(write(folder, "mutated.jsonl", data), expected_rows(data))


@FUZZ
@given(rows=st.lists(valid_requests, min_size=1, max_size=10), cut=st.floats(0, 1))
def test_truncated_parquet(folder: Path, rows: list[dict], cut: float) -> None:
    CASES_TRIED["truncated Parquet"] += 1
    columns = {name: [row.get(name) for row in rows]
               for name in ("prompt", "max_tokens", "temperature", "seed")}
    columns["id"] = [str(row.get("id")) for row in rows]  # mixed int/str: Parquet needs one
    path = folder / "cut.parquet"
    pq.write_table(pa.table(columns), path)
    data = path.read_bytes()
    keep = math.floor(cut * len(data))
    table = check_requests(write(folder, "cut.parquet", data[:keep]), len(rows))
    assert (table is not None) == (keep == len(data))


@FUZZ
@given(data=st.data(), rows=st.integers(1, 6))
def test_random_parquet_columns(folder: Path, data: st.DataObject, rows: int) -> None:
    """Parquet files whose columns have any of many types and hostile values."""
    CASES_TRIED["random Parquet columns"] += 1
    names = data.draw(st.sets(st.sampled_from(("id", *FIELDS, *CONSTRAINT_FIELDS, "meta")),
                              min_size=1))
    columns = {}
    for name in sorted(names):
        arrow_type = data.draw(arrow_types)
        values = data.draw(st.lists(arrow_values(arrow_type), min_size=rows, max_size=rows))
        columns[name] = pa.array(values, type=arrow_type)
    path = folder / "columns.parquet"
    pq.write_table(pa.table(columns), path)
    table = check_requests(path, rows)
    assert (table is None) == (not names & set(FIELDS[:3]))  # usable iff it has a prompt column


# The Parquet reader accepts clean columns with vectorized checks; per-value checks
# (parse_field) define what is valid. Both must agree on every value and every error.
@FUZZ
@given(column=arrow_columns)
def test_vectorized_checks_match_the_per_value_ones(column: tuple) -> None:
    CASES_TRIED["Arrow column checks"] += 1
    name, (arrow_type, values) = column
    array = pa.array(values, type=arrow_type)
    got, errors = column_values(name, array, name)
    want, want_errors = [], {}
    for i, value in enumerate(values):
        try:
            want.append(None if value is None else parse_field(name, value, name))
        except RowError as e:
            want.append(None)
            want_errors[i] = str(e)
    assert errors == want_errors
    assert got.to_pylist() == want
