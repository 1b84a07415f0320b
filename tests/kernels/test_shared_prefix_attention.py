"""End to end: shared-prefix attention (fused and split) and the per-sequence baseline must
equal plain per-sequence causal attention over the same paged KV cache."""

from __future__ import annotations

import pytest
import torch
from batchrun_kernels import (
    build_shared_prefix_metadata,
    paged_attention,
    shared_prefix_attention,
)
from batchrun_kernels.reference import ref_paged_attention, ref_shared_prefix_attention
from batchrun_kernels.synthetic import GroupSpec, PagedBatch, SeqSpec, make_paged_batch
from hypothesis import given, settings
from hypothesis import strategies as st

MODES = ["fused", "split"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def per_sequence_reference(batch: PagedBatch) -> torch.Tensor:
    return ref_paged_attention(batch.q, batch.k_cache, batch.v_cache, batch.block_table,
                               batch.query_start_loc, batch.seq_lens, batch.scale)


def mixed_batch(**kwargs) -> PagedBatch:
    """Two prefix groups (one with a chunked-prefill member and an empty suffix) and two
    sequences without a shared prefix."""
    groups = [
        GroupSpec(64, [SeqSpec(5), SeqSpec(20, query_len=6), SeqSpec(0), SeqSpec(33)]),
        GroupSpec(32, [SeqSpec(12), SeqSpec(3, query_len=2)]),
        GroupSpec(0, [SeqSpec(25, query_len=5), SeqSpec(9)]),
    ]
    return make_paged_batch(groups, **{"num_kv_heads": 2, "num_queries_per_kv": 2,
                                       "head_size": 64, "block_size": 16, **kwargs})


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
def test_shared_prefix_attention_matches_per_sequence_attention(mode, dtype, device,
                                                                 assert_attention_close):
    batch = mixed_batch(dtype=dtype, device=device)
    metadata = batch.metadata()  # once per step, reused by every layer

    out = shared_prefix_attention(*batch.tensors, metadata, batch.scale, mode=mode)

    assert out.dtype == dtype and out.shape == batch.q.shape
    assert_attention_close(out, per_sequence_reference(batch))
    # The torch version of the same decomposition agrees too.
    assert_attention_close(out, ref_shared_prefix_attention(*batch.reference_args))


@pytest.mark.parametrize("head_size", [32, 80, 96, 128, 192, 256])
def test_head_sizes(head_size, device, assert_attention_close):
    batch = mixed_batch(head_size=head_size, num_kv_heads=1, dtype=torch.float16, device=device)
    expected = per_sequence_reference(batch)
    for mode in MODES:
        out = shared_prefix_attention(*batch.tensors, batch.metadata(), batch.scale, mode=mode)
        assert_attention_close(out, expected)


@pytest.mark.parametrize("num_queries_per_kv", range(1, 9))
def test_gqa_ratios(num_queries_per_kv, device, assert_attention_close):
    batch = mixed_batch(num_queries_per_kv=num_queries_per_kv, head_size=32,
                        dtype=torch.bfloat16, device=device)
    expected = per_sequence_reference(batch)
    for mode in MODES:
        out = shared_prefix_attention(*batch.tensors, batch.metadata(), batch.scale, mode=mode)
        assert_attention_close(out, expected)


@pytest.mark.parametrize("block_size", [16, 32, 64, 128])
def test_block_sizes(block_size, device, assert_attention_close):
    # Prefixes are whole blocks; suffixes end mid-block.
    groups = [GroupSpec(2 * block_size, [SeqSpec(block_size + 3), SeqSpec(5, query_len=4)]),
              GroupSpec(block_size, [SeqSpec(1), SeqSpec(0)])]
    batch = make_paged_batch(groups, num_kv_heads=1, num_queries_per_kv=4, head_size=32,
                             block_size=block_size, device=device)
    expected = per_sequence_reference(batch)
    for mode in MODES:
        out = shared_prefix_attention(*batch.tensors, batch.metadata(), batch.scale, mode=mode)
        assert_attention_close(out, expected)


def test_32k_token_prefix(device, assert_attention_close):
    batch = make_paged_batch([GroupSpec(32768, [SeqSpec(3), SeqSpec(40, query_len=2)])],
                             num_kv_heads=1, num_queries_per_kv=2, head_size=32,
                             block_size=128, device=device)
    expected = per_sequence_reference(batch)
    fused = shared_prefix_attention(*batch.tensors, batch.metadata(), batch.scale, mode="fused")
    split = shared_prefix_attention(*batch.tensors, batch.metadata(), batch.scale, mode="split",
                                    num_prefix_splits=4)
    assert_attention_close(fused, expected)
    assert_attention_close(split, expected)


def test_vllm_views_non_contiguous_q_out_and_caches(device, assert_attention_close):
    # vLLM hands over q as a slice of the fused QKV projection, writes into a slice of a larger
    # output, and (Triton backend) keeps K and V interleaved: kv_cache[num_blocks, 2, ...].
    batch = mixed_batch(device=device)
    num_tokens, num_q_heads, head_size = batch.q.shape
    qkv = torch.randn(num_tokens, num_q_heads + 4, head_size, device=device)
    qkv[:, :num_q_heads] = batch.q
    q = qkv[:, :num_q_heads]
    key_cache, value_cache = torch.stack([batch.k_cache, batch.v_cache], dim=1).unbind(1)
    expected = per_sequence_reference(batch)
    for mode in MODES:
        out_buffer = torch.zeros(num_tokens, num_q_heads + 1, head_size, device=device)
        shared_prefix_attention(q, key_cache, value_cache, batch.block_table, batch.metadata(),
                                batch.scale, mode=mode, out=out_buffer[:, 1:])
        assert_attention_close(out_buffer[:, 1:], expected)
        assert torch.all(out_buffer[:, 0] == 0)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_per_sequence_paged_attention_baseline(num_splits, device, assert_attention_close):
    # Decode-only batch: the per-sequence tiles are 16 rows (num_queries_per_kv = 4 used).
    batch = make_paged_batch([GroupSpec(96, [SeqSpec(n) for n in (1, 7, 30, 64)])],
                             num_kv_heads=2, num_queries_per_kv=4, head_size=64,
                             block_size=32, dtype=torch.float16, device=device)
    metadata = batch.metadata()
    assert metadata.seq_block_m == 16

    out = paged_attention(*batch.tensors, metadata, batch.scale, num_splits=num_splits)

    assert_attention_close(out, per_sequence_reference(batch))


def test_sequences_without_any_group(device, assert_attention_close):
    # No groups at all: everything is one prefix-0 group, attention is per sequence.
    batch = make_paged_batch([GroupSpec(0, [SeqSpec(17), SeqSpec(40, query_len=9)])],
                             num_kv_heads=2, num_queries_per_kv=3, head_size=32, block_size=16,
                             device=device)
    metadata = build_shared_prefix_metadata(
        [], batch.query_start_loc, batch.seq_lens, block_size=16, num_queries_per_kv=3,
        head_size=32, device=device)
    for mode in ["auto", *MODES]:
        out = shared_prefix_attention(*batch.tensors, metadata, batch.scale, mode=mode)
        assert_attention_close(out, per_sequence_reference(batch))


@st.composite
def group_layouts(draw) -> tuple[int, list[GroupSpec]]:
    """Up to three groups of up to four sequences; prefixes of 0..3 blocks; decode rows
    (most of them) and short chunked-prefill rows; suffixes from empty to 40 tokens."""
    block_size = draw(st.sampled_from([16, 32]))
    groups = []
    for _ in range(draw(st.integers(1, 3))):
        prefix_len = block_size * draw(st.integers(0, 3))
        seqs = []
        for _ in range(draw(st.integers(1, 4))):
            suffix_len = draw(st.integers(0 if prefix_len else 1, 40))
            # The first query token must see the whole prefix: at most one query token may
            # sit in front of the suffix (the last prefix token).
            max_query_len = min(12, suffix_len + (1 if prefix_len else 0))
            query_len = draw(st.one_of(st.just(1), st.integers(1, max_query_len)))
            seqs.append(SeqSpec(suffix_len, query_len))
        groups.append(GroupSpec(prefix_len, seqs))
    return block_size, groups


@settings(max_examples=15, deadline=None)
@given(
    layout=group_layouts(),
    num_kv_heads=st.integers(1, 2),
    num_queries_per_kv=st.sampled_from([1, 3, 4, 8]),
    head_size=st.sampled_from([32, 64, 96]),
    dtype=st.sampled_from(DTYPES),
    num_splits=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_random_layouts_and_shuffled_block_tables(layout, num_kv_heads, num_queries_per_kv,
                                                  head_size, dtype, num_splits, seed, device,
                                                  assert_attention_close):
    block_size, groups = layout
    batch = make_paged_batch(groups, num_kv_heads=num_kv_heads,
                             num_queries_per_kv=num_queries_per_kv, head_size=head_size,
                             block_size=block_size, dtype=dtype, device=device, seed=seed)
    metadata = batch.metadata()
    expected = per_sequence_reference(batch)

    for mode in MODES:
        out = shared_prefix_attention(*batch.tensors, metadata, batch.scale, mode=mode,
                                      num_prefix_splits=num_splits, num_suffix_splits=num_splits)
        assert_attention_close(out, expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled kernels need a GPU")
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_realistic_shapes(dtype, assert_attention_close):
    # 48 decode rows and 8 prefill chunks over two 2k-token prefixes, Llama-70B-like heads.
    groups = [GroupSpec(2048, [SeqSpec(n) for n in range(1, 300, 12)]),
              GroupSpec(1024, [SeqSpec(200, query_len=64)] * 8 + [SeqSpec(50)] * 24)]
    batch = make_paged_batch(groups, num_kv_heads=8, num_queries_per_kv=8, head_size=128,
                             block_size=16, dtype=dtype, device="cuda")
    expected = per_sequence_reference(batch)
    for mode in MODES:
        out = shared_prefix_attention(*batch.tensors, batch.metadata(), batch.scale, mode=mode)
        assert_attention_close(out, expected)
    assert_attention_close(paged_attention(*batch.tensors, batch.metadata(), batch.scale),
                           expected)
