"""Plan a job from its global prefix tree: prefix groups, their run order, their KV sizes.

A planned group is a run of requests that share one prefix: the executor computes that
prefix once (its first member, the leader), then the others find it in vLLM's prefix cache,
and the group's KV holds the prefix once instead of once per member. Everything is worked out
on the tree coarsened to whole KV blocks (`PrefixTree.coarsen`): that is all a block-granular
cache can share. Four steps, each a function below with a worked example:

1. Groups (`sharing.choose_groups`): the prefixes that save the most, sum(P * (members - 1)).
   Requests that share no whole block with another are "unshared": not thousands of groups
   of one, but buckets (each maximal run of them in the final order is one group with
   prefix_len 0).
2. Order (`_run_order`): depth-first over the block tree, so the requests under every shared
   prefix run as one stretch and the cache needs to hold only the current path; among
   siblings, decode-heavy work first (BatchLLM's reordering), so that long decodes overlap
   the prefills that come later. `decode_first=False` keeps tree order.
3. Memory (`_run_arrays`, `_kv_blocks`): each request needs ceil((prompt + max_tokens) /
   block_size) KV blocks; within its group the prefix blocks count once, and so do the
   blocks a member shares beyond it with the member before it (a chat's turns extend each
   other): `suffix_blocks` is the rest, `private_blocks` the part no other member shares.
4. Cuts (`_cut_to_fit`): given `kv_capacity_tokens`, a group whose KV does not fit is cut
   into consecutive groups with the same prefix (one prefix_id), so that each fits; the
   cache keeps the prefix across them.

Members start together after the leader, relying on vLLM reusing, within a step, the blocks
the member before is computing; where a chunked prefill defeats that, the estimate runs short
and vLLM preempts (recomputes) rather than overflows. Members are not held back one by one
until the member before is cached: that was slower and computed no fewer tokens
(benchmarks/README.md, "End to end: batchrun vs plain vLLM").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .blocks import blocks_for
from .prefix_tree import PrefixTree
from .sharing import choose_groups, node_levels


@dataclass(slots=True)  # not frozen: frozen dataclasses are slow to create, and jobs have many
class PlannedGroup:
    """Requests `Plan.order[start:end]`, which share their first `prefix_len` tokens."""

    start: int
    end: int
    prefix_len: int  # shared tokens, a multiple of the block size; 0: an unshared bucket
    prefix_blocks: int  # prefix_len / block_size
    kv_blocks: int  # KV blocks of the whole group: the prefix once, plus every member's suffix
    decode_ratio: float  # sum of max_tokens / prompt tokens the group computes (prefix once)
    prefix_id: int  # one id per shared prefix (a group may be cut in several); -1: unshared
    parent: int  # index in Plan.groups of a group holding the enclosing shared prefix, or -1
    # The prefix tree node of the nearest shorter prefix it shares with other groups, or -1
    shared_above: int = -1

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class PlanStats:
    """The plan's figures, for `batchrun plan` and the job summary."""

    requests: int
    prompt_tokens: int
    distinct_prompt_tokens: int  # prefill work if every distinct prefix were computed once
    block_ideal_computed_tokens: int  # the same with a perfect block-granular prefix cache
    expected_prefill_saving: float  # 1 - block_ideal_computed_tokens / prompt_tokens
    groups: int
    shared_groups: int  # groups with prefix_len > 0
    unshared_requests: int  # requests in buckets (prefix_len 0)
    group_shared_tokens: int  # sum over shared prefixes of prefix_len * (requests - 1)
    kv_tokens_per_group_mean: float
    kv_tokens_per_group_max: int
    kv_capacity_tokens: int | None
    over_capacity_groups: int  # single requests that need more KV than the capacity alone
    block_size: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Plan:
    """Run `order` group by group; size the in-flight window with `suffix_blocks` and
    `private_blocks`."""

    order: np.ndarray  # int64 [n]: request indices in run order, each exactly once
    groups: list[PlannedGroup]  # contiguous, non-overlapping slices of order, covering it
    suffix_blocks: np.ndarray  # int64 [n] by request index: KV blocks no earlier member holds
    private_blocks: np.ndarray  # int64 [n] by request index: its suffix blocks no member shares
    stats: PlanStats


