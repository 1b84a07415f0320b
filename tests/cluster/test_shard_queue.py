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
    # 20 rows share one 64-token prefix, 28 rows another; shuffled in the shard.
    prompts = family([1] * 64, 20) + family([2] * 64, 28, first_row=20)
    random.Random(0).shuffle(prompts)
    shard = TableShard(request_table(prompts))
    queue = ShardQueue([shard], replicas=2, orders=PrefixOrders(BLOCK))

    first = queue.take()
    second = queue.take(in_flight_rows=first.rows)
    assert queue.take() is None
    # A share is 24 rows; the cut goes to the family boundary (20 | 28), not into a family
    # (which would recompute its 64-token prefix); the 28 then go whole (less than a share +
    # MIN_PIECE_ROWS).
    assert [first.rows, second.rows] == [20, 28]
    tables = [w.table(queue.orders) for w in (first, second)]
    assert {len({p[0] for p in prompts_of(t)}) for t in tables} == {1}
    assert sum(block_ideal(prompts_of(t)) for t in tables) == block_ideal(prompts)


def test_largest_shard_first_and_pieces_about_a_fair_share():
    sizes = [6, 90, 12, 20]
    shards = [TableShard(request_table(family([k] * 32, n, first_row=100 * k), first_row=100 * k))
              for k, n in enumerate(sizes, start=1)]
    queue = ShardQueue(shards, replicas=4, orders=PrefixOrders(BLOCK))
    work = queue.take()
    assert work.shard is shards[1]  # the 90-row shard
    # 128 rows / 4 replicas: 32 a share. Inside one family every cut costs the same blocks,
    # so the piece is the share itself.
    assert work.rows == 32 and queue.pieces_cut == 1
    in_flight, handed = work.rows, [work.rows]
    while (work := queue.take(in_flight)) is not None:
        share = -(-(queue.queued_rows + work.rows + in_flight) // 4)
        assert work.rows <= share * 3 // 2 or work.rows < share + 8
        in_flight += work.rows
        handed.append(work.rows)
    assert sum(handed) == sum(sizes)
    # The big shard in three pieces (32 + 32 + 26: the last less than a share + 8 over a
    # share), then the others whole, largest first.
    assert handed == [32, 32, 26, 20, 12, 6]


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
