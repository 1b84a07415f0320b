"""The two passes on their own: prefix attention over each group's shared blocks, suffix
attention over each sequence's own blocks, each giving partial outputs and LSEs."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from batchrun_kernels import merge_attention_partials, prefix_attention, suffix_attention
from batchrun_kernels.reference import (
    ref_paged_attention,
    ref_prefix_attention,
    ref_suffix_attention,
)
from batchrun_kernels.synthetic import GroupSpec, SeqSpec, make_paged_batch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Two groups sharing 64 and 32 tokens, plus two sequences that share nothing. Decode rows,
# chunked-prefill rows, and a decode row whose token is the prefix's last (empty suffix).
MIXED_GROUPS = [
    GroupSpec(64, [SeqSpec(5), SeqSpec(20, query_len=7), SeqSpec(0)]),
    GroupSpec(32, [SeqSpec(17), SeqSpec(3, query_len=3)]),
    GroupSpec(0, [SeqSpec(30, query_len=4), SeqSpec(9)]),
]


def assert_partials_close(actual, expected, assert_close):
    """Partials are fp32 whatever the input dtype; ``assert_close`` has the input's tolerance."""
    (out, lse), (ref_out, ref_lse) = actual, expected
    assert out.dtype == lse.dtype == torch.float32
    assert torch.equal(lse.isinf(), ref_lse.isinf())  # the same rows saw no key
    assert_close(out, ref_out)
    assert_close(lse.nan_to_num(neginf=0.0), ref_lse.nan_to_num(neginf=0.0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefix_attention_matches_reference(dtype, device, assert_attention_close):
    batch = make_paged_batch(MIXED_GROUPS, num_kv_heads=2, num_queries_per_kv=3, head_size=64,
                             block_size=16, dtype=dtype, device=device)

    out, lse = prefix_attention(*batch.tensors, batch.metadata(), batch.scale)

    assert out.shape == (1, *batch.q.shape) and lse.shape == (1, *batch.q.shape[:2])
    # Tokens of ungrouped sequences have no prefix: output 0, LSE -inf.
    assert_partials_close((out[0], lse[0]), ref_prefix_attention(*batch.reference_args),
                          partial(assert_attention_close, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_suffix_attention_matches_reference(dtype, device, assert_attention_close):
    batch = make_paged_batch(MIXED_GROUPS, num_kv_heads=2, num_queries_per_kv=3, head_size=64,
                             block_size=16, dtype=dtype, device=device)

    out, lse = suffix_attention(*batch.tensors, batch.metadata(), batch.scale)

    # The decode row of SeqSpec(0) has an empty suffix: output 0, LSE -inf.
    assert lse[0].isinf().any()
    assert_partials_close((out[0], lse[0]), ref_suffix_attention(*batch.reference_args),
                          partial(assert_attention_close, dtype=dtype))


def test_split_passes_merge_into_full_attention(device, assert_attention_close):
    # Long-ish prefixes cut into 3 chunks, suffixes into 2: five partials per query row.
    batch = make_paged_batch(
        [GroupSpec(160, [SeqSpec(40), SeqSpec(70, query_len=5)]), GroupSpec(96, [SeqSpec(1)])],
        num_kv_heads=1, num_queries_per_kv=4, head_size=32, block_size=32, device=device)
    metadata = batch.metadata()

    prefix_out, prefix_lse = prefix_attention(*batch.tensors, metadata, batch.scale,
                                              num_splits=3)
    suffix_out, suffix_lse = suffix_attention(*batch.tensors, metadata, batch.scale,
                                              num_splits=2)
    out = merge_attention_partials(torch.cat([prefix_out, suffix_out]),
                                   torch.cat([prefix_lse, suffix_lse]))

    assert_attention_close(out, ref_paged_attention(
        batch.q, batch.k_cache, batch.v_cache, batch.block_table, batch.query_start_loc,
        batch.seq_lens, batch.scale))
