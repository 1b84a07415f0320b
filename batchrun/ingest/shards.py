"""Stage "shard": cut a job's tokenized requests into prefix shards that fit in memory.

A shard is a contiguous range of the job's prompts in lexicographic (token id) order, each
prompt behind its LoRA adapter's key (plan/adapters.py: rows on different adapters share no
cached prefix, so a shard's range is of (adapter, tokens)). That order is the global prefix
tree's depth-first order, so:
  * requests that share a prefix are neighbours, and land in one shard, except at the few
    places where one shard ends and the next begins: there the prefix the two neighbours
    share is computed once in each shard (the splitter picks boundaries where that prefix is
    short);
  * the global tree's figures are the shards' figures plus a correction at each boundary
    (`boundary_reuse`), so `distinct_prompt_tokens` and the block ideal stay exact;
  * identical prompts always land in one shard, so deduplication stays whole-job.

How, in bounded memory: tokenized requests arrive in input order (`add`) and collect in memory.
While the job fits the budget nothing else happens: a small job is one shard, never written
to disk. Past the budget's share for one run, the collected rows are sorted (the prefix
tree's sort) and spilled as a sorted run: a compact, compressed Arrow IPC file of
fixed-size record batches (spill.py), keeping in memory only the first prompt of each batch
(its head). A run may instead be handed on unsorted (`hand_on`: the job starts its engine on
it while the rest is read; job/early_start.py): its rows then join no shard. At the end,
splitters are chosen from the heads of all runs (a sample of the sorted order, weighted by
bytes), and each shard is the slice of every run between two splitters, found by binary
search and read batch by batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..io.schema import ADAPTER, REQUEST_SCHEMA
from ..plan.adapters import BASE_KEY, adapter_keys, keyed_prompt
from ..plan.blocks import ceil_div
from ..plan.prefix_tree import PrefixTree, sorted_order
from ..plan.prefixes import compare
from .spill import SpillFile
from .token_lists import offsets_of, token_lists

RUN_BATCH_ROWS = 4096  # rows per record batch of a sorted run: the unit searched and read back


def lexicographic_order(table: pa.Table) -> np.ndarray:
    """Row indices of `table` in (adapter, token) order (error rows, with no tokens, first
    among their adapter's)."""
    return sorted_order(*token_lists(table["prompt_token_ids"]), adapter_keys(table[ADAPTER]))[0]


def keyed_prompts(table: pa.Table, rows: Iterable[int]) -> list[np.ndarray]:
    """The prompts of `rows` of `table` behind their adapter's key, as shards compare them."""
    prompts = _KeyedPrompts.of(table)
    return [prompts[i] for i in rows]


@dataclass
class SortedRun:
    """Tokenized requests sorted by prompt, in memory (`table`) or spilled (`file`), in
    batches of `batch_rows` whose first prompts (`heads`) are kept for searching. `nbytes`:
    the rows' bytes in memory (what a shard of them holds), spilled or not."""

    rows: int
    nbytes: int
    heads: list[np.ndarray]
    batch_rows: int
    table: pa.Table | None = None
    file: SpillFile | None = None

    @classmethod
    def sort(cls, table: pa.Table, spill_to: Path | None,
             batch_rows: int = RUN_BATCH_ROWS) -> SortedRun:
        order = lexicographic_order(table)
        table = table.combine_chunks()
        if spill_to is None:
            table = table.take(order)
            heads = keyed_prompts(table, range(0, table.num_rows, batch_rows))
            return cls(table.num_rows, table.nbytes, heads, batch_rows, table=table)
        # Spilled batch by batch, each taken in sorted order as it is written: a sorted copy
        # of the whole run would double its memory for as long as the write takes.
        heads = keyed_prompts(table, order[::batch_rows].tolist())
        return cls(table.num_rows, table.nbytes, heads, batch_rows,
                   file=SpillFile.write(spill_to, table, batch_rows, order))

    def batch(self, i: int) -> pa.Table:
        """Rows [i * batch_rows, (i + 1) * batch_rows)."""
        if self.table is not None:
            return self.table.slice(i * self.batch_rows, self.batch_rows)
        return self.file.batch(i)

    def lower_bound(self, prompt: np.ndarray | None) -> int:
        """The first row whose keyed prompt sorts at or after `prompt` (a keyed prompt;
        None: past the end)."""
        if prompt is None:
            return self.rows
        before = _count_less(self.heads, prompt)  # batches whose head sorts before prompt
        if before == 0:
            return 0
        batch = self.batch(before - 1)
        return (before - 1) * self.batch_rows + _count_less(_KeyedPrompts.of(batch), prompt)

    def rows_between(self, start: int, stop: int) -> Iterator[pa.Table]:
        for i in range(start // self.batch_rows, ceil_div(stop, self.batch_rows)):
            batch = self.batch(i)
            first = i * self.batch_rows
            lo, hi = max(start - first, 0), min(stop - first, batch.num_rows)
            if hi > lo:
                yield batch.slice(lo, hi - lo)


@dataclass(frozen=True)
class _KeyedPrompts:
    """A batch's keyed prompts, each made when a binary search looks at it."""

    values: np.ndarray
    offsets: np.ndarray
    keys: np.ndarray | None

    @classmethod
    def of(cls, table: pa.Table) -> _KeyedPrompts:
        return cls(*token_lists(table["prompt_token_ids"]), adapter_keys(table[ADAPTER]))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        key = BASE_KEY if self.keys is None else int(self.keys[i])
        return keyed_prompt(key, self.values[self.offsets[i]:self.offsets[i + 1]])


def _count_less(sorted_prompts: Sequence[np.ndarray], prompt: np.ndarray) -> int:
    """How many of the (sorted) prompts sort before `prompt`: a binary search."""
    lo, hi = 0, len(sorted_prompts)
    while lo < hi:
        mid = (lo + hi) // 2
        if compare(sorted_prompts[mid], prompt) < 0:
            lo = mid + 1
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class Shard:
    """One contiguous range of the job's prompts in token order: [low, high) of every run."""

    pieces: tuple[tuple[SortedRun, int, int], ...]  # (run, first row, one past the last)

    @property
    def rows(self) -> int:
        return sum(stop - start for _, start, stop in self.pieces)

    def load(self) -> pa.Table:
        """The shard's tokenized requests (REQUEST_SCHEMA), in memory."""
        parts = [t for run, start, stop in self.pieces for t in run.rows_between(start, stop)]
        if not parts:
            return REQUEST_SCHEMA.empty_table()
        return pa.concat_tables(parts).combine_chunks()


@dataclass
class ShardBuilder:
    """Collects tokenized requests (REQUEST_SCHEMA tables with prompt_token_ids) and cuts
    them into shards of about `shard_bytes`, spilling sorted runs of about `run_bytes` under
    `spill_dir` once the collected rows outgrow `run_bytes`."""

    spill_dir: Path
    run_bytes: int
    shard_bytes: int
    pending: list[pa.Table] = field(default_factory=list)
    pending_bytes: int = 0
    runs: list[SortedRun] = field(default_factory=list)
    rows: int = 0
    # Takes a full run's rows instead of spilling them, or declines (False): early start.
    hand_on: Callable[[pa.Table], bool] | None = None
    handed_rows: int = 0
    # Held while a run is sorted: with early start, the engine's thread holds it while it
    # prepares a shard, so that the two peaks (each several times a run's bytes) never add.
    planning: AbstractContextManager = field(default_factory=nullcontext)

    @property
    def spilled_bytes(self) -> int:
        """The bytes written to disk: the spilled runs' files."""
        return sum(r.file.file_bytes for r in self.runs if r.file is not None)

    @property
    def spilled_rows(self) -> int:
        """The rows in the spilled runs' files (the last run stays in memory)."""
        return sum(r.rows for r in self.runs if r.file is not None)

    def add(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self.pending.append(table)
        self.pending_bytes += table.nbytes
        self.rows += table.num_rows
        if self.pending_bytes > self.run_bytes:
            self._hand_on_or_spill()

    def _hand_on_or_spill(self) -> None:
        if self.hand_on is not None:
            table = pa.concat_tables(self.pending)
            if self.hand_on(table):
                self.handed_rows += table.num_rows
                self.pending, self.pending_bytes = [], 0
                return
        self._spill()

    def _spill(self) -> None:
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        path = self.spill_dir / f"run-{len(self.runs):05d}.arrow"
        self.runs.append(self._sorted_run(path))
        self.pending, self.pending_bytes = [], 0

    def _sorted_run(self, path: Path | None) -> SortedRun:
        """The pending rows sorted, in batches of about 1/64 of a shard (at most
        RUN_BATCH_ROWS rows): the heads then place each boundary within 1/64 of a shard."""
        table = pa.concat_tables(self.pending)
        per_row = max(table.nbytes // max(table.num_rows, 1), 1)
        batch_rows = int(np.clip(self.shard_bytes // 64 // per_row, 16, RUN_BATCH_ROWS))
        with self.planning:
            return SortedRun.sort(table, path, batch_rows)

    def finish(self) -> list[Shard]:
        """The shards, in token order. A job that never spilled is one shard, unsorted."""
        if not self.runs:
            if not self.pending:
                return []
            table = pa.concat_tables(self.pending).combine_chunks()
            run = SortedRun(table.num_rows, table.nbytes, [], RUN_BATCH_ROWS, table=table)
            self.pending, self.pending_bytes = [], 0
            return [Shard(((run, 0, run.rows),))]
        if self.pending:
            self.runs.append(self._sorted_run(None))
            self.pending, self.pending_bytes = [], 0
        cuts = [None, *choose_splitters(self.runs, self.shard_bytes), None]
        shards = []
        for low, high in zip(cuts[:-1], cuts[1:], strict=False):
            pieces = tuple((run, run.lower_bound(low) if low is not None else 0,
                            run.lower_bound(high)) for run in self.runs)
            shard = Shard(tuple(p for p in pieces if p[2] > p[1]))
            if shard.rows:
                shards.append(shard)
        return shards


def choose_splitters(runs: list[SortedRun], shard_bytes: int) -> list[np.ndarray]:
    """Prompts at which a new shard begins: about every `shard_bytes` of the sorted job, at
    the nearby head sharing least with its predecessor (the prefix a boundary computes twice).

    The heads of all runs are a sample of the job's sorted order, one per batch of a run,
    each standing for that batch's bytes."""
    heads = [h for run in runs for h in run.heads]
    weights = np.array([run.nbytes * min(run.batch_rows, run.rows - i * run.batch_rows)
                        // max(run.rows, 1) for run in runs for i in range(len(run.heads))],
                       dtype=np.int64)
    total = int(weights.sum())
    shards = max(1, round(total / max(shard_bytes, 1)))
    if shards == 1 or len(heads) < 2:
        return []
    offsets = offsets_of(np.array([len(h) for h in heads], dtype=np.int64))
    values = np.concatenate(heads) if len(heads) else np.zeros(0, np.int32)
    tree = PrefixTree.build(values, offsets)
    before = np.cumsum(weights[tree.order]) - weights[tree.order]  # bytes sorted before it
    window = max(1, len(heads) // (4 * shards))
    picked: list[int] = []
    for k in range(1, shards):
        at = int(np.searchsorted(before, k * total / shards))
        lo, hi = max(at - window, 1), min(at + window + 1, len(heads))
        if lo >= hi:
            continue
        best = lo + int(np.argmin(tree.lcp[lo:hi]))
        if not picked or best > picked[-1]:
            picked.append(best)
    # The shortest prompt that sorts after the previous head and not after this one: every
    # row sharing more than the two heads share stays on one side of the cut.
    out: list[np.ndarray] = []
    for pos in picked:
        cut = heads[int(tree.order[pos])][:int(tree.lcp[pos]) + 1]
        if not out or compare(out[-1], cut) < 0:
            out.append(cut)
    return out