def _mark_shared_above(groups: list[PlannedGroup], block_tree: PrefixTree) -> None:
    """Each shared group's nearest shorter prefix that other groups share too: the branching
    node above its own (e.g. the system prompt above two documents' groups)."""
    for g in groups:
        if g.prefix_id > 0:
            up = int(block_tree.node_parent[g.prefix_id])
            if block_tree.node_depth[up] > 0:
                g.shared_above = up


def plan_schedule(
    values: np.ndarray,
    offsets: np.ndarray,
    max_tokens: np.ndarray,
    *,
    block_size: int,
    kv_capacity_tokens: int | None = None,
    decode_first: bool = True,
    tree: PrefixTree | None = None,
) -> Plan:
    """Plan the requests `values[offsets[i]:offsets[i + 1]]`, each decoding up to
    `max_tokens[i]` tokens, for an engine with `block_size`-token KV blocks and (if given)
    room for `kv_capacity_tokens` tokens of KV. Pass `tree` if it is built already."""
    return order_requests(values, offsets, max_tokens, block_size=block_size,
                          decode_first=decode_first, tree=tree).plan(kv_capacity_tokens)


@dataclass(frozen=True)
class RequestOrder:
    """The part of a plan that does not depend on the KV cache's size: the groups chosen on
    the block tree and the run order. `plan(kv_capacity_tokens)` cuts it to a cache, so the
    engine's sizing (no capacity yet) and the run (the engine's capacity) share one order."""

    tree: PrefixTree
    block_tree: PrefixTree
    group_parent: np.ndarray
    runs: _RunArrays
    block_size: int

    def plan(self, kv_capacity_tokens: int | None = None) -> Plan:
        runs, block_size = self.runs, self.block_size
        capacity = None if kv_capacity_tokens is None else kv_capacity_tokens // block_size
        starts = np.flatnonzero(np.diff(runs.group_node, prepend=-1))
        if capacity is not None:
            starts = _cut_to_fit(runs, starts, capacity)
        suffix, private = _kv_blocks(runs, starts)
        groups = _planned_groups(runs, starts, suffix, self.group_parent)
        _mark_shared_above(groups, self.block_tree)
        n = self.tree.num_requests
        suffix_blocks = np.empty(n, dtype=np.int64)
        suffix_blocks[runs.order] = suffix
        private_blocks = np.empty(n, dtype=np.int64)
        private_blocks[runs.order] = private
        stats = _plan_stats(self.tree, groups, runs, block_size, kv_capacity_tokens)
        return Plan(runs.order, groups, suffix_blocks, private_blocks, stats)


def order_requests(
    values: np.ndarray,
    offsets: np.ndarray,
    max_tokens: np.ndarray,
    *,
    block_size: int,
    decode_first: bool = True,
    tree: PrefixTree | None = None,
) -> RequestOrder:
    """The groups and run order of `plan_schedule`, before any cut to a KV capacity."""
    if block_size < 1:
        raise ValueError("block_size must be at least 1")
    tree = tree if tree is not None else PrefixTree.build(values, offsets)
    n = tree.num_requests
    max_tokens = np.asarray(max_tokens, dtype=np.int64)
    if max_tokens.shape != (n,):
        raise ValueError(f"max_tokens has shape {max_tokens.shape}, expected ({n},)")
    block_tree = tree.coarsen(block_size)
    owner, group_parent = choose_groups(block_tree, deeper_wins_ties=True)
    group_node = owner[block_tree.request_node]  # by tree position
    run = _run_order(block_tree, group_parent >= 0, group_node,
                     tree.lengths[tree.order], max_tokens[tree.order], decode_first)
    runs = _run_arrays(tree, block_tree, group_node, run, max_tokens, block_size)
    return RequestOrder(tree, block_tree, group_parent, runs, block_size)


