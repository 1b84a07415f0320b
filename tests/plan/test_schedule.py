"""The planner: groups, order policy and KV sizing, on hand-made jobs and random ones."""

from __future__ import annotations

import functools
import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from batchrun.plan import Plan, PrefixTree, plan_schedule
from tests.plan.random_jobs import flat, jobs

BLOCK = 4


def plan_of(prompts, max_tokens, **options) -> Plan:
    values, offsets = flat(prompts)
    return plan_schedule(values, offsets, np.array(max_tokens), block_size=BLOCK, **options)


def tokens(start: int, count: int) -> list[int]:
    return list(range(start, start + count))


def members(plan: Plan) -> list[list[int]]:
    return [plan.order[g.start: g.end].tolist() for g in plan.groups]


def systems_with_documents(doc_budgets: list[tuple[int, ...]]) -> tuple[list, list]:
    """System prompt s (8 tokens) > its documents (8 tokens, max_tokens doc_budgets[s][d])
    > three unique one-token questions each."""
    prompts, budget = [], []
    for s, budgets in enumerate(doc_budgets):
        for d, mt in enumerate(budgets):
            for _ in range(3):
                prompts.append(tokens(1000 * s, 8) + tokens(1000 * s + 100 * d + 10, 8)
                               + [9000 + len(prompts)])
                budget.append(mt)
    return prompts, budget


