"""The global prefix tree, checked against a brute-force trie on random jobs."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from batchrun.plan import PrefixTree
from tests.plan.random_jobs import common, flat, jobs


@settings(max_examples=100, deadline=None)
@given(jobs())
def test_order_and_lcps_match_sorting_the_prompts(prompts):
    tree = PrefixTree.build(*flat(prompts))
    expected = sorted(range(len(prompts)), key=lambda i: (prompts[i], i))
    assert tree.order.tolist() == expected
    neighbours = zip(expected, expected[1:], strict=False)
    assert tree.lcp.tolist() == ([0] + [common(prompts[a], prompts[b]) for a, b in neighbours])[
        : len(prompts)]


@settings(max_examples=100, deadline=None)
@given(jobs())
def test_distinct_tokens_counts_every_distinct_prefix(prompts):
    tree = PrefixTree.build(*flat(prompts))
    prefixes = {tuple(p[:k]) for p in prompts for k in range(1, len(p) + 1)}
    assert tree.distinct_tokens == len(prefixes)
    assert tree.prompt_tokens == sum(map(len, prompts))


@settings(max_examples=100, deadline=None)
@given(jobs(min_requests=1))
def test_nodes_are_the_branching_prefixes(prompts):
    tree = PrefixTree.build(*flat(prompts))
    path = [tuple(prompts[tree.order[tree.node_start[u]]][: tree.node_depth[u]])
            for u in range(tree.num_nodes)]
    # A node for every non-empty prefix that two requests share and then leave (or end on).
    branching = {tuple(a[: common(a, b)]) for i, a in enumerate(prompts) for b in prompts[i + 1:]}
    assert set(path[1:]) == branching - {()}
    assert len(path) == len(set(path))
    for u in range(1, tree.num_nodes):
        under = tree.order[tree.node_start[u]: tree.node_end[u]]
        assert sorted(under) == [i for i, p in enumerate(prompts) if tuple(p[: len(path[u])])
                                 == path[u]]
        # The parent is the longest node that is a prefix of this one.
        inside = [v for v in range(tree.num_nodes) if path[u][: len(path[v])] == path[v] and v != u]
        assert tree.node_parent[u] == max(inside, key=lambda v: len(path[v]))
    for k, i in enumerate(tree.order):
        holding = [v for v in range(tree.num_nodes) if tuple(prompts[i][: len(path[v])]) == path[v]]
        assert tree.request_node[k] == max(holding, key=lambda v: len(path[v]))


def test_an_empty_job_has_just_the_root():
    tree = PrefixTree.build(np.zeros(0, dtype=np.int32), np.zeros(1, dtype=np.int64))
    assert tree.num_requests == 0 and tree.num_nodes == 1 and tree.distinct_tokens == 0


def test_a_job_of_only_empty_prompts_keeps_them_in_order_under_the_root():
    tree = PrefixTree.build(*flat([[], [], []]))
    assert tree.order.tolist() == [0, 1, 2] and tree.distinct_tokens == 0


def test_any_int32_token_ids_sort_as_signed_integers():
    low, high = np.iinfo(np.int32).min, np.iinfo(np.int32).max
    prompts = [[high, 1], [low], [0, low], [high], [low, high]]
    tree = PrefixTree.build(*flat(prompts))
    assert tree.order.tolist() == [1, 4, 2, 3, 0]


def test_block_ideal_rounds_each_reuse_down_to_whole_blocks():
    system = list(range(100, 110))  # 10 shared tokens
    prompts = [system + [1, 2, 3], system + [4, 5], [7, 8, 9, 10, 11]]
    tree = PrefixTree.build(*flat(prompts))
    assert tree.prompt_tokens == 13 + 12 + 5
    assert tree.distinct_tokens == 10 + 3 + 2 + 5
    # Block 4: the second request of the family reuses 8 of the 10 shared tokens.
    assert tree.block_ideal_computed_tokens(4) == 30 - 8
    # Block 1 reaches the token-level ideal; a block longer than the prefix saves nothing.
    assert tree.block_ideal_computed_tokens(1) == tree.distinct_tokens
    assert tree.block_ideal_computed_tokens(16) == 30


def test_block_ideal_recomputes_the_last_token_of_a_repeated_prompt():
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8]] * 3
    tree = PrefixTree.build(*flat(prompts))
    assert tree.distinct_tokens == 8
    # As in vLLM, a fully cached prompt still computes its last block (here 4 tokens).
    assert tree.block_ideal_computed_tokens(4) == 8 + 4 + 4
    assert tree.block_ideal_computed_tokens(1) == 8 + 1 + 1


def test_coarsen_keeps_only_sharing_in_whole_cacheable_blocks():
    doc = list(range(50, 62))  # 12 tokens
    prompts = [[1, 2, 3] + doc + [7], [1, 2, 3] + doc + [8], [1, 2, 9, 9]]
    tree = PrefixTree.build(*flat(prompts))
    assert sorted(tree.node_depth.tolist()) == [0, 2, 15]
    blocks = tree.coarsen(4)
    assert blocks.order.tolist() == tree.order.tolist()
    # The 2-token branch point is not a whole block: it disappears; 15 rounds down to 12.
    assert sorted(blocks.node_depth.tolist()) == [0, 12]


@given(jobs(min_requests=1), st.data())
def test_a_subset_is_the_tree_of_those_prompts_alone(prompts, data):
    keep = np.flatnonzero(data.draw(st.lists(st.booleans(), min_size=len(prompts),
                                             max_size=len(prompts))))
    sub = PrefixTree.build(*flat(prompts)).subset(keep)
    kept = [prompts[i] for i in keep]
    assert [kept[i] for i in sub.order] == sorted(kept)
    assert sub.lcp.tolist() == PrefixTree.build(*flat(kept)).lcp.tolist()
    assert sub.lengths.tolist() == [len(p) for p in kept]
