"""Which replica runs what: the queue of prefix shards that replicas pull from.

Shards go out largest first (by rows), each to the next replica that frees up. A shard
bigger than half a replica's fair share of the work still to do ((queued + in-flight rows) /
replicas) is cut: the replica pulling it gets a piece of at most that size, and the rest goes
back into the queue. So pieces shrink as the job nears its end, and a replica's last piece is
never more than half its share of what was left: the others finish within that of it. Half,
not a whole share, because rows are not equal work (a row of a rare prefix computes that
prefix too, a row of a popular one does not), and the queue counts rows: the simulated fleet
in benchmarks/bench_replicas.py shows what each choice leaves at the tail.

A piece is a run of the shard's rows in prefix order (lexicographic by token ids, so rows
that share a prefix are neighbours). Cutting between two neighbours costs exactly the whole
KV blocks they share: the second piece's engine computes them again. So the cut goes where
the fewest blocks are shared among the cuts that leave the piece between half its target
size and its target size (ideally between two prefix families, where it costs nothing),
nearest the target among equals.

Nothing here knows about Ray: the driver (cluster/replicas.py) and the fleet simulation
(benchmarks/bench_replicas.py) run this same code.

    queue = ShardQueue(shards, replicas=4, orders=PrefixOrders(block_size=32))
    work = queue.take(in_flight_rows=0)      # the largest shard, or a piece of it
    table = work.table(queue.orders)         # its rows, to hand to a replica
    queue.put_back(work.without(rows_done))  # its replica died: the rest runs elsewhere
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..ingest.token_lists import token_lists
from ..io.schema import ADAPTER
from ..plan.adapters import adapter_keys
from ..plan.prefix_tree import PrefixTree

# Never cut a piece smaller than this, nor a shard that is less than this over its target,
# nor aim below twice this: such a cut saves less tail time than its replica spends on the
# cut prefix and the round trip.
MIN_PIECE_ROWS = 8


class ShardRef(Protocol):
    """A prefix shard of the job (batchrun/ingest/shards.py): its size, and its rows on demand."""

    @property
    def rows(self) -> int: ...

    def load(self) -> pa.Table:
        """The shard's REQUEST_SCHEMA rows (global `row` numbers, prompt_token_ids set)."""
        ...


@dataclass(frozen=True, eq=False)
class PrefixOrder:
    """A shard's rows in prefix order, and the whole KV blocks each shares with the one
    before it (what cutting just before it would cost)."""

    table: pa.Table
    order: np.ndarray  # int64: table positions; rows without tokens (error rows) last
    shared_blocks: np.ndarray  # int64, by order position; 0 at position 0

    @classmethod
    def of(cls, table: pa.Table, block_size: int) -> PrefixOrder:
        tokens = table["prompt_token_ids"]
        usable = pc.and_(pc.is_valid(tokens), pc.is_null(table["error"]))
        runnable = np.flatnonzero(usable.to_numpy(zero_copy_only=False))
        values, offsets = token_lists(tokens.filter(usable))
        lengths = np.diff(offsets)
        # Keyed by adapter: rows on different adapters share no cached prefix.
        tree = PrefixTree.build(values, offsets, adapter_keys(table[ADAPTER].filter(usable)))
        # Like vLLM's prefix cache: whole blocks only, and never a request's last token.
        ordered = lengths[tree.order]
        reusable = tree.lcp.copy()
        if len(reusable) > 1:
            reusable[1:] = np.minimum(reusable[1:], np.minimum(ordered[1:], ordered[:-1]) - 1)
        shared = np.maximum(reusable, 0) // block_size
        rest = np.setdiff1d(np.arange(table.num_rows), runnable, assume_unique=True)
        return cls(table, np.concatenate([runnable[tree.order], rest]).astype(np.int64),
                   np.concatenate([shared, np.zeros(len(rest), dtype=np.int64)]))

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Global row numbers of the rows at order positions [start, stop)."""
        return self.table["row"].to_numpy()[self.order[start:stop]]


class PrefixOrders:
    """Prefix orders of the last few shards cut into pieces: the pieces of one shard are
    handed out one after another, and each would otherwise load and sort it again."""

    def __init__(self, block_size: int, keep: int = 2) -> None:
        self.block_size = block_size
        self._keep = keep
        self._cache: OrderedDict[int, tuple[ShardRef, PrefixOrder]] = OrderedDict()

    def __call__(self, shard: ShardRef) -> PrefixOrder:
        key = id(shard)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key][1]
        order = PrefixOrder.of(shard.load(), self.block_size)
        self._cache[key] = (shard, order)  # the shard too: its id stays its own while cached
        while len(self._cache) > self._keep:
            self._cache.popitem(last=False)
        return order


@dataclass(frozen=True, eq=False)
class Work:
    """A shard, or the piece of it at positions [start, stop) of its prefix order, less the
    rows a replica that died had already returned."""

    shard: ShardRef
    rows: int  # rows left to run
    shard_number: int = 0  # the shard's place in the job's token order
    start: int = 0
    stop: int | None = None  # None: the whole shard, as stored (never sorted)
    returned: frozenset[int] = field(default_factory=frozenset)  # global row numbers

    @classmethod
    def whole(cls, shard: ShardRef, shard_number: int = 0) -> Work:
        return cls(shard, shard.rows, shard_number)

    @property
    def token_order(self) -> tuple[int, int]:
        """Sorts pieces in the job's token order (shards are consecutive ranges of it)."""
        return self.shard_number, self.start

    def table(self, orders: PrefixOrders) -> pa.Table:
        """The rows to run: REQUEST_SCHEMA, global row numbers."""
        if self.stop is None:
            table = self.shard.load()
        else:
            order = orders(self.shard)
            table = order.table.take(order.order[self.start:self.stop])
        if self.returned:
            returned = pa.array(sorted(self.returned), pa.int64())
            table = table.filter(pc.invert(pc.is_in(table["row"], value_set=returned)))
        return table

    def without(self, rows: Iterable[int]) -> Work:
        """This work less `rows` (rows of it already returned)."""
        rows = frozenset(rows) - self.returned
        return replace(self, rows=self.rows - len(rows), returned=self.returned | rows)

    def split(self, target_rows: int, orders: PrefixOrders) -> tuple[Work, Work] | None:
        """A head of about `target_rows` rows cut where the fewest KV blocks are shared,
        and the rest; None if no cut leaves both non-empty."""
        order = orders(self.shard)
        start = self.start
        stop = len(order.order) if self.stop is None else self.stop
        left = np.ones(stop - start, dtype=bool)
        if self.returned:
            left = ~np.isin(order.rows(start, stop), list(self.returned))
        before = np.concatenate(([0], np.cumsum(left)))  # rows left before each position
        cut = _cheapest_cut(before, order.shared_blocks[start:stop], target_rows)
        if cut is None:
            return None
        head_rows = int(before[cut])
        return (replace(self, rows=head_rows, start=start, stop=start + cut),
                replace(self, rows=self.rows - head_rows, start=start + cut, stop=stop))


