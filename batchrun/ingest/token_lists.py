"""Requests' token ids as the planner takes them: one flat array of every request's tokens
(`values`, int32) and where each request's start (`offsets`, int64, one more than the
requests: request i is values[offsets[i]:offsets[i + 1]])."""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def offsets_of(lengths: np.ndarray) -> np.ndarray:
    """The offsets of lists of these lengths: 0, then their running sum."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def token_lists(column: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets) of a list<int32> column, such as a request table's
    prompt_token_ids: from the Arrow array's own offsets, without a copy of the values when
    it is one chunk. A null list is an empty one (the lists batchrun builds hold no values
    behind a null)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    if isinstance(column, pa.ChunkedArray) or not len(column):  # no chunks, or no rows
        return np.zeros(0, np.int32), np.zeros(1, np.int64)
    offsets = column.offsets.to_numpy().astype(np.int64)
    values = column.values.to_numpy(zero_copy_only=False)[offsets[0]:offsets[-1]]
    return np.ascontiguousarray(values, dtype=np.int32), offsets - offsets[0]
