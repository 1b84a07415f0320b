"""The per-step metadata: how groups become tiles, and which groups are refused."""

from __future__ import annotations

import pytest
from batchrun_kernels import PrefixGroup, build_shared_prefix_metadata
from hypothesis import given, settings
from hypothesis import strategies as st


def test_groups_become_stacked_tiles_and_ungrouped_sequences_share_a_zero_prefix_group():
    # Four sequences: 0 and 2 share 32 prefix tokens; 1 (3-token prefill chunk) and 3 share
    # nothing. Two query heads per KV head, so each query token is two stacked rows.
    metadata = build_shared_prefix_metadata(
        [PrefixGroup(seq_ids=[0, 2], prefix_len=32)],
        query_start_loc=[0, 1, 4, 5, 6], seq_lens=[40, 20, 33, 7],
        block_size=16, num_queries_per_kv=2, head_size=64, group_block_m=4, seq_block_m=16)

    assert metadata.group_prefix_len.tolist() == [32, 0]
    assert metadata.group_seqs.tolist() == [0, 2, 1, 3]
    assert metadata.group_prefix_seq.tolist() == [0, 1]  # whose block table holds the prefix
    assert metadata.group_tokens.tolist() == [0, 4, 1, 2, 3, 5]
    assert metadata.seq_prefix_len.tolist() == [32, 0, 32, 0]
    assert metadata.token_pos.tolist() == [39, 17, 18, 19, 32, 6]
    # (group, first row, member range): 4 rows of group 0, then 8 rows of the second group
    # in two tiles; the first holds sequence 1's first two tokens, the second its last
    # token and sequence 3's.
    assert metadata.group_tiles.tolist() == [[0, 0, 0, 2], [1, 0, 2, 3], [1, 4, 2, 4]]
    assert metadata.seq_tiles.tolist() == [[0, 0], [1, 0], [2, 0], [3, 0]]
    assert (metadata.max_prefix_len, metadata.max_suffix_len) == (32, 20)


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        ([PrefixGroup([0], 24)], "multiple of block_size"),
        ([PrefixGroup([0], 32), PrefixGroup([0, 1], 16)], "more than one prefix group"),
        ([PrefixGroup([1], 48)], "every query token must see the whole prefix"),
        ([PrefixGroup([2], 16)], "out of range"),
        ([PrefixGroup([], 16)], "no sequences"),
    ],
)
def test_invalid_groups_are_refused(groups, message):
    # Sequence 1 prefills tokens 40..47, so a 48-token prefix would hide keys from them.
    with pytest.raises(ValueError, match=message):
        build_shared_prefix_metadata(groups, query_start_loc=[0, 1, 9], seq_lens=[40, 48],
                                     block_size=16, num_queries_per_kv=1, head_size=64)


@settings(max_examples=40, deadline=None)
@given(
    query_lens=st.lists(st.integers(0, 9), min_size=1, max_size=12),
    num_queries_per_kv=st.integers(1, 8),
    block_m=st.sampled_from([16, 32, 64]),
    data=st.data(),
)
def test_tiles_cover_every_row_exactly_once(query_lens, num_queries_per_kv, block_m, data):
    num_seqs = len(query_lens)
    grouped = data.draw(st.lists(st.sampled_from(range(num_seqs)), unique=True))
    groups = [PrefixGroup(grouped[i::2], 16) for i in range(2) if grouped[i::2]]
    query_start_loc = [0]
    for n in query_lens:
        query_start_loc.append(query_start_loc[-1] + n)
    metadata = build_shared_prefix_metadata(
        groups, query_start_loc, seq_lens=[n + 16 for n in query_lens], block_size=16,
        num_queries_per_kv=num_queries_per_kv, head_size=64, group_block_m=block_m,
        seq_block_m=block_m)

    starts = metadata.group_token_start.tolist()
    seen = []
    for group, first_row, lo, hi in metadata.group_tiles.tolist():
        num_rows = (starts[group + 1] - starts[group]) * num_queries_per_kv
        for row in range(first_row, min(first_row + block_m, num_rows)):
            token = metadata.group_tokens[starts[group] + row // num_queries_per_kv].item()
            seq = metadata.token_seq[token].item()
            assert seq in metadata.group_seqs[lo:hi].tolist()
            seen.append((token, row % num_queries_per_kv))
    assert sorted(seen) == [(t, h) for t in range(query_start_loc[-1])
                            for h in range(num_queries_per_kv)]