def _run_order(block_tree: PrefixTree, chosen: np.ndarray, group_node: np.ndarray,
               lengths: np.ndarray, decode: np.ndarray, decode_first: bool) -> np.ndarray:
    """The run order, as a permutation of tree positions: run[k] is the position that runs
    k-th. Arrays by tree position; `chosen` marks the nodes that hold a group.

    Depth-first over the block tree. The units placed among siblings are the subtrees of
    the children that hold a group somewhere inside, plus the node's remaining requests as
    one more unit (at the root: each of them is a unit of its own, so unshared requests
    interleave with the system-prompt clusters). Siblings go in decreasing ratio of decode
    tokens to the prompt tokens they compute (given their parent's prefix, each prefix once).
    Within a unit, requests keep tree order, so deeper sharing stays adjacent.

    E.g. system prompts S (max_tokens 8 per request) and T (512): T's subtree ranks first
    at the root; inside S, its documents rank by their own ratios, and so on down.
    """
    n = len(lengths)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    units = _Units.of(block_tree, chosen)
    ratios = _UnitRatios.of(block_tree, units, lengths, decode)
    own_at, root_at = _place_units(block_tree, units, ratios, decode, decode_first)
    # Inside a node's own unit, requests keep tree order.
    unit = units.unit
    by_unit = np.argsort(unit, kind="stable")
    rank = np.arange(n) - np.searchsorted(unit[by_unit], unit[by_unit], side="left")
    target = np.empty(n, dtype=np.int64)
    target[by_unit] = own_at[unit[by_unit]] + rank
    target[units.root_requests] = root_at[units.root_requests]
    run = np.empty(n, dtype=np.int64)
    run[target] = np.arange(n)
    return run


@dataclass(frozen=True)
class _Units:
    """What `_run_order` places. A node *holds* a group if one is chosen in its subtree (the
    root always does); a request belongs to the own unit of the deepest holding node above
    it (`unit`, by position), 0 for the root's own requests, each a unit of one.

    E.g. root > S > D, a group chosen at D only: the root, S and D hold; D's requests are in
    D's own unit, S's other requests in S's own unit, requests under no S in the root's."""

    holds: np.ndarray  # per node
    level: np.ndarray  # per node: its ancestors
    unit: np.ndarray  # per position
    own_size: np.ndarray  # per node: requests in its own unit
    root_requests: np.ndarray  # positions of the root's own requests

    @classmethod
    def of(cls, block_tree: PrefixTree, chosen: np.ndarray) -> _Units:
        first, parent = block_tree.node_start, block_tree.node_parent
        subtree_end = np.searchsorted(first, block_tree.node_end, side="left")  # [u, end)
        chosen_before = np.concatenate(([0], np.cumsum(chosen)))
        holds = chosen_before[subtree_end] > chosen_before[:-1]
        holds[0] = True
        level = node_levels(parent)
        holder = np.zeros(block_tree.num_nodes, dtype=np.int64)
        for k in range(1, int(level.max()) + 1):
            nodes = np.flatnonzero(level == k)
            holder[nodes] = np.where(holds[nodes], nodes, holder[parent[nodes]])
        unit = holder[block_tree.request_node]
        return cls(holds, level, unit, np.bincount(unit, minlength=block_tree.num_nodes),
                   np.flatnonzero(unit == 0))