def test_a_system_prompt_and_its_documents():
    # Two system prompts (8 tokens), two documents under each (8 tokens), three questions
    # per document. The first system prompt's documents decode much more.
    prompts, budget = systems_with_documents([(512, 256), (64, 8)])
    plan = plan_of(prompts, budget)
    # A group per document, sharing system prompt + document: 16 tokens, 4 blocks.
    assert [g.prefix_len for g in plan.groups] == [16] * 4
    assert members(plan) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    # Each member needs ceil((17 + max_tokens) / 4) blocks; the 4 prefix blocks count once.
    first = plan.groups[0]
    assert plan.suffix_blocks[0] == -(-(17 + 512) // BLOCK) - 4
    assert first.kv_blocks == 4 + 3 * plan.suffix_blocks[0]
    assert plan.stats.group_shared_tokens == 4 * 16 * 2
    assert plan.stats.block_ideal_computed_tokens == 12 * 17 - 8 * 16 - 2 * 8


def test_a_chat_whose_turns_extend_each_other_counts_each_turn_once():
    # Rows of one chat: system prompt (2 blocks) + the first k turns (a block each) + a
    # unique last token. Row k's prompt is a prefix of row k+1's (but for the last token).
    prompts, turns = [], []
    for k in range(4):
        turns += tokens(100 * (k + 1), 4)
        prompts.append(tokens(0, 8) + turns + [900 + k])
    plan = plan_of(prompts, [4] * 4)
    (chat,) = plan.groups
    assert chat.prefix_len == 12 and members(plan) == [[3, 2, 1, 0]]  # tree order
    # Alone the rows need 8, 7, 6 and 5 blocks. Together: the 6 distinct prompt blocks of
    # the longest row, plus each row's last prompt block and decode (2 blocks each).
    assert chat.kv_blocks == 6 + 4 * 2
    assert plan.suffix_blocks[[3, 2, 1, 0]].tolist() == [8 - 3, 2, 2, 2]
    # Row 3's fourth turn is its own: it is freed when row 3 finishes, the shared turns
    # when the last row that uses them does.
    assert plan.private_blocks[[3, 2, 1, 0]].tolist() == [3, 2, 2, 2]


def test_decode_heavy_work_goes_first_but_a_system_prompt_stays_together():
    # System A's documents decode 8 and 512 tokens, system B's 384 and 256. B decodes more
    # in all, so B runs first; A's 512 document does not jump ahead of B: it would split A
    # and compute A's system prompt twice. Within each system the heavier document leads.
    prompts, budget = systems_with_documents([(8, 512), (384, 256)])
    plan = plan_of(prompts, budget)
    assert [budget[g[0]] for g in members(plan)] == [384, 256, 512, 8]
    # decode_first=False: plain depth-first tree order.
    plain = plan_of(prompts, budget, decode_first=False)
    assert [budget[g[0]] for g in members(plain)] == [8, 512, 384, 256]


def test_nested_groups_link_to_the_enclosing_prefix():
    # Requests with the system prompt but no document form the system prompt's own group;
    # the document groups nest in it.
    system = tokens(0, 8)
    prompts = ([system + tokens(100, 8) + [9000 + q] for q in range(3)]
               + [system + [9100 + q] for q in range(3)]
               + [system + tokens(200, 8) + [9200 + q] for q in range(3)])
    plan = plan_of(prompts, [16] * 9)
    by_prefix = {g.prefix_len: g for g in plan.groups}
    outer = plan.groups.index(by_prefix[8])
    assert sorted(g.prefix_len for g in plan.groups) == [8, 16, 16]
    assert all(g.parent == outer for g in plan.groups if g.prefix_len == 16)
    assert plan.groups[outer].parent == -1
    assert sorted(plan.order[plan.groups[outer].start: plan.groups[outer].end]) == [3, 4, 5]


def test_unshared_requests_are_bucketed_and_placed_by_their_own_ratio():
    family = [tokens(0, 8) + [100 + q] for q in range(4)]  # shares 8 tokens, decodes 64
    loners = [[200 + 10 * i, 1, 2, 3, 4, 5, 6, 7, 8] for i in range(6)]  # share nothing
    loner_budget = [512, 4, 256, 2, 1024, 8]
    plan = plan_of(family + loners, [64] * 4 + loner_budget)
    kinds = [g.prefix_len for g in plan.groups]
    assert kinds == [0, 8, 0]  # one bucket each side of the family, never two in a row
    assert all(g.prefix_id == -1 for g in plan.groups if g.prefix_len == 0)
    assert [loner_budget[i - 4] for i in members(plan)[0]] == [1024, 512, 256]
    assert [loner_budget[i - 4] for i in members(plan)[2]] == [8, 4, 2]
    assert plan.stats.unshared_requests == 6 and plan.stats.shared_groups == 1


def test_a_group_too_big_for_the_kv_budget_is_cut_into_consecutive_groups():
    prompts = [tokens(0, 16) + [100 + q, 1, 2, 3] for q in range(10)]  # 4 prefix blocks
    plan = plan_of(prompts, [12] * 10, kv_capacity_tokens=80)  # 20 blocks
    # Each member needs ceil(32 / 4) - 4 = 4 blocks beyond the prefix: 4 members per group.
    assert [g.size for g in plan.groups] == [4, 4, 2]
    assert {g.prefix_id for g in plan.groups} == {plan.groups[0].prefix_id}
    assert all(g.kv_blocks * BLOCK <= 80 for g in plan.groups)
    assert plan.stats.group_shared_tokens == 16 * 9 and plan.stats.over_capacity_groups == 0


def test_an_empty_job_plans_nothing():
    plan = plan_of([], [])
    assert len(plan.order) == 0 and plan.groups == [] and plan.stats.requests == 0


@st.composite
def planned(draw):
    prompts = draw(jobs(max_requests=30))
    budget = draw(st.lists(st.integers(1, 64), min_size=len(prompts), max_size=len(prompts)))
    block = draw(st.sampled_from([1, 2, 4, 8]))
    capacity = draw(st.none() | st.integers(1, 300))
    values, offsets = flat(prompts)
    plan = plan_schedule(values, offsets, np.array(budget, dtype=np.int64), block_size=block,
                         kv_capacity_tokens=capacity)
    return prompts, budget, block, capacity, plan


@settings(max_examples=100, deadline=None)
@given(planned())
def test_every_plan_keeps_its_invariants(case):
    prompts, budget, block, capacity, plan = case
    assert sorted(plan.order.tolist()) == list(range(len(prompts)))
    bounds = [0] + [g.end for g in plan.groups]  # contiguous, in order, covering the order
    assert [g.start for g in plan.groups] == bounds[:-1] and bounds[-1] == len(prompts)
    for g in plan.groups:
        inside = [prompts[i] for i in plan.order[g.start: g.end]]
        assert g.size > 0 and g.prefix_len % block == 0 and g.prefix_blocks * block == g.prefix_len
        # Every member has the prefix and at least one token past it.
        assert all(p[: g.prefix_len] == inside[0][: g.prefix_len] for p in inside)
        assert all(len(p) > g.prefix_len for p in inside)
        ids = plan.order[g.start: g.end]
        suffix, private = plan.suffix_blocks[ids], plan.private_blocks[ids]
        assert g.kv_blocks == g.prefix_blocks + suffix.sum()
        # Never below what the members really hold together in a block-granular cache:
        # every distinct full prompt block once (a request's last token is never cached),
        # and the rest of each request (last prompt block, decode) on its own.
        cacheable = [(len(prompts[i]) - 1) // block for i in ids]
        need = [-(-(len(prompts[i]) + budget[i]) // block) for i in ids]
        distinct = {tuple(prompts[i][: k * block]) for i, c in zip(ids, cacheable, strict=True)
                    for k in range(1, c + 1)}
        assert g.kv_blocks >= len(distinct) + sum(need) - sum(cacheable)
        # What a member frees when it finishes is its own: never a cacheable block it shares.
        assert (private <= suffix).all()
        assert (private >= np.array(need) - np.array(cacheable)).all()
        if capacity is not None and g.size > 1:
            assert g.kv_blocks * block <= capacity
        if g.parent >= 0:
            outer = plan.groups[g.parent]
            assert 0 < outer.prefix_len < g.prefix_len
            assert prompts[plan.order[outer.start]][: outer.prefix_len] == inside[0][
                : outer.prefix_len]
    unshared = [g.prefix_len == 0 for g in plan.groups]
    if capacity is None:  # buckets are maximal runs (a KV cut may split one)
        assert not any(a and b for a, b in zip(unshared, unshared[1:], strict=False))


@settings(max_examples=60, deadline=None)
@given(planned())
def test_every_shared_prefix_runs_in_one_stretch(case):
    # Depth-first: the requests under any node of the block tree are consecutive in the
    # plan, so each shared prefix is computed once even by a cache that holds one path.
    prompts, _, block, _, plan = case
    blocks = PrefixTree.build(*flat(prompts)).coarsen(block)
    place = np.empty(len(prompts), dtype=np.int64)
    place[plan.order] = np.arange(len(prompts))
    for u in range(blocks.num_nodes):
        at = place[blocks.order[blocks.node_start[u]: blocks.node_end[u]]]
        assert len(at) == 0 or at.max() - at.min() + 1 == len(at)


def best_sharing_by_search(blocks: PrefixTree) -> int:
    """Most sum(P * (members - 1)) over every choice of group nodes, by brute force: each
    request joins the deepest chosen node on its path. BatchLLM's flattening (a node takes
    its whole subtree) is one of these choices. 2**nodes choices: small trees only."""
    best = 0
    inner = range(1, blocks.num_nodes)
    for k in range(len(inner) + 1):
        for chosen in itertools.combinations(inner, k):
            count = dict.fromkeys(chosen, 0)
            for node in blocks.request_node:
                while node and node not in count:
                    node = blocks.node_parent[node]
                if node:
                    count[node] += 1
            best = max(best, sum(blocks.node_depth[u] * (m - 1) for u, m in count.items() if m))
    return best


def best_sharing_by_recurrence(blocks: PrefixTree) -> int:
    """The same most, for a tree of any size, node by node: best(u, Q) is the most u's
    subtree saves when its requests that join no group in it join a group Q tokens deep
    above it (0: none). A group at u that takes no request is never better than none, so
    counting it as saving -P_u loses nothing. (The planner computes this recurrence level by
    level in arrays; this is it written plainly, and best_sharing_by_search checks it.)"""
    children: dict[int, list[int]] = {}
    for u in range(1, blocks.num_nodes):
        children.setdefault(int(blocks.node_parent[u]), []).append(u)
    direct = np.bincount(blocks.request_node, minlength=blocks.num_nodes)

    @functools.cache
    def best(u: int, q: int) -> int:
        joining = q * int(direct[u]) + sum(best(c, q) for c in children.get(u, ()))
        if u == 0:  # the root is no group
            return joining
        p = int(blocks.node_depth[u])
        as_group = p * (int(direct[u]) - 1) + sum(best(c, p) for c in children.get(u, ()))
        return max(joining, as_group)

    return best(0, 0)


@settings(max_examples=100, deadline=None)
@given(jobs(vocab=2, max_requests=40), st.sampled_from([1, 2, 4]))
def test_groups_share_as_much_as_the_best_choice_of_prefixes(prompts, block):
    values, offsets = flat(prompts)
    tree = PrefixTree.build(values, offsets)
    blocks = tree.coarsen(block)
    best = best_sharing_by_recurrence(blocks)
    if blocks.num_nodes <= 11:  # where every choice can be tried: the recurrence is right
        assert best == best_sharing_by_search(blocks)
    plan = plan_schedule(values, offsets, np.ones(len(prompts), dtype=np.int64),
                         block_size=block, tree=tree)
    assert plan.stats.group_shared_tokens == best
