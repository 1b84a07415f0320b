"""The LSE merge: against its reference, and as the identity that makes prefix/suffix exact."""

from __future__ import annotations

from itertools import pairwise

import torch
from batchrun_kernels import merge_attention_partials
from batchrun_kernels.reference import attention_with_lse, ref_merge_attention_partials
from hypothesis import given, settings
from hypothesis import strategies as st


def test_merge_matches_reference_including_empty_parts(device, assert_attention_close):
    torch.manual_seed(0)
    num_parts, num_tokens, num_heads, head_size = 5, 7, 6, 80
    out_parts = torch.randn(num_parts, num_tokens, num_heads, head_size, device=device)
    lse_parts = 3 * torch.randn(num_parts, num_tokens, num_heads, device=device)
    # Parts that saw no key (empty suffix, empty split) have output 0 and LSE -inf.
    empty = torch.rand(num_parts, num_tokens, num_heads, device=device) < 0.3
    empty[:, 0, 0] = True  # one row where no part saw a key at all
    lse_parts[empty] = float("-inf")
    out_parts[empty] = 0.0

    merged = merge_attention_partials(out_parts, lse_parts, out_dtype=torch.float16)

    assert merged.dtype == torch.float16
    assert_attention_close(merged, ref_merge_attention_partials(out_parts, lse_parts))
    assert torch.all(merged[0, 0] == 0)


@settings(max_examples=20, deadline=None)
@given(
    num_keys=st.integers(1, 40),
    num_parts=st.integers(1, 4),
    num_queries_per_kv=st.sampled_from([1, 3]),
    seed=st.integers(0, 2**16),
)
def test_merging_disjoint_key_sets_equals_attention_over_all_keys(
        num_keys, num_parts, num_queries_per_kv, seed, device, assert_attention_close):
    # Cut the keys into random (possibly empty) contiguous parts, attend over each part, merge.
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(3, 2 * num_queries_per_kv, 32, generator=gen).to(device)
    k = torch.randn(num_keys, 2, 32, generator=gen).to(device)
    v = torch.randn(num_keys, 2, 32, generator=gen).to(device)
    q_pos = torch.full((3,), num_keys, device=device)  # every query sees every key
    cuts = torch.sort(torch.randint(0, num_keys + 1, (num_parts - 1,), generator=gen)).values
    bounds = [0, *cuts.tolist(), num_keys]
    parts = [attention_with_lse(q, k[a:b], v[a:b], q_pos, torch.arange(a, b, device=device),
                                scale=0.2)
             for a, b in pairwise(bounds)]

    merged = merge_attention_partials(torch.stack([o for o, _ in parts]),
                                      torch.stack([lse for _, lse in parts]))

    full, _ = attention_with_lse(q, k, v, q_pos, torch.arange(num_keys, device=device), 0.2)
    assert_attention_close(merged, full)