@dataclass(frozen=True)
class _UnitRatios:
    """Decode tokens per computed prompt token: of each node's subtree, of each node's own
    unit, and of each request alone. A unit computes its prompt tokens with a cache that
    already holds its parent's prefix (and nothing of its siblings): e.g. a subtree of two
    100-token requests sharing 60 tokens, under a 40-token parent prefix, computes 60 + 40
    tokens; asking for 50 tokens each, its ratio is 100 / 100 = 1."""

    subtree: np.ndarray  # per node
    own: np.ndarray  # per node
    work: np.ndarray  # per position: prompt tokens beyond what it shares with its predecessor

    @classmethod
    def of(cls, block_tree: PrefixTree, units: _Units, lengths: np.ndarray,
           decode: np.ndarray) -> _UnitRatios:
        parent, first, end = block_tree.node_parent, block_tree.node_start, block_tree.node_end
        depth, lcp = block_tree.node_depth, block_tree.lcp
        work = (lengths - lcp).astype(np.float64)
        decode_at = np.concatenate(([0.0], np.cumsum(decode, dtype=np.float64)))
        work_at = np.concatenate(([0.0], np.cumsum(work)))
        outer = depth[np.maximum(parent, 0)] * (parent >= 0)
        subtree_work = work_at[end] - work_at[first] - np.maximum(outer - lcp[first], 0)
        subtree = (decode_at[end] - decode_at[first]) / np.maximum(subtree_work, 1)
        m = block_tree.num_nodes
        own_work = lengths - np.maximum(lcp, depth[units.unit])
        own = np.bincount(units.unit, weights=decode, minlength=m) / np.maximum(
            np.bincount(units.unit, weights=own_work, minlength=m), 1)
        return cls(subtree, own, work)


def _place_units(block_tree: PrefixTree, units: _Units, ratios: _UnitRatios,
                 decode: np.ndarray, decode_first: bool) -> tuple[np.ndarray, np.ndarray]:
    """Where each unit starts in the run: (own unit start per node, start per root request).

    Level by level from the root: the units at depth k are the subtrees of holding nodes at
    depth k, the own units of holding nodes at depth k - 1, and (under the root) the root's
    own requests; each starts where its parent's subtree starts plus the sizes of the
    siblings ranked before it (`_lay_out`)."""
    parent, first = block_tree.node_parent, block_tree.node_start
    size = block_tree.node_end - first
    holds, level, own_size, loose = units.holds, units.level, units.own_size, units.root_requests
    m = block_tree.num_nodes
    subtree_at = np.zeros(m, dtype=np.int64)
    own_at = np.zeros(m, dtype=np.int64)
    root_at = np.zeros(len(decode), dtype=np.int64)
    none = np.zeros(0, dtype=np.int64)
    for k in range(1, int(level[holds].max()) + 2):
        subtrees = np.flatnonzero(holds & (level == k))
        owners = np.flatnonzero(holds & (level == k - 1) & (own_size > 0)) if k > 1 else none
        root_requests = loose if k == 1 else none
        at = _lay_out(
            subtree_at,
            within=np.concatenate((parent[subtrees], owners, np.zeros_like(root_requests))),
            size=np.concatenate((size[subtrees], own_size[owners],
                                 np.ones_like(root_requests))),
            ratio=np.concatenate((ratios.subtree[subtrees], ratios.own[owners],
                                  decode[root_requests] / np.maximum(
                                      ratios.work[root_requests], 1)))
            if decode_first else None,
            place=np.concatenate((first[subtrees], first[owners], root_requests)))
        subtree_at[subtrees], own_at[owners], root_at[root_requests] = np.split(
            at, [len(subtrees), len(subtrees) + len(owners)])
    return own_at, root_at


def _lay_out(parent_at: np.ndarray, within: np.ndarray, size: np.ndarray,
             ratio: np.ndarray | None, place: np.ndarray) -> np.ndarray:
    """Where each unit starts: after its parent's start and the siblings before it, which
    are ordered by decreasing ratio (if given), then by tree position.

    E.g. three units of one parent starting at 10, sizes [4, 2, 3], ratios [1, 5, 3]: the
    order is 2nd, 3rd, 1st, so they start at [15, 10, 12]."""
    by = np.lexsort((place, within) if ratio is None else (place, -ratio, within))
    before = np.cumsum(size[by]) - size[by]
    first_sibling = np.ones(len(by), dtype=bool)
    first_sibling[1:] = within[by][1:] != within[by][:-1]
    at = np.empty(len(by), dtype=np.int64)
    at[by] = parent_at[within[by]] + before - np.maximum.accumulate(
        np.where(first_sibling, before, 0))
    return at