def _cheapest_cut(before: np.ndarray, shared_blocks: np.ndarray, target: int) -> int | None:
    """The position k (0 < k < n) to cut at: the head (positions < k) holds between half the
    `target` rows and all of them, and each side at least MIN_PIECE_ROWS; among those, fewest
    blocks shared across the cut, then nearest the target. before[k]: rows left before k."""
    n = len(shared_blocks)
    k = np.arange(1, n)
    head = before[1:n]
    lo = max(MIN_PIECE_ROWS, target // 2)
    hi = min(target, int(before[n]) - MIN_PIECE_ROWS)
    ok = (head >= lo) & (head <= hi)
    if not ok.any():
        return None
    k, head = k[ok], head[ok]
    best = np.lexsort((np.abs(head - target), shared_blocks[k]))[0]
    return int(k[best])


class ShardQueue:
    """Work waiting for a replica, largest first (see the module notes)."""

    def __init__(self, shards: Iterable[ShardRef], replicas: int, orders: PrefixOrders) -> None:
        self.replicas = max(1, replicas)
        self.orders = orders
        self._heap: list[tuple[int, int, Work]] = []
        self._seq = itertools.count()  # ties: first in, first out
        self.queued_rows = 0
        self.pieces_cut = 0
        for number, shard in enumerate(shards):
            if shard.rows:
                self.put_back(Work.whole(shard, number))

    def __len__(self) -> int:
        return len(self._heap)

    def put_back(self, work: Work) -> None:
        if work.rows <= 0:
            return
        heapq.heappush(self._heap, (-work.rows, next(self._seq), work))
        self.queued_rows += work.rows

    def take(self, in_flight_rows: int = 0) -> Work | None:
        """The next work for a replica that is free: the largest, or a piece of it of at most
        half a fair share. `in_flight_rows`: rows handed out and not yet returned."""
        if not self._heap:
            return None
        fair_share = (self.queued_rows + in_flight_rows) / self.replicas
        target = max(math.ceil(fair_share / 2), 2 * MIN_PIECE_ROWS)
        _, _, work = heapq.heappop(self._heap)
        self.queued_rows -= work.rows
        if work.rows >= target + MIN_PIECE_ROWS:
            pieces = work.split(target, self.orders)
            if pieces is not None:
                work, rest = pieces
                self.put_back(rest)
                self.pieces_cut += 1
        return work

    def clear(self) -> None:
        """Hand out nothing more (the job is stopping)."""
        self._heap.clear()
        self.queued_rows = 0
