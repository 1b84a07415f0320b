"""The report's figures of the results, gathered batch by batch: the same histograms and
error groups as counting every row at once, whatever the batches."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from batchrun.report.data import EXAMPLE_IDS, LENGTH_BINS, _Results

REASONS = ["stop", "length", None]


def whole_job_histograms(lengths: np.ndarray, reasons: list[str]) -> dict:
    """Every finished row at once, as the report counted before it read batch by batch."""
    bins = min(LENGTH_BINS, int(lengths.max()) + 1)
    edges = np.histogram_bin_edges(lengths.astype(np.float64), bins=bins)
    which = np.clip(((lengths - edges[0]) / (edges[-1] - edges[0] or 1) * bins).astype(
        np.int64), 0, bins - 1)
    return {r: (edges, np.bincount(which[np.array(reasons) == r], minlength=bins))
            for r in set(reasons)}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3000), st.sampled_from(REASONS), st.booleans()),
                min_size=1, max_size=200),
       st.lists(st.integers(1, 50), min_size=1, max_size=10))
def test_batch_by_batch_counts_as_all_rows_at_once(rows, cuts):
    table = pa.table({
        "id": [f"r{i}" for i in range(len(rows))],
        "finish_reason": pa.array([None if failed else reason for _, reason, failed in rows],
                                  pa.string()),
        "completion_tokens": pa.array([n for n, _, _ in rows], pa.int32()),
        "error": pa.array([f"error {n % 3}" if failed else None for n, _, failed in rows],
                          pa.string())})
    results, at = _Results(), 0
    for size in (*cuts, len(rows)):
        batch = table.slice(at, size).to_batches()
        results.add(batch[0] if batch else pa.RecordBatch.from_pylist([], table.schema))
        at += size
    finished = [(n, reason or "none") for n, reason, failed in rows if not failed]
    got = results.length_histograms()
    if not finished:
        assert got == {}
    else:
        expected = whole_job_histograms(np.array([n for n, _ in finished]),
                                        [r for _, r in finished])
        assert got.keys() == expected.keys()
        for reason, (edges, counts) in expected.items():
            assert np.allclose(got[reason][0], edges)
            assert got[reason][1].tolist() == counts.tolist()
    failed = [(i, n) for i, (n, _, f) in enumerate(rows) if f]
    for message, count, examples in results.errors():
        mine = [f"r{i}" for i, n in failed if f"error {n % 3}" == message]
        assert count == len(mine) and examples == mine[:EXAMPLE_IDS]