@dataclass(frozen=True)
class _RunArrays:
    """Per request in run order: what cutting groups and sizing their KV need."""

    order: np.ndarray  # the request index
    group_node: np.ndarray  # the block-tree node whose prefix it shares; 0: none
    prefix_len: np.ndarray  # that node's depth, tokens
    prefix_blocks: np.ndarray  # the same in blocks
    lengths: np.ndarray  # prompt tokens
    decode: np.ndarray  # max_tokens
    blocks_alone: np.ndarray  # KV blocks alone: ceil((prompt + max_tokens) / block_size)
    # Blocks it shares with the request before it, if that one is in its group and its
    # neighbour in the tree (the next turn of a chat); 0 for a group's first request.
    shared_with_previous: np.ndarray


def _run_arrays(tree: PrefixTree, block_tree: PrefixTree, group_node: np.ndarray,
                run: np.ndarray, max_tokens: np.ndarray, block_size: int) -> _RunArrays:
    """The requests' figures in run order (`group_node` and `run` are by tree position).

    E.g. block size 4: a 17-token prompt asking for 8 tokens needs ceil(25 / 4) = 7 blocks
    alone; run right after a request it shares 12 tokens with, its shared_with_previous is 3.
    """
    group = group_node[run]
    lengths, decode = tree.lengths[tree.order][run], max_tokens[tree.order][run]
    prefix_len = block_tree.node_depth[group]
    shared = block_tree.lcp[run] // block_size
    shared[1:] *= (np.diff(run) == 1) & (np.diff(group) == 0)
    shared[:1] = 0
    return _RunArrays(tree.order[run], group, prefix_len, prefix_len // block_size, lengths,
                      decode, blocks_for(lengths + decode, block_size), shared)


def _blocks_added(runs: _RunArrays, shared_with_previous: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Per request, the blocks its group holds for it already (its prefix, or what it shares
    with the member before), and the running sum of the blocks each request adds beyond
    that: the KV of requests [s, e) of one group is prefix + added[e] - added[s]."""
    held = np.maximum(runs.prefix_blocks, shared_with_previous)
    return held, np.concatenate(([0], np.cumsum(runs.blocks_alone - held)))


def _cut_to_fit(runs: _RunArrays, starts: np.ndarray, capacity: int) -> np.ndarray:
    """The group starts (positions in the run), with cuts added where a group's KV exceeds
    `capacity` blocks: each cut holds as many members as fit next to the prefix, at least
    one. A cut's first member shares nothing with the one before it (the two no longer run
    together), so it computes again what it shared (`recomputed`).

    E.g. a 4-block prefix, members adding 3 blocks each, capacity 12: 2 members fit next to
    the prefix (4 + 6), so a group of 5 is cut into 2 + 2 + 1."""
    n = len(runs.group_node)
    ends = np.append(starts[1:], n)[: len(starts)]
    held, added = _blocks_added(runs, runs.shared_with_previous)
    room = capacity - runs.prefix_blocks[starts]
    recomputed = held - runs.prefix_blocks
    cuts = []
    for s, e, r in zip(starts.tolist(), ends.tolist(), room.tolist(), strict=True):
        while added[e] - added[s] + recomputed[s] > r and e - s > 1:
            last_fitting = int(np.searchsorted(added, added[s] + r - recomputed[s],
                                               side="right")) - 1
            s = min(max(last_fitting, s + 1), e)
            cuts.append(s)
    return np.sort(np.concatenate((starts, np.array(cuts, dtype=np.int64))))


def _kv_blocks(runs: _RunArrays, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each request's suffix blocks (beyond what its group holds for it) and private blocks
    (of those, the ones the next member does not share), in run order.

    E.g. a chat's turns in one group, prefix 2 blocks: turn 1 (4 blocks alone), turn 2 (5
    blocks, shares 3 with turn 1): suffix [2, 2]; turn 1's private blocks are 4 - max(2, 3) =
    1, its others stay until the group finishes, for turn 2."""
    shared = runs.shared_with_previous.copy()
    shared[starts] = 0  # a group's first member shares nothing with the one before it
    held = np.maximum(runs.prefix_blocks, shared)
    private = runs.blocks_alone - np.maximum(held, np.append(shared[1:], 0))
    return runs.blocks_alone - held, private


