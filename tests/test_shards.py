"""Prefix shards: every request in exactly one shard, shards are ranges of the token order,
and the whole job's prefix figures are the shards' figures plus the boundary corrections."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from batchrun.ingest.shards import ShardBuilder
from batchrun.ingest.token_lists import token_lists
from batchrun.io.schema import REQUEST_SCHEMA
from batchrun.plan.prefix_tree import PrefixTree
from batchrun.plan.prefixes import boundary_reuse, compare

BLOCK = 4


def tokenized_table(prompts: list[list[int]], first_row: int = 0) -> pa.Table:
    """A tokenized request table, as the shard stage receives it."""
    n = len(prompts)
    columns = {f.name: pa.nulls(n, f.type) for f in REQUEST_SCHEMA}
    columns["row"] = pa.array(range(first_row, first_row + n), pa.int64())
    columns["id"] = pa.array([str(r) for r in range(first_row, first_row + n)], pa.string())
    columns["prompt_token_ids"] = pa.array(prompts, pa.list_(pa.int32()))
    return pa.table(columns, schema=REQUEST_SCHEMA)


def random_job(seed: int, n: int) -> list[list[int]]:
    """System prompts, then documents, then questions: a tree with skewed fan-out."""
    rng = np.random.default_rng(seed)
    systems = [rng.integers(0, 50, rng.integers(1, 30)).tolist() for _ in range(5)]
    docs = [rng.integers(0, 50, rng.integers(0, 20)).tolist() for _ in range(12)]
    return [systems[min(int(rng.zipf(1.5)) - 1, 4)] + docs[rng.integers(12)]
            + rng.integers(0, 50, rng.integers(0, 8)).tolist() or [1] for _ in range(n)]


def shard_job(prompts: list[list[int]], tmp_path, *, batch: int, run_bytes: int,
              shard_bytes: int) -> tuple[ShardBuilder, list]:
    builder = ShardBuilder(tmp_path / "spill", run_bytes=run_bytes, shard_bytes=shard_bytes)
    for start in range(0, len(prompts), batch):
        builder.add(tokenized_table(prompts[start:start + batch], first_row=start))
    return builder, builder.finish()


def test_a_job_under_the_budget_is_one_shard_and_nothing_is_written(tmp_path):
    prompts = random_job(0, 300)
    builder, shards = shard_job(prompts, tmp_path, batch=64, run_bytes=10**9,
                                shard_bytes=10**9)
    assert len(shards) == 1 and shards[0].rows == 300
    assert builder.spilled_bytes == 0 and not (tmp_path / "spill").exists()
    assert sorted(shards[0].load()["row"].to_pylist()) == list(range(300))


@pytest.mark.parametrize("seed", range(6))
def test_spilled_shards_hold_every_row_once_in_token_order(tmp_path, seed):
    prompts = random_job(seed, 2500)
    builder, shards = shard_job(prompts, tmp_path, batch=300, run_bytes=20_000,
                                shard_bytes=30_000)
    assert builder.spilled_bytes > 0 and len(shards) > 2
    tables = [s.load() for s in shards]
    rows = np.concatenate([t["row"].to_numpy() for t in tables])
    assert sorted(rows.tolist()) == list(range(len(prompts)))
    # Each shard is a range of the token order: all of one sorts before all of the next.
    for a, b in zip(tables, tables[1:], strict=False):
        assert compare(max_prompt(a), min_prompt(b)) <= 0
    # Identical prompts never straddle a boundary.
    owner: dict[tuple, int] = {}
    for k, t in enumerate(tables):
        for p in t["prompt_token_ids"].to_pylist():
            assert owner.setdefault(tuple(p), k) == k


@pytest.mark.parametrize("seed", range(6))
def test_sharded_figures_equal_the_whole_job_tree(tmp_path, seed):
    """distinct_prompt_tokens and the block ideal, summed over shards and corrected at each
    boundary, equal the in-memory tree of the whole job: exactly."""
    prompts = random_job(100 + seed, 2000)
    _, shards = shard_job(prompts, tmp_path, batch=250, run_bytes=15_000, shard_bytes=25_000)
    whole = PrefixTree.build(*token_lists(tokenized_table(prompts)["prompt_token_ids"]))
    distinct = ideal = 0
    last = None
    for shard in shards:
        values, offsets = token_lists(shard.load()["prompt_token_ids"])
        tree = PrefixTree.build(values, offsets)
        first_i, last_i = tree.order[0], tree.order[-1]
        d, b = boundary_reuse(last, values[offsets[first_i]:offsets[first_i + 1]], BLOCK)
        distinct += tree.distinct_tokens - d
        ideal += tree.block_ideal_computed_tokens(BLOCK) - b
        last = values[offsets[last_i]:offsets[last_i + 1]]
    assert len(shards) > 2
    assert distinct == whole.distinct_tokens
    assert ideal == whole.block_ideal_computed_tokens(BLOCK)


def test_boundaries_fall_where_neighbours_share_least(tmp_path):
    """Two big families of prompts under two system prompts: the cut goes between the
    families, not inside one, so no long prefix is computed twice."""
    rng = np.random.default_rng(7)
    a, b = [1] * 40, [2] * 40
    prompts = [(a if i % 2 else b) + rng.integers(3, 9, 5).tolist() for i in range(20_000)]
    _, shards = shard_job(prompts, tmp_path, batch=2000, run_bytes=200_000,
                          shard_bytes=2_800_000)  # the job is ~5.4 MB: two shards
    assert len(shards) == 2
    for shard, family in zip(shards, (a, b), strict=True):  # [1] * 40 sorts before [2] * 40
        heads = {tuple(p[:40]) for p in shard.load()["prompt_token_ids"].to_pylist()}
        assert heads == {tuple(family)}


def max_prompt(table: pa.Table) -> np.ndarray:
    return _extreme(table, -1)


def min_prompt(table: pa.Table) -> np.ndarray:
    return _extreme(table, 0)


def _extreme(table: pa.Table, at: int) -> np.ndarray:
    values, offsets = token_lists(table["prompt_token_ids"])
    i = PrefixTree.build(values, offsets).order[at]
    return values[offsets[i]:offsets[i + 1]]
