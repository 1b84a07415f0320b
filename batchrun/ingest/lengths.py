"""Output lengths for the sim engine (engine/sim.py): each row's completion length, from the
input's own `completion_tokens` column or replayed from an earlier output of the same job.

`--replay-lengths PREVIOUS.parquet` (job file: `[engine] replay_lengths`) reads each row's
`completion_tokens` and `finish_reason` from batchrun's output of an earlier run, joined to
this job's rows by row id, so that a simulation of a job that really ran makes the same
requests end where they ended. A row that ended by `length` there gets no length here (it
runs to its max_tokens, as it did); a row that failed there, or whose id the file lacks,
keeps its input's value (if any). A replayed length wins over the input column's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..config import EngineKind
from ..errors import ConfigError, InputError
from ..io.input.ids import HeldIds, IdHashes
from ..io.storage import Location, reading_input

COLUMN = "completion_tokens"
_NEEDED = ("id", COLUMN, "finish_reason")


@dataclass
class ReplayLengths:
    """An earlier output's lengths by row id, and how many rows of this job found one."""

    source: str
    _held: HeldIds
    _lengths: np.ndarray  # int64 per held id; -1: ran to max_tokens (finish_reason length)
    rows: int = 0  # rows of this job looked up
    replayed: int = 0  # found a length to end at
    to_max_tokens: int = 0  # found, ended by length there: run to max_tokens
    missing: int = 0  # not in the file (or failed there): the input's own length, if any

    @classmethod
    def read(cls, location: Location) -> ReplayLengths:
        """The lengths of an output Parquet file (local or a URI). Raises InputError for a
        file that is not one."""
        try:
            with reading_input(location):
                schema = pq.read_schema(location.open_random())
                lacking = [c for c in _NEEDED if c not in schema.names]
                if lacking:
                    raise InputError(f"{location}: has no {', '.join(lacking)} column: "
                                     "--replay-lengths takes a batchrun output Parquet file")
                columns = [*_NEEDED, *(["error"] if "error" in schema.names else [])]
                table = pq.read_table(location.open_random(), columns=columns)
        except (OSError, pa.ArrowInvalid) as e:
            raise InputError(f"{location}: cannot be read as a batchrun output Parquet file "
                             f"for --replay-lengths ({e})") from None
        ok = table[COLUMN].is_valid()
        if "error" in table.column_names:
            ok = pc.and_(ok, table["error"].is_null())
        table = table.filter(ok)
        length_capped = pc.fill_null(pc.equal(table["finish_reason"], "length"), False)
        lengths = np.where(length_capped.to_numpy(zero_copy_only=False), -1,
                           table[COLUMN].to_numpy())
        held = HeldIds()
        ids = table["id"].combine_chunks()
        held.add(IdHashes.of(ids), np.arange(len(ids), dtype=np.int64))
        return cls(str(location), held, lengths.astype(np.int64))

    def fill(self, requests: pa.Table) -> pa.Table:
        """`requests` (REQUEST_SCHEMA) with their replayed lengths in COLUMN."""
        usable = requests["error"].is_null().to_numpy(zero_copy_only=False)
        at = self._held.holders(IdHashes.of(requests["id"].combine_chunks())) \
            if len(self._held) else np.full(requests.num_rows, -1, dtype=np.int64)
        found = (at >= 0) & usable
        length = np.where(found, self._lengths[np.maximum(at, 0)], -1)
        self.rows += int(usable.sum())
        self.replayed += int((length >= 0).sum())
        self.to_max_tokens += int((found & (length < 0)).sum())
        self.missing += int((usable & ~found).sum())
        given = requests[COLUMN].combine_chunks()
        replayed = pa.array(length, pa.int64(), mask=length < 0)
        column = pc.if_else(pa.array(found), replayed, given)
        return requests.set_column(requests.schema.get_field_index(COLUMN), COLUMN, column)

    def figures(self) -> dict[str, Any]:
        return {"source": self.source, "rows": self.rows, "replayed": self.replayed,
                "to_max_tokens": self.to_max_tokens, "missing": self.missing}


def replay_lengths(location: Location | None, engine_kind: str) -> ReplayLengths | None:
    """The job's replayed lengths, None when it has none. Only the sim engine reads them: a
    job that replays lengths on another engine is a mistake (ConfigError)."""
    if location is None:
        return None
    if engine_kind != EngineKind.SIM:
        raise ConfigError(f"--replay-lengths (engine.replay_lengths) is for --engine sim; "
                          f"engine {engine_kind!r} generates its own lengths")
    return ReplayLengths.read(location)
