"""The output is written range by range in row order (io/output/writer.py): whatever the
range size, every row once, in order, the first of any row journaled twice kept."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import given, settings
from hypothesis import strategies as st

from batchrun.io.output.writer import InputColumns, OutputFiles, write_in_row_order
from batchrun.io.schema import RESULT_SCHEMA


def write_journal(path: Path, rows: list[int], text: str) -> None:
    n = len(rows)
    values = {"row": pa.array(rows, pa.int64()), "id": pa.array([f"q{r}" for r in rows]),
              "text": pa.array([text] * n)}
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_stream(f, RESULT_SCHEMA) as w:
        w.write_batch(pa.record_batch([values.get(f.name, pa.nulls(n, f.type))
                                       for f in RESULT_SCHEMA], schema=RESULT_SCHEMA))


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 300), range_bytes=st.sampled_from([1, 100, 2_000, 10**9]),
       seed=st.integers(0, 1000), repeats=st.integers(0, 20))
def test_every_row_once_in_order_whatever_the_range_size(tmp_path_factory, rows, range_bytes,
                                                         seed, repeats):
    tmp = tmp_path_factory.mktemp("ranges")
    order = np.random.default_rng(seed).permutation(rows).tolist()
    again = order[:min(repeats, rows)]  # run again after a kill: journaled twice
    write_journal(tmp / "journal-00000.arrows", order, "first")
    write_journal(tmp / "journal-00001.arrows", again, "again")
    columns = InputColumns(tmp / "spill", memory_bytes=1 << 20)
    columns.append(pa.table({"note": [f"n{r}" for r in range(rows)]}))
    written = write_in_row_order(sorted(tmp.glob("journal-*.arrows")), rows, columns,
                                 OutputFiles(tmp / "out.parquet"), {}, range_bytes=range_bytes,
                                 scratch=tmp / "scratch")
    out = pq.read_table(tmp / "out.parquet")
    assert written == rows
    assert out["row"].to_pylist() == list(range(rows))
    assert out["note"].to_pylist() == [f"n{r}" for r in range(rows)]
    assert set(out["text"].to_pylist()) == {"first"}
