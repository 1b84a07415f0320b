"""The ids a streamed input already holds, and the first row holding each, in memory that does
not keep the ids' text.

The reader checks that ids are unique across inputs of tens of millions of rows. It remembers
each id as a 128-bit hash (two 64-bit xxh3 hashes with different seeds, polars' Series.hash)
next to the row that holds it: 24 bytes an id, 240 MB for ten million ids, whatever their
length.

Two different ids are taken for one only if both hashes match: with n ids held, the chance that
any two of them do is about n**2 / 2**129 (1.5e-25 for ten million), far below that of a memory
error. One 64-bit hash would give 3e-6, too much to let two different ids merge silently.

Hashes live in sorted runs whose sizes at least double from newest to oldest (a log-structured
merge): adding a batch costs a sort of the batch plus, amortized, a few merges per id, and a
lookup is one binary search per run (about log2(ids / batch) runs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa

# Any two fixed, different seeds: xxh3 derives its secret from the seed.
_SEEDS = (0x243F6A8885A308D3, 0x13198A2E03707344)


@dataclass(frozen=True)
class IdHashes:
    """One 128-bit hash per id, in two halves."""

    high: np.ndarray  # uint64
    low: np.ndarray  # uint64

    @classmethod
    def of(cls, ids: pa.Array) -> IdHashes:
        """The hashes of non-null text ids."""
        series = pl.Series(ids)
        return cls(series.hash(_SEEDS[0]).to_numpy(), series.hash(_SEEDS[1]).to_numpy())

    def __len__(self) -> int:
        return len(self.high)


@dataclass(frozen=True)
class _Run:
    """Ids sorted by the high half of their hash (ties in any order), with their rows."""

    high: np.ndarray
    low: np.ndarray
    rows: np.ndarray  # int64

    def holders(self, ids: IdHashes, found: np.ndarray) -> None:
        """Fill `found` (-1: not seen yet) with the row of each id this run holds."""
        at = np.searchsorted(self.high, ids.high)
        open_ = np.flatnonzero(found < 0)
        # Ids whose high halves tie sit next to each other: step through the tie, which
        # holds one id nearly always.
        while len(open_):
            p = at[open_]
            inside = p < len(self.high)
            open_, p = open_[inside], p[inside]
            same_high = self.high[p] == ids.high[open_]
            open_, p = open_[same_high], p[same_high]
            same = self.low[p] == ids.low[open_]
            found[open_[same]] = self.rows[p[same]]
            open_ = open_[~same]
            at[open_] += 1


class HeldIds:
    """Ids held so far, each with the first row that holds it."""

    def __init__(self) -> None:
        self._runs: list[_Run] = []

    def __len__(self) -> int:
        return sum(len(run.high) for run in self._runs)

    def holders(self, ids: IdHashes) -> np.ndarray:
        """The row holding each id (int64), -1 for an id not held."""
        # Asked in sorted order, the binary searches walk each run front to back (numpy
        # starts each search where the last one ended): ~5x faster on runs of millions.
        order = np.argsort(ids.high)
        asked = IdHashes(ids.high[order], ids.low[order])
        found = np.full(len(ids), -1, dtype=np.int64)
        for run in self._runs:
            run.holders(asked, found)
        out = np.empty_like(found)
        out[order] = found
        return out

    def add(self, ids: IdHashes, rows: np.ndarray) -> None:
        """Hold these ids, none held yet and no two the same, by these rows."""
        if not len(ids):
            return
        order = np.argsort(ids.high, kind="stable")
        self._runs.append(_Run(ids.high[order], ids.low[order],
                               np.asarray(rows, dtype=np.int64)[order]))
        while len(self._runs) > 1 and len(self._runs[-2].high) <= 2 * len(self._runs[-1].high):
            newer, older = self._runs.pop(), self._runs.pop()
            high = np.concatenate([older.high, newer.high])
            order = np.argsort(high, kind="stable")  # two sorted runs: a merge, O(n)
            self._runs.append(_Run(high[order], np.concatenate([older.low, newer.low])[order],
                                   np.concatenate([older.rows, newer.rows])[order]))
