"""Plan a job from its global prefix tree: prefix groups, their run order, their KV sizes.

A prefix group is a run of requests that share one prefix: the runner computes that prefix
once (a warm-up, or its first member), then the others find it in vLLM's prefix cache, and
the group's KV holds the prefix once instead of once per member. Everything is worked out
on the tree coarsened to whole KV blocks (`PrefixTree.coarsen`): that is all a block-granular
cache can share.

Choosing groups (`_choose_prefixes`). The tree has levels (system prompt > document >
question) and each request joins one group, whose prefix is one node on its path. BatchLLM
flattens the tree with a dynamic programme that picks, for each subtree, the one level that
shares the most tokens, where a group of m requests sharing P tokens shares P * (m - 1). We
maximise the same objective exactly, over a larger family, so we never do worse: a node's
group holds the requests of its subtree that no deeper group took (in BatchLLM a node's
group takes its whole subtree or none of it). On a tie the deeper group wins: a request that
shares a prefix only with requests in deeper groups becomes a group of one under that prefix
and runs next to them. Requests that share no whole block with any other request are
"unshared": not thousands of groups of one, but buckets (each maximal run of them in the
final order is one group with prefix_len 0).

Order (`_run_order`). Depth-first over the block tree, so the requests under every shared
prefix run as one stretch and the cache needs to hold only the current path: deep groups
keep their outer sharing (documents under one system prompt run back to back). Within that,
decode-heavy work goes first, so that its long decode phases overlap the prefills that come
later (BatchLLM's reordering). At every node the units are the subtrees of its children
that hold a group, plus its remaining requests as one unit, and they go in decreasing
estimated decode/prompt ratio: sum of max_tokens over the prompt tokens the unit computes
given its parent's prefix (each prefix once). At the root the unshared requests are units of
their own, so they interleave with the system-prompt clusters by ratio. Within a unit,
requests keep tree order (deeper sharing stays adjacent). Knob: `decode_first=False` keeps
tree order at every level. A group whose members sit on both sides of a nested group comes
out as several PrefixGroups with one prefix_id; the prefix stays cached in between.

Memory. Each request needs ceil((prompt + max_tokens) / block_size) KV blocks; within its
group the shared prefix blocks are counted once, and so are the blocks a member shares
beyond it with the member before it (a chat's turns extend each other): `suffix_blocks` is
the rest. Of those, `private_blocks` are shared with no other member (its own last prompt
block and its decode): they are free once it finishes, the others once its group does.
Members start together after the first, so a member relies on vLLM reusing, within a step,
the blocks the member before it is computing; where a chunked prefill defeats that, the
estimate runs short and vLLM preempts (recomputes) rather than overflows. Holding each
member back until the one before it was cached was measured: the 12-chat multiturn
benchmark (`multiturn-small`) ran 10% slower and computed no fewer prompt tokens, so
members are not held.
Given `kv_capacity_tokens`, a group whose KV does not fit is cut into consecutive groups
with the same prefix, so that each fits; the cache keeps the prefix across them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .prefix_tree import PrefixTree


@dataclass(slots=True)  # not frozen: frozen dataclasses are slow to create, and jobs have many
class PrefixGroup:
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
    groups: list[PrefixGroup]  # contiguous, non-overlapping slices of order, covering it
    suffix_blocks: np.ndarray  # int64 [n] by request index: KV blocks no earlier member holds
    private_blocks: np.ndarray  # int64 [n] by request index: its suffix blocks no member shares
    stats: PlanStats


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
    if block_size < 1:
        raise ValueError("block_size must be at least 1")
    tree = tree if tree is not None else PrefixTree.build(values, offsets)
    n = tree.num_requests
    max_tokens = np.asarray(max_tokens, dtype=np.int64)
    if max_tokens.shape != (n,):
        raise ValueError(f"max_tokens has shape {max_tokens.shape}, expected ({n},)")
    blocks = tree.coarsen(block_size)
    owner, group_parent = _choose_prefixes(blocks)
    group = owner[blocks.request_node]  # by position: the node whose prefix it shares
    lengths, decode = tree.lengths[tree.order], max_tokens[tree.order]
    prefix = blocks.node_depth[group]
    run = _run_order(blocks, group_parent >= 0, lengths, decode, decode_first)

    order = tree.order[run]
    group, prefix, lengths, decode = group[run], prefix[run], lengths[run], decode[run]
    need = -(-(lengths + decode) // block_size)  # KV blocks of each request alone
    # Blocks shared with the previous member: neighbours in the tree, same group.
    link = blocks.lcp[run] // block_size
    link[1:] *= (np.diff(run) == 1) & (np.diff(group) == 0)
    link[:1] = 0
    capacity = None if kv_capacity_tokens is None else kv_capacity_tokens // block_size
    groups, suffix, private = _make_groups(group, prefix, lengths, decode, need, link,
                                           group_parent, block_size, capacity)

    for g in groups:
        if g.prefix_id > 0 and blocks.node_depth[up := blocks.node_parent[g.prefix_id]] > 0:
            g.shared_above = int(up)
    suffix_blocks = np.empty(n, dtype=np.int64)
    suffix_blocks[order] = suffix
    private_blocks = np.empty(n, dtype=np.int64)
    private_blocks[order] = private
    kv = np.array([g.kv_blocks for g in groups], dtype=np.int64) * block_size
    sharing = {}  # prefix_id -> (prefix_len, requests), over the groups a prefix was cut into
    for g in groups:
        if g.prefix_len:
            sharing[g.prefix_id] = (g.prefix_len, sharing.get(g.prefix_id, (0, 0))[1] + g.size)
    prompt = tree.prompt_tokens
    ideal = tree.block_ideal_computed_tokens(block_size)
    stats = PlanStats(
        requests=n,
        prompt_tokens=prompt,
        distinct_prompt_tokens=tree.distinct_tokens,
        block_ideal_computed_tokens=ideal,
        expected_prefill_saving=1 - ideal / prompt if prompt else 0.0,
        groups=len(groups),
        shared_groups=sum(1 for g in groups if g.prefix_len),
        unshared_requests=int((group == 0).sum()),
        group_shared_tokens=sum(p * (m - 1) for p, m in sharing.values()),
        kv_tokens_per_group_mean=float(kv.mean()) if len(kv) else 0.0,
        kv_tokens_per_group_max=int(kv.max(initial=0)),
        kv_capacity_tokens=kv_capacity_tokens,
        over_capacity_groups=0 if capacity is None else int((kv > capacity * block_size).sum()),
        block_size=block_size,
    )
    return Plan(order, groups, suffix_blocks, private_blocks, stats)


def _choose_prefixes(blocks: PrefixTree) -> tuple[np.ndarray, np.ndarray]:
    """Pick the group prefixes: the nodes whose groups maximise sum(P * (members - 1)).

    Returns, per node: owner (the nearest chosen node at or above it, 0 = the root: its
    requests join that node's group), and for chosen nodes the enclosing chosen node (-1
    for the others).

    The dynamic programme: best(u, Q) is the most sharing inside u's subtree when requests
    that join no group inside it fall back to an enclosing group with prefix Q:
        best(u, Q) = max(own(u), sum_c best(c, Q) + Q * direct(u))
        own(u)     = sum_c best(c, P_u) + P_u * direct(u) - P_u
    (children c, requests `direct` that end in u). Q only takes the depths of u's ancestors,
    so each level of the tree is one vectorised step with one column per ancestor.
    """
    depth, parent = blocks.node_depth, blocks.node_parent
    m = len(depth)
    direct = np.bincount(blocks.request_node, minlength=m)
    level = _levels(parent)
    by_level = [np.flatnonzero(level == k) for k in range(int(level.max()) + 1)]
    slot = np.empty(m, dtype=np.int64)  # a node's row among the nodes of its level
    for nodes in by_level:
        slot[nodes] = np.arange(len(nodes))
    # Depths of each node's ancestors, root first: the values Q can take.
    above = [np.zeros((1, 0), dtype=np.int64)]
    for nodes in by_level[1:]:
        up = parent[nodes]
        above.append(np.hstack([above[-1][slot[up]], depth[up][:, None]]))
    own, fall_back = [None] * len(by_level), [None] * len(by_level)
    best_below = None
    for k in range(len(by_level) - 1, 0, -1):
        nodes = by_level[k]
        children = np.zeros((len(nodes), k + 1), dtype=np.int64)
        if best_below is not None:  # children follow their parents' order (pre-order)
            up = slot[parent[by_level[k + 1]]]
            runs = np.flatnonzero(np.diff(up, prepend=-1))
            children[up[runs]] = np.add.reduceat(best_below, runs, axis=0)
        p, d = depth[nodes], direct[nodes]
        own[k] = children[:, k] + p * d - p
        fall_back[k] = children[:, :k] + above[k] * d[:, None]
        best_below = np.maximum(own[k][:, None], fall_back[k])
    owner = np.zeros(m, dtype=np.int64)
    group_parent = np.full(m, -1, dtype=np.int64)
    for k in range(1, len(by_level)):
        nodes = by_level[k]
        outer = owner[parent[nodes]]
        # Ties go to the deeper group. A tie at the root is a request that shares u's prefix
        # only with deeper groups: as a group of u it runs next to them, in the bucket it
        # would compute the prefix again. (An empty group never ties: it loses P_u.)
        chosen = own[k] >= fall_back[k][np.arange(len(nodes)), level[outer]]
        owner[nodes] = np.where(chosen, nodes, outer)
        group_parent[nodes[chosen]] = outer[chosen]
    return owner, group_parent


def _levels(parent: np.ndarray) -> np.ndarray:
    """Number of ancestors of each node (root: 0), by pointer jumping."""
    level = (parent >= 0).astype(np.int64)
    up = np.maximum(parent, 0)
    while (up > 0).any():
        level += level[up]
        up = up[up]
    return level


def _run_order(blocks: PrefixTree, chosen: np.ndarray, lengths: np.ndarray,
               decode: np.ndarray, decode_first: bool) -> np.ndarray:
    """The run order, as a permutation of tree positions (see the module notes).

    Depth-first over the block tree. A node that holds a group somewhere in its subtree
    is a unit among its siblings; the requests of a node that no such child takes are one
    more unit (at the root: each of them is one). Units are ranked within their parent,
    then every unit's offset is its parent's offset plus the sizes of the units before it.
    """
    n, m = len(lengths), blocks.num_nodes
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    parent, first = blocks.node_parent, blocks.node_start
    size = blocks.node_end - first
    last = np.searchsorted(first, blocks.node_end, side="left")  # subtree: nodes [u, last)
    chosen_before = np.concatenate(([0], np.cumsum(chosen)))
    holds = chosen_before[last] > chosen_before[:-1]
    holds[0] = True
    level = _levels(parent)
    holder = np.zeros(m, dtype=np.int64)  # deepest node at or above u that holds a group
    for k in range(1, int(level.max()) + 1):
        nodes = np.flatnonzero(level == k)
        holder[nodes] = np.where(holds[nodes], nodes, holder[parent[nodes]])
    unit = holder[blocks.request_node]  # by position: the node whose own unit it is in
    # A unit's ratio: its decode tokens per prompt token it computes with a block cache that
    # already holds the parent's prefix (and nothing else of its siblings).
    work = (lengths - blocks.lcp).astype(np.float64)
    decode_at = np.concatenate(([0.0], np.cumsum(decode, dtype=np.float64)))
    work_at = np.concatenate(([0.0], np.cumsum(work)))
    outer = blocks.node_depth[np.maximum(parent, 0)] * (parent >= 0)
    tree_work = (work_at[blocks.node_end] - work_at[first]
                 - np.maximum(outer - blocks.lcp[first], 0))
    tree_ratio = (decode_at[blocks.node_end] - decode_at[first]) / np.maximum(tree_work, 1)
    own_size = np.bincount(unit, minlength=m)
    own_work = lengths - np.maximum(blocks.lcp, blocks.node_depth[unit])
    own_ratio = np.bincount(unit, weights=decode, minlength=m) / np.maximum(
        np.bincount(unit, weights=own_work, minlength=m), 1)
    loose = np.flatnonzero(unit == 0)  # the root's own requests: units of one
    tree_at = np.zeros(m, dtype=np.int64)  # where each holding node's subtree starts
    own_at = np.zeros(m, dtype=np.int64)  # where each holding node's own unit starts
    loose_at = np.zeros(n, dtype=np.int64)
    none = np.zeros(0, dtype=np.int64)
    for k in range(1, int(level[holds].max()) + 2):
        # The units at depth k of the tree: subtrees of holding nodes at depth k, own units
        # of holding nodes at depth k - 1, and (under the root) the loose requests.
        subtrees = np.flatnonzero(holds & (level == k))
        owners = np.flatnonzero(holds & (level == k - 1) & (own_size > 0)) if k > 1 else none
        loners = loose if k == 1 else none
        at = _lay_out(
            tree_at,
            within=np.concatenate((parent[subtrees], owners, np.zeros_like(loners))),
            size=np.concatenate((size[subtrees], own_size[owners], np.ones_like(loners))),
            ratio=np.concatenate((tree_ratio[subtrees], own_ratio[owners],
                                  decode[loners] / np.maximum(work[loners], 1)))
            if decode_first else None,
            place=np.concatenate((first[subtrees], first[owners], loners)))
        tree_at[subtrees], own_at[owners], loose_at[loners] = np.split(
            at, [len(subtrees), len(subtrees) + len(owners)])
    # Inside an own unit, requests keep tree order.
    by_unit = np.argsort(unit, kind="stable")
    rank = np.arange(n) - np.searchsorted(unit[by_unit], unit[by_unit], side="left")
    target = np.empty(n, dtype=np.int64)
    target[by_unit] = own_at[unit[by_unit]] + rank
    target[loose] = loose_at[loose]
    run = np.empty(n, dtype=np.int64)
    run[target] = np.arange(n)
    return run


def _lay_out(parent_at: np.ndarray, within: np.ndarray, size: np.ndarray,
            ratio: np.ndarray | None, place: np.ndarray) -> np.ndarray:
    """Where each unit starts: after its parent's start and the siblings before it, which
    are ordered by decreasing ratio (if given), then by tree position."""
    by = np.lexsort((place, within) if ratio is None else (place, -ratio, within))
    before = np.cumsum(size[by]) - size[by]
    first_sibling = np.ones(len(by), dtype=bool)
    first_sibling[1:] = within[by][1:] != within[by][:-1]
    at = np.empty(len(by), dtype=np.int64)
    at[by] = parent_at[within[by]] + before - np.maximum.accumulate(
        np.where(first_sibling, before, 0))
    return at


def _make_groups(group: np.ndarray, prefix: np.ndarray, lengths: np.ndarray,
                 decode: np.ndarray, need: np.ndarray, link: np.ndarray,
                 group_parent: np.ndarray, block_size: int, capacity: int | None
                 ) -> tuple[list[PrefixGroup], np.ndarray, np.ndarray]:
    """Cut the run order (arrays in run order) into PrefixGroups: one per run of a shared
    prefix or of unshared requests, cut further where a group's KV exceeds `capacity`.
    Returns them, and each request's suffix and private blocks (in run order)."""
    n = len(group)
    starts = np.flatnonzero(np.diff(group, prepend=-1))
    ends = np.append(starts[1:], n)[: len(starts)]
    prefix_blocks = prefix // block_size

    def added(link: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Blocks an earlier member (or the prefix) holds already, and the running sum of
        the blocks each member adds."""
        held = np.maximum(prefix_blocks, link)
        return held, np.concatenate(([0], np.cumsum(need - held)))

    held, suffix_sum = added(link)
    if capacity is not None:
        room = capacity - prefix_blocks[starts]
        lost = held - prefix_blocks  # what a member leading a cut group computes again
        cuts = []
        for s, e, r in zip(starts.tolist(), ends.tolist(), room.tolist(), strict=True):
            while suffix_sum[e] - suffix_sum[s] + lost[s] > r and e - s > 1:
                # As many members as fit next to the prefix; at least one.
                cut = int(np.searchsorted(suffix_sum, suffix_sum[s] + r - lost[s],
                                          side="right")) - 1
                s = min(max(cut, s + 1), e)
                cuts.append(s)
        starts = np.sort(np.concatenate((starts, np.array(cuts, dtype=np.int64))))
        ends = np.append(starts[1:], n)[: len(starts)]
        link = link.copy()
        link[starts] = 0
        held, suffix_sum = added(link)
    private = need - np.maximum(held, np.append(link[1:], 0))
    node = group[starts]
    first_of = np.full(len(group_parent), -1, dtype=np.int64)  # first group of each prefix
    first_of[node[::-1]] = np.arange(len(node))[::-1]
    parent = np.where(group_parent[node] > 0, first_of[group_parent[node]], -1)
    decode_sum = np.concatenate(([0], np.cumsum(decode)))
    length_sum = np.concatenate(([0], np.cumsum(lengths)))
    size = ends - starts
    computed = prefix[starts] + length_sum[ends] - length_sum[starts] - prefix[starts] * size
    ratio = (decode_sum[ends] - decode_sum[starts]) / np.maximum(computed, 1)
    kv = prefix_blocks[starts] + suffix_sum[ends] - suffix_sum[starts]
    return [
        PrefixGroup(start=s, end=e, prefix_len=p, prefix_blocks=b, kv_blocks=k, decode_ratio=r,
                    prefix_id=i if i else -1, parent=q)
        for s, e, p, b, k, r, i, q in zip(
            starts.tolist(), ends.tolist(), prefix[starts].tolist(),
            prefix_blocks[starts].tolist(), kv.tolist(), ratio.tolist(), node.tolist(),
            parent.tolist(), strict=True)
    ], need - held, private
