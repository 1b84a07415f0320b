"""Examples of reading an input as a stream of batches: the batches are the whole read cut in
pieces, ids stay unique across batches, passthrough types that differ between batches are
brought to one, and an unusable input is refused before the first row."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchrun.config import ColumnMap
from batchrun.errors import InputError
from batchrun.io.input.ids import HeldIds, IdHashes
from batchrun.io.input.readers import (
    cast_passthrough,
    open_request_stream,
    read_request_set,
    unified_passthrough_schema,
)
from batchrun.io.schema import REQUEST_SCHEMA
from batchrun.job.commands import ValidationReport, validate_summary
from tests.helpers import write_jsonl


def random_rows(rng: random.Random, n: int) -> list[dict | str]:
    """Rows with ids that repeat, ids that are row numbers, no ids, and broken lines (never
    the first: a file of nothing but broken lines is refused as a whole)."""
    rows: list[dict | str] = []
    for i in range(n):
        kind = rng.random()
        if kind < 0.1 and i:
            rows.append("{broken")
        elif kind < 0.4:
            rows.append({"prompt": f"p{i}", "tag": rng.choice([1, 2.5, "x", None, [1]])})
        else:
            rows.append({"id": rng.choice([f"k{rng.randrange(n)}", rng.randrange(n)]),
                         "prompt": f"p{i}", "tag": rng.choice([1, 2, None])})
    return rows


def test_the_batches_are_the_whole_read_cut_in_pieces(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", random_rows(random.Random(1), 50))
    columns = ColumnMap(passthrough=("tag", "source_file"))
    stream = open_request_stream(path, columns, batch_rows=7)
    batches = list(stream)
    assert [b.requests.num_rows for b in batches] == [7] * 7 + [1]
    assert [b.requests["row"][0].as_py() for b in batches] == list(range(0, 50, 7))
    whole = read_request_set(path, columns, batch_rows=7)
    assert pa.concat_tables([b.requests for b in batches]).equals(whole.table)
    assert stream.input_format == whole.input_format == "jsonl"
    assert all(b.requests.schema == REQUEST_SCHEMA for b in batches)
    assert all(b.passthrough.num_rows == b.requests.num_rows for b in batches)


def test_the_file_name_alone_can_pass_through(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    for batch in open_request_stream(path, ColumnMap(passthrough=("source_file",))):
        assert batch.passthrough.to_pydict() == {"source_file": [str(path)] * 2}


def test_a_dataset_streams_file_after_file_with_rows_numbered_across_them(
        tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}"} for i in range(5)])
    pq.write_table(pa.table({"prompt": [f"b{i}" for i in range(4)]}), tmp_path / "b.parquet",
                   row_group_size=3)
    stream = open_request_stream(str(tmp_path / "*.*"), batch_rows=3)
    batches = list(stream)
    assert [b.requests["row"].to_pylist() for b in batches] == [
        [0, 1, 2], [3, 4], [5, 6, 7], [8]]  # a new file starts a new batch
    assert stream.input_format == "jsonl+parquet"


@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 60), batch_rows=st.integers(1, 9))
def test_ids_are_unique_across_batches(tmp_path: Path, seed: int, n: int,
                                       batch_rows: int) -> None:
    rows = random_rows(random.Random(seed), n)
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    small = read_request_set(path, batch_rows=batch_rows).table
    ids = small["id"].to_pylist()
    assert len(set(ids)) == n and small["row"].to_pylist() == list(range(n))
    # Where no row needs a free id, batches read exactly as the whole file at once. (A row
    # without a readable id, broken or a repeat, may take a free id that a later batch
    # claims: see the next test.)
    whole = read_request_set(path).table
    if not whole["error"].drop_null():
        assert small.equals(whole)
    # The first row to claim an id keeps it, unless an earlier row without a readable id took
    # it as its free id; a later claim is a repeat naming the row that holds the id.
    holder = {id_: j for j, id_ in enumerate(ids)}
    claimed = set()
    for i, row in enumerate(rows):
        if row == "{broken":
            continue
        claim, error = str(row.get("id", i)), small["error"][i].as_py()
        if error is None:
            assert ids[i] == claim and claim not in claimed
        else:
            j = holder[claim]
            assert j < i and error.startswith(
                f"row {i}: duplicate id {json.dumps(claim)} (first at row {j})")
        claimed.add(claim)


def test_a_row_without_an_id_keeps_the_free_id_a_later_batch_claims(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [
        "{broken", {"id": "2", "prompt": "a"},  # batch 1: row 0 gets "0", not row 1's "2"
        {"prompt": "b"}, {"id": "0", "prompt": "c"},  # batch 2: "0" is held by row 0
    ])
    table = read_request_set(path, batch_rows=2).table
    assert table["id"].to_pylist() == ["0", "2", "2~1", "3"]
    assert table["error"][2].as_py().startswith('row 2: duplicate id "2" (first at row 1)')
    assert table["error"][3].as_py().startswith('row 3: duplicate id "0" (first at row 0)')
    # Read at once, row 0 looks ahead and leaves "0" to row 3.
    assert read_request_set(path).table["id"].to_pylist() == ["0~1", "2", "2~1", "0"]


def test_ids_held_are_told_apart_by_all_128_bits() -> None:
    held = HeldIds()
    same_high = np.array([7, 7, 7], dtype=np.uint64)
    held.add(IdHashes(same_high, np.array([1, 2, 3], dtype=np.uint64)), np.array([10, 11, 12]))
    held.add(IdHashes(np.array([5], dtype=np.uint64), np.array([2], dtype=np.uint64)),
             np.array([13]))
    asked = IdHashes(np.array([7, 7, 7, 5, 5], dtype=np.uint64),
                     np.array([3, 4, 1, 2, 1], dtype=np.uint64))
    assert held.holders(asked).tolist() == [12, -1, 10, 13, -1]
    assert len(held) == 4


def test_many_ids_held_over_many_batches() -> None:
    held = HeldIds()
    ids = pa.array([f"id-{i}" for i in range(20_000)])
    for start in range(0, 20_000, 1000):
        part = ids[start:start + 1000]
        assert (held.holders(IdHashes.of(part)) == -1).all()
        held.add(IdHashes.of(part), np.arange(start, start + 1000))
    again = pa.array([f"id-{i}" for i in range(0, 20_000, 997)] + ["id-20000"])
    assert held.holders(IdHashes.of(again)).tolist() == list(range(0, 20_000, 997)) + [-1]


def test_passthrough_types_that_drift_between_batches_are_unified(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [
        {"prompt": "a", "n": 1, "f": 1, "s": None, "t": True},
        {"prompt": "b", "n": 2, "f": 2, "s": None, "t": False},
        {"prompt": "c", "n": "three", "f": 2.5, "s": 7, "t": True},
    ])
    columns = ColumnMap(passthrough=("n", "f", "s", "t", "gone"))
    batches = list(open_request_stream(path, columns, batch_rows=2))
    assert batches[0].passthrough.schema.field("n").type == pa.int64()
    assert batches[1].passthrough.schema.field("n").type == pa.string()
    schema = unified_passthrough_schema([b.passthrough.schema for b in batches],
                                        columns.passthrough)
    assert schema == pa.schema([("n", pa.string()), ("f", pa.float64()), ("s", pa.int64()),
                                ("t", pa.bool_()), ("gone", pa.string())])
    unified = pa.concat_tables([cast_passthrough(b.passthrough, schema) for b in batches])
    assert unified.to_pydict() == {"n": ["1", "2", "three"], "f": [1.0, 2.0, 2.5],
                                   "s": [None, None, 7], "t": [True, False, True],
                                   "gone": [None, None, None]}
    assert read_request_set(path, columns, batch_rows=2).passthrough.equals(unified)
    # Read at once, the same file gives the same columns.
    assert read_request_set(path, columns).passthrough.equals(unified)


def test_an_unusable_file_of_a_dataset_is_refused_before_any_row(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": "a"}])
    pq.write_table(pa.table({"text": ["b"]}), tmp_path / "b.parquet")
    with pytest.raises(InputError, match=r"is a dataset; .*b.parquet: has none of the columns"):
        open_request_stream(str(tmp_path / "*.*"))


def test_a_json_array_is_refused_at_the_first_batch(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('[{"prompt": "a"},\n{"prompt": "b"}]\n')
    stream = iter(open_request_stream(path))
    with pytest.raises(InputError, match="this is a JSON array"):
        next(stream)


def test_the_validate_report_over_batches_equals_the_report_at_once(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", random_rows(random.Random(3), 40))
    whole = validate_summary(read_request_set(path, batch_rows=3).table, max_errors=5)
    report = ValidationReport(max_errors=5)
    for batch in open_request_stream(path, batch_rows=3):
        report.add_rows(batch.requests)
    assert report.summary() == whole
    # Problems found later (the tokenizer's) are listed among the reader's in row order.
    report = ValidationReport(max_errors=3)
    report.add_rows(read_request_set(write_jsonl(tmp_path / "b.jsonl", [
        {"prompt": "a"}, "{broken", {"prompt": "c"}, "{broken"])).table,
        {0: "row 0: too long", 2: "row 2: too long"})
    assert [e[:6] for e in report.summary()["first_errors"]] == ["row 0:", "row 1:", "row 2:"]
    assert report.summary()["errors"] == 4 and report.summary()["ok"] == 0


def test_reading_parquet_holds_one_row_group_at_a_time(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    # Row groups large enough (~7 MB compressed) that one pyarrow reader over the whole file
    # keeps the bytes of those it has read.
    groups, rows, tokens = 5, 40_000, 100
    values = pa.array(rng.integers(0, 32_000, groups * rows * tokens, dtype=np.int32))
    offsets = pa.array(np.arange(0, groups * rows * tokens + 1, tokens, dtype=np.int32))
    path = tmp_path / "tokens.parquet"
    pq.write_table(pa.table({"prompt_token_ids": pa.ListArray.from_arrays(offsets, values)}),
                   path, row_group_size=rows)
    group_bytes = pq.ParquetFile(path).metadata.row_group(0).column(0).total_compressed_size
    held, seen = [], 0
    for batch in open_request_stream(path, batch_rows=rows):
        seen += batch.requests.num_rows
        held.append(pa.total_allocated_bytes())
        del batch
    assert seen == groups * rows
    assert max(held) - held[0] < group_bytes, [h / group_bytes for h in held]
