"""The global prefix tree: one compact radix tree over the prompt tokens of every request.

The whole job is known before it starts, so the tree is built in bulk rather than by
inserting requests one at a time: sort the requests lexicographically and take the longest
common prefix (LCP) of each pair of neighbours. That sorted order is a depth-first order of the
trie, and the LCP array is the whole tree: the internal nodes are the LCP intervals (maximal
runs of neighbours that share at least `d` tokens, with some pair sharing exactly `d`).

Sorting a million ~600-token prompts token by token in numpy is too slow, so the sort jumps
over shared prefixes with hashes and only looks at single tokens where requests branch:

1. Every full 16-token chunk of every request gets a 64-bit hash (the 16 tokens times random
   weights, via one small integer matmul), mixed with the chunk's index and summed per
   request into prefix hashes: `prefix_hash[i][k]` covers the first 16 * (k + 1) tokens.
2. A multikey quicksort on whole prefixes (`_sort`): each group of requests known to share a
   prefix takes a pivot and finds, for every member, the depth where it leaves the pivot's
   path (binary search over prefix hashes, then an exact token compare inside one chunk) and
   the token there. That places every member relative to the pivot; members leaving at the
   same depth with the same token form the groups of the next round. All groups of a round
   are one vectorised step, and rounds are about as many as the levels where requests
   branch (system prompt, document, question: a handful), not tokens.

The order and the LCPs are exact token comparisons except where two different 16-token-
aligned prefixes get the same 64-bit prefix hash (a chance near 2**-40 for a million prompts).
Token ids are only compared, never looked up, so any int32 ids work.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

CHUNK = 16  # tokens per hashed chunk: 64 bytes, one cache line per gathered chunk

# Two lanes of 32-bit weights give a 64-bit chunk hash; the matmul wraps mod 2**32 per lane.
_WEIGHTS = (np.random.default_rng(0x5EED).integers(1, 2**31, size=(CHUNK, 2)) | 1).astype(
    np.int32
)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_MAX_LEN = 2**31 - 1  # prompts are shorter than this (int32 token counts)
_HASH_BLOCK_CHUNKS = 1 << 17  # chunks hashed per task: keeps the per-task temporaries small
_BLOCK = 1 << 15  # pairs compared at a time


@dataclass(frozen=True, eq=False)
class PrefixTree:
    """A compact radix tree over the token ids of all requests, as flat arrays.

    Requests are named by their index i (tokens `values[offsets[i]:offsets[i + 1]]`);
    "position" means a place in `order`. Node 0 is the root (depth 0, every request). Nodes
    are numbered in pre-order; node u covers the requests `order[node_start[u]:node_end[u]]`,
    all of which share their first `node_depth[u]` tokens. Only branching points (and
    prompts that end where others go on) are nodes: chains are compressed.
    """

    order: np.ndarray  # int64 [n]: requests in lexicographic order (a DFS order of the trie)
    lcp: np.ndarray  # int64 [n]: lcp[k] = shared prefix of order[k - 1] and order[k]; lcp[0] = 0
    lengths: np.ndarray  # int64 [n]: prompt length of each request (by request index)
    node_depth: np.ndarray  # int64 [nodes]: tokens from the root to the node
    node_parent: np.ndarray  # int64 [nodes]: parent node; -1 for the root
    node_start: np.ndarray  # int64 [nodes]: first position under the node
    node_end: np.ndarray  # int64 [nodes]: one past the last position under the node
    request_node: np.ndarray  # int64 [n]: deepest node holding each position's request

    @classmethod
    def build(cls, values: np.ndarray, offsets: np.ndarray,
              keys: np.ndarray | None = None) -> PrefixTree:
        """The tree of all requests: request i is `values[offsets[i]:offsets[i + 1]]`.

        `keys` (int32 per request, e.g. its LoRA adapter's, plan/adapters.py): requests
        with different keys share nothing, however alike their tokens; the order sorts by
        key first."""
        order, lcp = sorted_order(values, offsets, keys)
        return cls.from_lcp(order, lcp, np.diff(np.asarray(offsets, dtype=np.int64)))

    @classmethod
    def from_lcp(cls, order: np.ndarray, lcp: np.ndarray, lengths: np.ndarray) -> PrefixTree:
        """The tree whose DFS order is `order` and whose neighbour LCPs are `lcp`."""
        depth, parent, start, end, request_node = _lcp_intervals(lcp)
        return cls(order, lcp, lengths, depth, parent, start, end, request_node)

    def subset(self, keep: np.ndarray) -> PrefixTree:
        """The tree of requests `keep` (ascending indices) alone, renumbered 0..len(keep)-1:
        the same order, and between new neighbours the least LCP of the old ones between
        them (an LCP of two sorted prompts is the minimum over the pairs between them)."""
        renumber = np.full(len(self.lengths), -1, dtype=np.int64)
        renumber[keep] = np.arange(len(keep))
        at = np.flatnonzero(renumber[self.order] >= 0)  # kept positions, ascending
        lcp = np.zeros(len(at), dtype=self.lcp.dtype)
        if len(at) > 1:
            lcp[1:] = np.minimum.reduceat(self.lcp[:at[-1] + 1], at[:-1] + 1)
        return PrefixTree.from_lcp(renumber[self.order[at]], lcp, self.lengths[keep])

    @property
    def num_requests(self) -> int:
        return len(self.order)

    @property
    def num_nodes(self) -> int:
        return len(self.node_depth)

    @property
    def prompt_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def distinct_tokens(self) -> int:
        """Trie nodes, i.e. distinct prefixes: the prefill work if each is computed once."""
        return self.prompt_tokens - int(self.lcp.sum())

    def block_ideal_computed_tokens(self, block_size: int) -> int:
        """Prompt tokens computed with a perfect block-granular prefix cache, in tree order.

        Each request reuses what it shares with its predecessor (in lexicographic order that
        is the most it shares with any earlier request), rounded down to whole blocks. Like
        vLLM it recomputes at least its last token, so a repeated prompt is not free.
        """
        reusable = np.minimum(self.lcp, self.lengths[self.order] - 1)
        reused = np.maximum(reusable, 0) // block_size * block_size
        return self.prompt_tokens - int(reused.sum())

    def coarsen(self, block_size: int) -> PrefixTree:
        """The same requests and order, sharing counted in whole cacheable blocks only.

        Two neighbours share `floor(min(lcp, len_a - 1, len_b - 1) / block_size)` blocks:
        a prefix cache hands out whole blocks, and never a request's last token. Nodes whose
        depth rounds to their parent's disappear, so this is the tree a planner works on.
        """
        lens = self.lengths[self.order]
        shared = self.lcp.copy()
        if len(shared) > 1:
            shared[1:] = np.minimum(shared[1:], np.minimum(lens[1:], lens[:-1]) - 1)
        blocked = np.maximum(shared, 0) // block_size * block_size
        return PrefixTree.from_lcp(self.order, blocked, self.lengths)


def sorted_order(values: np.ndarray, offsets: np.ndarray,
                 keys: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The requests in lexicographic order, and each one's LCP with its predecessor: the
    tree's `order` and `lcp`, without its nodes (all a sort needs). With `keys`: the order
    of each prompt behind its key, then the key taken off again (one LCP less wherever
    neighbours share their key)."""
    if keys is not None and np.any(keys):
        order, lcp = sorted_order(*keyed_tokens(values, offsets, keys))
        return order, np.maximum(lcp - 1, 0)
    if values.dtype != np.int32 and len(values):
        info = np.iinfo(np.int32)
        if values.min() < info.min or values.max() > info.max:
            raise ValueError("token ids must fit in int32")
    values = np.ascontiguousarray(values, dtype=np.int32)
    offsets = np.ascontiguousarray(offsets, dtype=np.int64)
    lengths = np.diff(offsets)
    if len(offsets) == 0 or offsets[0] != 0 or offsets[-1] > len(values) or (lengths < 0).any():
        raise ValueError("offsets must start at 0, never decrease and stay within values")
    return _sort(_PrefixHashes(values, offsets, lengths))


def keyed_tokens(values: np.ndarray, offsets: np.ndarray,
                 keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets) of each request's tokens behind its key: [key, *tokens]."""
    offsets = np.asarray(offsets, dtype=np.int64)
    n = len(offsets) - 1
    out = np.empty(len(values) + n, dtype=np.int32)
    starts = offsets[:-1] + np.arange(n)
    out[starts] = keys
    body = np.ones(len(out), dtype=bool)
    body[starts] = False
    out[body] = values[offsets[0]:offsets[-1]] if n else values[:0]
    return out, offsets - offsets[0] + np.arange(n + 1)


class _PrefixHashes:
    """Prefix hashes at every 16-token boundary of every request, for fast exact LCPs."""

    def __init__(self, values: np.ndarray, offsets: np.ndarray, lengths: np.ndarray) -> None:
        self.values = values
        self.starts = offsets[:-1]
        self.lengths = lengths
        full = lengths // CHUNK
        # chunk_base[i] + k is where request i's prefix hash over k full chunks lives (k >= 1).
        first = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(full, out=first[1:])
        self.chunk_base = first[:-1] - 1
        self.prefix = np.empty(int(first[-1]), dtype=np.uint64)
        # Whole requests per task, about _HASH_BLOCK_CHUNKS chunks each. numpy releases the GIL
        # in the gather, matmul and cumsum, so threads use every core.
        cuts = np.unique(np.searchsorted(first, np.arange(0, first[-1], _HASH_BLOCK_CHUNKS)))
        bounds = np.append(cuts, len(lengths))
        tasks = list(zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True))
        workers = min(len(tasks), os.cpu_count() or 1)
        if workers > 1:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(lambda t: self._hash_requests(first, *t), tasks))
        else:
            for t in tasks:
                self._hash_requests(first, *t)

    def _hash_requests(self, first: np.ndarray, i0: int, i1: int) -> None:
        full = self.lengths[i0:i1] // CHUNK
        local_first = first[i0:i1] - first[i0]
        m = int(first[i1] - first[i0])
        if m == 0:
            return
        index = np.arange(m, dtype=np.int64) - np.repeat(local_first, full)  # k-th of its request
        rows = _windows(self.values)[np.repeat(self.starts[i0:i1], full) + index * CHUNK]
        lanes = rows.view(np.int32).reshape(m, CHUNK) @ _WEIGHTS
        h = lanes.view(np.uint64).ravel()
        # The chunk's index in its request goes into the mix, so the sum of mixed chunk hashes
        # depends on the order of the chunks, not just on which chunks occur.
        h += index.astype(np.uint64) * _GOLDEN
        h ^= h >> np.uint64(31)
        h *= _MIX1
        h ^= h >> np.uint64(29)
        h *= _MIX2
        h ^= h >> np.uint64(32)
        np.cumsum(h, out=h)
        before = np.concatenate(([np.uint64(0)], h))[local_first]
        h -= np.repeat(before, full)
        self.prefix[first[i0] : first[i1]] = h

    def lcp(self, a: np.ndarray, b: np.ndarray, known: np.ndarray) -> np.ndarray:
        """Exact LCP of requests a[j] and b[j], given they share at least known[j] tokens."""
        most = np.minimum(self.lengths[a], self.lengths[b])
        # Largest number of whole chunks with equal prefix hashes: a binary search over the
        # pairs still open, compacted as they close. The first probe is the next chunk:
        # most pairs part soon after what they are known to share (different system prompts).
        chunks, hi = known // CHUNK, most // CHUNK
        todo = np.flatnonzero(chunks < hi)
        lo, hi = chunks[todo], hi[todo]
        base_a, base_b = self.chunk_base[a[todo]], self.chunk_base[b[todo]]
        mid = lo + 1
        while len(todo):
            same = self.prefix[base_a + mid] == self.prefix[base_b + mid]
            lo = np.where(same, mid, lo)
            hi = np.where(same, hi, mid - 1)
            still = lo < hi
            if not still.all():
                chunks[todo[~still]] = lo[~still]
                todo, lo, hi = todo[still], lo[still], hi[still]
                base_a, base_b = base_a[still], base_b[still]
            mid = (lo + hi + 1) >> 1
        # Then the first differing token inside the next chunk, compared exactly, in blocks
        # small enough to stay in cache (fresh large temporaries cost page faults).
        done = chunks * CHUNK
        at_a, at_b = self.starts[a] + done, self.starts[b] + done
        for s in range(0, len(done), _BLOCK):
            e = s + _BLOCK
            differ = _rows(self.values, at_a[s:e]) != _rows(self.values, at_b[s:e])
            differ |= np.arange(CHUNK) >= (most[s:e] - done[s:e])[:, None]
            done[s:e] += np.where(differ.any(axis=1), differ.argmax(axis=1), CHUNK)
        return np.minimum(done, most)

    def token_keys(self, requests: np.ndarray, depth: np.ndarray) -> np.ndarray:
        """Sort keys for the token at `depth`: 0 if the request ends there, else 1 + the
        token's rank among all int32 values (so ids sort as signed integers)."""
        if not len(self.values):  # only empty prompts: each ends at once (nothing to index)
            return np.zeros(len(requests), np.int64)
        has = self.lengths[requests] > depth
        where = np.where(has, self.starts[requests] + depth, 0)
        tokens = self.values[where].astype(np.int64) + (2**31 + 1)
        return np.where(has, tokens, 0)