def _planned_groups(runs: _RunArrays, starts: np.ndarray, suffix: np.ndarray,
                    group_parent: np.ndarray) -> list[PlannedGroup]:
    """The PlannedGroups of run slices [starts[i], starts[i + 1]); the groups cut from one
    prefix share its node as prefix_id, and `parent` is the first group of the enclosing
    chosen prefix."""
    n = len(runs.group_node)
    ends = np.append(starts[1:], n)[: len(starts)]
    node = runs.group_node[starts]
    first_of = np.full(len(group_parent), -1, dtype=np.int64)  # first group of each prefix
    first_of[node[::-1]] = np.arange(len(node))[::-1]
    parent = np.where(group_parent[node] > 0, first_of[group_parent[node]], -1)
    decode_sum = np.concatenate(([0], np.cumsum(runs.decode)))
    length_sum = np.concatenate(([0], np.cumsum(runs.lengths)))
    suffix_sum = np.concatenate(([0], np.cumsum(suffix)))
    prefix = runs.prefix_len[starts]
    computed = prefix + length_sum[ends] - length_sum[starts] - prefix * (ends - starts)
    ratio = (decode_sum[ends] - decode_sum[starts]) / np.maximum(computed, 1)
    kv = runs.prefix_blocks[starts] + suffix_sum[ends] - suffix_sum[starts]
    return [
        PlannedGroup(start=s, end=e, prefix_len=p, prefix_blocks=b, kv_blocks=k,
                     decode_ratio=r, prefix_id=i if i else -1, parent=q)
        for s, e, p, b, k, r, i, q in zip(
            starts.tolist(), ends.tolist(), prefix.tolist(),
            runs.prefix_blocks[starts].tolist(), kv.tolist(), ratio.tolist(), node.tolist(),
            parent.tolist(), strict=True)
    ]


def _plan_stats(tree: PrefixTree, groups: list[PlannedGroup], runs: _RunArrays,
                block_size: int, kv_capacity_tokens: int | None) -> PlanStats:
    kv = np.array([g.kv_blocks for g in groups], dtype=np.int64) * block_size
    sharing = {}  # prefix_id -> (prefix_len, requests), over the groups a prefix was cut into
    for g in groups:
        if g.prefix_len:
            sharing[g.prefix_id] = (g.prefix_len, sharing.get(g.prefix_id, (0, 0))[1] + g.size)
    prompt = tree.prompt_tokens
    ideal = tree.block_ideal_computed_tokens(block_size)
    capacity = None if kv_capacity_tokens is None else kv_capacity_tokens // block_size
    return PlanStats(
        requests=tree.num_requests,
        prompt_tokens=prompt,
        distinct_prompt_tokens=tree.distinct_tokens,
        block_ideal_computed_tokens=ideal,
        expected_prefill_saving=1 - ideal / prompt if prompt else 0.0,
        groups=len(groups),
        shared_groups=sum(1 for g in groups if g.prefix_len),
        unshared_requests=int((runs.group_node == 0).sum()),
        group_shared_tokens=sum(p * (m - 1) for p, m in sharing.values()),
        kv_tokens_per_group_mean=float(kv.mean()) if len(kv) else 0.0,
        kv_tokens_per_group_max=int(kv.max(initial=0)),
        kv_capacity_tokens=kv_capacity_tokens,
        over_capacity_groups=0 if capacity is None else int((kv > capacity * block_size).sum()),
        block_size=block_size,
    )
