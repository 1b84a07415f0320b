"""How a sorted run is spilled to disk (shards.py): compactly, and read back exactly.

A spilled run is an Arrow IPC file of record batches, written to cost far less than the
rows do in memory:
  * integer columns, token ids first, in the narrowest unsigned type that holds the run's
    values (uint8, uint16 or uint32; else the column's own type): token ids are int32 in
    memory, ids of a vocabulary under 65,536 need 2 bytes, the fake engine's bytes 1. The
    width follows the ids written, not the model's vocabulary: a pre-tokenized input may
    hold any int32, and a run of ids below 256 is 1 byte a token whatever the model;
  * a column with one value on every row of the run (all null, as a tokenized row's prompt
    and messages are, or the same value, as a text job's endpoint and max_tokens often are)
    is not written: the value is kept once, in memory;
  * the buffers are compressed (SPILL_COMPRESSION): in token order neighbouring rows share
    their prefix, so a shared system prompt is stored about once per batch, not per row.
Reading a batch undoes all three: the rows come back in the schema and with the values they
were written with, exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# zstd (Arrow's default level) over lz4: on the text job's sorted runs (benchmarks/README.md)
# a third smaller, for about 1 us more a row written and read back, where a row takes
# 300-400 us through the whole of `batchrun run` on the fake engine.
SPILL_COMPRESSION = "zstd"
_UNSIGNED = (pa.uint8(), pa.uint16(), pa.uint32())


@dataclass(frozen=True)
class SpillFile:
    """A spilled run: the IPC file at `path` holds its rows in batches, less the columns in
    `constants` (one value on every row), with integer columns narrowed; `schema` is the
    rows' own schema, as given to `write`; `file_bytes` its size on disk."""

    path: Path
    schema: pa.Schema
    constants: dict[str, pa.Scalar]
    file_bytes: int
    batches: int

    @classmethod
    def write(cls, path: Path, table: pa.Table, batch_rows: int,
              order: np.ndarray | None = None) -> SpillFile:
        """Write `table`'s rows (in `order`, if given: row indices) in batches of
        `batch_rows` rows."""
        # The first column is always written: a batch of no columns would have no rows.
        constants = {f.name: v for f in list(table.schema)[1:]
                     if (v := _one_value(table[f.name])) is not None}
        stored = pa.schema([f.with_type(_narrowest(table[f.name])) for f in table.schema
                            if f.name not in constants])
        table = table.combine_chunks()  # one record batch a slice or take
        rows = table.num_rows if order is None else len(order)
        options = pa.ipc.IpcWriteOptions(compression=SPILL_COMPRESSION)
        batches = 0
        with pa.OSFile(str(path), "wb") as sink, \
                pa.ipc.new_file(sink, stored, options=options) as writer:
            for start in range(0, rows, batch_rows):
                part = table.slice(start, batch_rows) if order is None \
                    else table.take(order[start:start + batch_rows])
                writer.write_batch(pa.record_batch(
                    [_cast(part[f.name].chunk(0), f.type) for f in stored], schema=stored))
                batches += 1
        return cls(path, table.schema, constants, path.stat().st_size, batches)

    def batch(self, i: int) -> pa.Table:
        """The rows of batch `i`, as written."""
        with pa.OSFile(str(self.path), "rb") as f:
            stored = pa.ipc.open_file(f).get_batch(i)
        n = stored.num_rows
        return pa.table([pa.repeat(self.constants[f.name], n) if f.name in self.constants
                         else stored.column(f.name).cast(f.type) for f in self.schema],
                        schema=self.schema)


def _cast(column: pa.Array, to: pa.DataType) -> pa.Array:
    """`column` (a slice) narrowed to `to`, a type that holds its values (no overflow
    check). A list's values are cast for the slice only: Arrow's cast of a sliced list
    casts every value of the whole list."""
    if column.type == to:
        return column
    if not pa.types.is_list(to):
        return pc.cast(column, to, safe=False)
    offsets = column.offsets
    start = offsets[0].as_py()
    values = column.values.slice(start, offsets[-1].as_py() - start)
    return pa.ListArray.from_arrays(pc.subtract(offsets, start),
                                    pc.cast(values, to.value_type, safe=False), type=to,
                                    mask=column.is_null() if column.null_count else None)


def _one_value(column: pa.ChunkedArray) -> pa.Scalar | None:
    """The value every row of `column` holds (a null one if all are null), or None."""
    n = len(column)
    if n == 0 or pa.types.is_dictionary(column.type):  # a dictionary is compact already
        return None
    if column.null_count == n:
        return pa.scalar(None, column.type)
    if column.null_count or not (pa.types.is_integer(column.type)
                                 or pa.types.is_floating(column.type)
                                 or pa.types.is_string(column.type)
                                 or pa.types.is_boolean(column.type)):
        return None
    first = column[0]
    if pa.types.is_floating(column.type):  # bit for bit: -0.0 is not 0.0 here
        values = column.to_numpy()
        same = bool((values.view(f"u{values.itemsize}")
                     == values[:1].view(f"u{values.itemsize}")).all())
    else:
        same = bool(pc.all(pc.equal(column, first)).as_py())
    return first if same else None


def _narrowest(column: pa.ChunkedArray) -> pa.DataType:
    """The type `column` is written in: an integer column (or list of integers) in the
    narrowest unsigned type that holds its values and is narrower than its own."""
    own = column.type
    is_list = pa.types.is_list(own)
    value_type = own.value_type if is_list else own
    if not pa.types.is_integer(value_type):
        return own
    values = pc.list_flatten(column) if is_list else column
    extremes = pc.min_max(values).as_py()
    low, high = extremes["min"] or 0, extremes["max"] or 0  # None: no values
    if low < 0:
        return own
    for narrow in _UNSIGNED:
        if narrow.bit_width >= value_type.bit_width:
            break
        if high <= np.iinfo(narrow.to_pandas_dtype()).max:
            return pa.list_(own.value_field.with_type(narrow)) if is_list else narrow
    return own