def _windows(values: np.ndarray) -> np.ndarray:
    """values[p : p + CHUNK] as one 64-byte item per start p, without copying.

    Gathering whole 64-byte items is several times faster than fancy-indexing 16 int32 per
    row (benchmarks/README.md, "Planner scale").
    """
    count = max(len(values) - CHUNK + 1, 0)
    return np.ndarray((count,), dtype=f"V{4 * CHUNK}", buffer=values, strides=(4,))


def _rows(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """values[s : s + CHUNK] for each start s as [len(starts), CHUNK]; entries past the end
    of values are filler that callers mask out by length."""
    last = len(values) - CHUNK
    if last < 0:  # shorter than one chunk: gather token by token
        span = np.minimum(starts[:, None] + np.arange(CHUNK), max(len(values) - 1, 0))
        return values[span] if len(values) else np.zeros((len(starts), CHUNK), np.int32)
    rows = _windows(values)[np.minimum(starts, last)].view(np.int32).reshape(-1, CHUNK)
    tail = np.flatnonzero(starts > last)  # the last few tokens of the buffer
    rows[tail] = values[np.minimum(starts[tail, None] + np.arange(CHUNK), len(values) - 1)]
    return rows


def _sort(hashes: _PrefixHashes) -> tuple[np.ndarray, np.ndarray]:
    """Lexicographic order of all requests (ties by index) and the LCP of each neighbour pair.

    A multikey quicksort on whole prefixes, in rounds. Each round takes every group of
    requests known to share a prefix (positions [start, end) of `order`, sharing `known`
    tokens), places each member against the group's pivot (`_place_members`), settles the
    LCPs that placing decides, and hands on the runs of members still tied as the next
    round's groups. All groups of a round are vectorised together; rounds are about as many
    as the levels where requests branch (system prompt, document, question), not tokens.

    E.g. [a b c], [a b d], [a x], [a b c] with pivot [a b c] (a longest member): [a x] leaves
    at depth 1 with x > b; [a b d] at depth 2 with d > c; the repeat [a b c] stays with the
    pivot. Order: pivot and repeat (LCP 3 between them), then the deep branch [a b d], then
    the shallow one [a x]; LCPs 3, 2, 1. Nobody is left tied: one round.
    """
    n = len(hashes.lengths)
    order = np.arange(n, dtype=np.int64)
    lcp = np.zeros(n, dtype=np.int64)
    start = np.zeros(1 if n > 1 else 0, dtype=np.int64)
    end = np.full(len(start), n, dtype=np.int64)
    known = np.zeros(len(start), dtype=np.int64)
    while len(start):
        round_ = _Round.of(order, start, end)
        key, token, branch = _place_members(hashes, round_, known)
        by_key = np.lexsort((token, key))  # stable: repeats stay in request order
        key, token, branch = key[by_key], token[by_key], branch[by_key]
        pos = round_.positions
        order[pos] = round_.members[by_key]
        new_run = np.ones(len(key), dtype=bool)
        new_run[1:] = (key[1:] != key[:-1]) | (token[1:] != token[:-1])
        # Two members that leave the pivot's path at different depths share the shallower
        # one; at the same depth they share exactly that depth. A run whose members end at
        # their branch depth is one prompt repeated.
        settled = np.flatnonzero(new_run & ~round_.first_of_group)
        lcp[pos[settled]] = np.minimum(branch[settled - 1], branch[settled])
        repeats = ~new_run & (token == 0)
        lcp[pos[repeats]] = branch[repeats]
        run_start = np.flatnonzero(new_run)
        run_size = np.diff(np.append(run_start, len(key)))
        goes_on = (run_size > 1) & (token[run_start] != 0)
        start = pos[run_start[goes_on]]
        end = start + run_size[goes_on]
        known = branch[run_start[goes_on]] + 1
    return order, lcp


@dataclass(frozen=True)
class _Round:
    """The members of one sorting round's groups, laid end to end: member j is at position
    `positions[j]` of the order, request `members[j]`, in group `group[j]`, whose members
    start at `group_at[group[j]]`. E.g. groups [0, 3) and [5, 7): positions [0 1 2 5 6],
    group [0 0 0 1 1], group_at [0 3]."""

    positions: np.ndarray
    members: np.ndarray
    group: np.ndarray
    group_at: np.ndarray
    first_of_group: np.ndarray  # bool per member

    @classmethod
    def of(cls, order: np.ndarray, start: np.ndarray, end: np.ndarray) -> _Round:
        sizes = end - start
        group_at = np.cumsum(sizes) - sizes
        first_of_group = np.zeros(int(sizes.sum()), dtype=bool)
        first_of_group[group_at] = True
        group = np.cumsum(first_of_group) - 1
        positions = start[group] + np.arange(len(group)) - group_at[group]
        return cls(positions, order[positions], group, group_at, first_of_group)


def _place_members(hashes: _PrefixHashes, round_: _Round,
                   known: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each member's place against its group's pivot (the group's longest member): the depth
    `branch` where it leaves the pivot's path, the sort key of its token there, and a sort
    key that puts members leaving below the pivot's token first (shallow branches first),
    then the pivot and its repeats, then members leaving above it (deep branches first).
    The longest pivot settles a chain of prompts that extend each other (multi-turn chats)
    in one round."""
    members, group, group_at = round_.members, round_.group, round_.group_at
    length = hashes.lengths[members]
    longest = np.flatnonzero(length == np.maximum.reduceat(length, group_at)[group])
    pivot = members[longest[np.unique(group[longest], return_index=True)[1]]][group]
    branch = hashes.lcp(pivot, members, known[group])
    token = hashes.token_keys(members, branch)
    side = np.sign(token - hashes.token_keys(pivot, branch))  # -1 below, 0 the pivot, +1 above
    place = np.where(side < 0, branch, np.where(side > 0, _MAX_LEN - branch, 0))
    key = (group << 33) | ((side + 1) << 31) | place
    return key, token, branch


def _lcp_intervals(lcp: np.ndarray) -> tuple[np.ndarray, ...]:
    """The compact tree of an LCP array: node depth, parent, start, end; and each position's
    deepest node. Node 0 is the root; the others are numbered in pre-order.

    A position k with lcp[k] = v > 0 lies in the node [psv, nsv) of depth v, where psv is the
    last position before k with a smaller LCP and nsv the first one after it. Both come from
    a binary descent over a sparse table of range minima (log2(n) vectorised steps).
    """
    n = len(lcp)
    ext = np.full(n + 1, -1, dtype=np.int32)  # sentinels: position 0 and n share nothing
    ext[1:n] = lcp[1:]
    at = np.flatnonzero(ext > 0)
    v = ext[at]
    mins = [ext]  # mins[s][i] = min(ext[i : i + 2**s])
    while 2 ** len(mins) <= n + 1:
        half = 2 ** (len(mins) - 1)
        mins.append(np.minimum(mins[-1][:-half], mins[-1][half:]))
    left, right = at.copy(), at.copy()  # ext >= v on [left, right]; widen while it holds
    for s in range(len(mins) - 1, -1, -1):
        step, table = 2**s, mins[s]
        lo = left - step
        left = np.where((lo >= 0) & (table[np.maximum(lo, 0)] >= v), lo, left)
        hi = right + 1
        right += np.where((hi < len(table)) & (table[np.minimum(hi, len(table) - 1)] >= v),
                          step, 0)
    psv, nsv = left - 1, right + 1
    # Positions of one node share (psv, depth); sorting by that pair numbers nodes in
    # pre-order (a node starts no later than its descendants and is shallower).
    key = psv * (int(v.max(initial=0)) + 1) + v.astype(np.int64)
    _, first, node_of = np.unique(key, return_index=True, return_inverse=True)
    depth = np.concatenate(([0], v[first]))
    start = np.concatenate(([0], psv[first]))
    end = np.concatenate(([n], nsv[first]))
    node_at = np.zeros(n + 1, dtype=np.int64)  # node of each position's left-neighbour LCP
    node_at[at] = node_of.reshape(-1) + 1
    # The parent's depth is the larger LCP just outside the node; that position is in it.
    outer_left, outer_right = ext[start[1:]], ext[end[1:]]
    via = np.where(outer_left >= outer_right, start[1:], end[1:])
    parent = np.concatenate(([-1], np.where(np.maximum(outer_left, outer_right) > 0,
                                            node_at[via], 0)))
    # A request's deepest node is the deeper of the nodes of its two neighbour LCPs.
    request_node = np.where(ext[:n] >= ext[1:], node_at[:n], node_at[1:])
    return depth, parent, start, end, request_node
