"""The shard queue replicas pull from: largest first, share-sized pieces cut where they cost
the fewest recomputed KV blocks, every row handed out exactly once, also after a replica died."""

from __future__ import annotations

import random

import numpy as np

from batchrun.cluster.queue import PrefixOrders, ShardQueue
from batchrun.plan.prefix_tree import PrefixTree
from tests.cluster.shard_tables import TableShard, family, request_table

BLOCK = 16


def block_ideal(prompts: list[list[int]]) -> int:
    offsets = np.concatenate(([0], np.cumsum([len(p) for p in prompts])))
    values = np.array([t for p in prompts for t in p], dtype=np.int32)
    return PrefixTree.build(values, offsets).block_ideal_computed_tokens(BLOCK)


def prompts_of(table) -> list[list[int]]:
    return [p for p in table["prompt_token_ids"].to_pylist() if p is not None]


def hand_out_all(queue: ShardQueue, in_flight: int = 0) -> list:
    pieces = []
    while (work := queue.take(in_flight)) is not None:
        pieces.append(work)
    return pieces


def test_a_shard_splits_between_prefix_families_where_the_cut_costs_nothing():
    # Three families of 10, 14 and 12 rows, each sharing its own 64-token prefix; shuffled.
    prompts = (family([1] * 64, 10) + family([2] * 64, 14, first_row=10)
               + family([3] * 64, 12, first_row=24))
    random.Random(0).shuffle(prompts)
    queue = ShardQueue([TableShard(request_table(prompts))], replicas=2,
                       orders=PrefixOrders(BLOCK))

    pieces, in_flight = [], 0
    while (work := queue.take(in_flight)) is not None:
        pieces.append(work)
        in_flight += work.rows
    # Each piece may hold 8 to 16 rows (half a fair share, at least twice MIN_PIECE_ROWS):
    # every cut goes to a family boundary, none into a family (which would compute its
    # 64-token prefix twice); the last family (12 rows) goes whole.
    assert [w.rows for w in pieces] == [10, 14, 12]
    tables = [w.table(queue.orders) for w in pieces]
    assert [{p[0] for p in prompts_of(t)} for t in tables] == [{1}, {2}, {3}]
    assert sum(block_ideal(prompts_of(t)) for t in tables) == block_ideal(prompts)


def test_largest_shard_first_and_no_piece_above_half_a_fair_share():
    sizes = [6, 90, 12, 20]
    shards = [TableShard(request_table(family([k] * 32, n, first_row=100 * k), first_row=100 * k))
              for k, n in enumerate(sizes, start=1)]
    queue = ShardQueue(shards, replicas=4, orders=PrefixOrders(BLOCK))
    in_flight, handed = 0, []
    while True:
        half_share = -(-(queue.queued_rows + in_flight) // 8)
        if (work := queue.take(in_flight)) is None:
            break
        # A piece cut from a shard is at most half a fair share (or twice MIN_PIECE_ROWS);
        # a shard less than MIN_PIECE_ROWS over that goes whole.
        assert work.rows <= max(half_share, 16) or work.rows == work.shard.rows < half_share + 8
        in_flight += work.rows
        handed.append((sizes[shards.index(work.shard)], work.rows))
    # The largest shard first, in pieces of 128 rows / 4 replicas / 2; the others whole,
    # largest first, the 90-row shard's last 10 rows among them by size.
    assert handed == [(90, 16)] * 5 + [(20, 20), (12, 12), (90, 10), (6, 6)]


def test_every_row_is_handed_out_exactly_once():
    rng = random.Random(7)
    shards, row = [], 0
    for _ in range(12):
        prompts = []
        for _ in range(rng.randint(1, 4)):  # a few families per shard, as a hash puts them
            head = [rng.randrange(50)] * rng.randint(1, 80)
            prompts += family(head, rng.randint(1, 60), own=rng.randint(1, 9), first_row=row)
        errors = {row + i: "bad row" for i in range(len(prompts)) if rng.random() < 0.05}
        shards.append(TableShard(request_table(prompts, row, errors)))
        row += len(prompts)
    queue = ShardQueue(shards, replicas=5, orders=PrefixOrders(BLOCK))
    handed = []
    while (work := queue.take(rng.randint(0, 200))) is not None:
        table = work.table(queue.orders)
        assert table.num_rows == work.rows
        handed += table["row"].to_pylist()
    assert sorted(handed) == list(range(row))
    assert queue.pieces_cut > 0


def test_a_lost_replica_s_piece_comes_back_without_the_rows_it_returned():
    prompts = family([3] * 40, 50)
    queue = ShardQueue([TableShard(request_table(prompts))], replicas=2,
                       orders=PrefixOrders(BLOCK))
    work = queue.take()
    table = work.table(queue.orders)
    returned = table["row"].to_pylist()[:7]  # the replica sent these, then died
    queue.put_back(work.without(returned))
    again = []
    while (piece := queue.take()) is not None:
        again += piece.table(queue.orders)["row"].to_pylist()
    assert not set(again) & set(returned)
    assert sorted(again + returned) == list(range(50))
