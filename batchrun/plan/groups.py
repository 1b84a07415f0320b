"""The plan as the executor runs it: groups of requests that share a prefix (RunGroup), in
run order, with the KV blocks each member adds.

`make_groups` turns a RequestOrder (plan/schedule.py) into RunGroups, cut to the engine's
KV cache, and then moves decode-heavy work first:

Decode-heavy work first, across prefix groups (BatchLLM's reordering).

The plan keeps each prefix's requests together, which is what a prefix cache needs, and
ranks sibling subtrees by their decode/prompt ratio. Inside a group, though, a few requests
may ask for far more tokens than the rest (an essay among one-word answers). Run in place,
their long decodes start late and run nearly alone at the tail of the job. So every group's
decode-heavy members are pulled out and run first, each group's heavy part keeping that
group's prefix; the light parts follow in plan order. A group's prefix then serves its heavy
part first and its light part later: while the heavy part runs, the prefix stays held and
cached; should it be released before the light part starts, the light part computes it once
more (one leader, then the rest).

Heavy: max_tokens at least HEAVY_FACTOR times the job's median max_tokens. A job whose
requests all ask for about the same keeps its plan unchanged. Members that share blocks with
each other beyond the prefix (a chat's turns) stay in place: taking one out would break the
chain they share.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .blocks import blocks_for
from .schedule import RequestOrder

HEAVY_FACTOR = 4


@dataclass(eq=False)  # identity: groups hold arrays, and a deque removes by ==
class RunGroup:
    """Requests that run together because they share a prefix (prefix_len 0: they share none)."""

    members: np.ndarray  # request indices in run order
    prefix_len: int
    prefix_blocks: int
    suffix_blocks: np.ndarray  # KV blocks each member adds: beyond the prefix and its elders'
    prefix_id: int = -1  # groups cut from one prefix's requests (to fit the KV cache) share it
    parent_id: int = -1  # prefix_id of the shared prefix this group's prefix extends, if any
    # Of each member's suffix blocks, those no other member uses: free when it finishes (the
    # rest when the group does). None: all of them.
    private_blocks: np.ndarray | None = None
    # Of each member's private blocks, those its max_tokens of decoding would fill. None: 0.
    decode_blocks: np.ndarray | None = None
    # The nearest shorter prefix this group's prefix shares with other groups (a branching
    # node of the prefix tree, whether a group or not): -1 if none. The first leader under it
    # computes it; sibling leaders wait one step instead of computing it again beside it.
    shared_above_id: int = -1

    def __post_init__(self) -> None:
        if self.private_blocks is None:
            self.private_blocks = self.suffix_blocks
        if self.decode_blocks is None:
            self.decode_blocks = np.zeros_like(self.suffix_blocks)


def make_groups(order: RequestOrder | None, lengths: np.ndarray, max_tokens: np.ndarray,
                block_size: int, kv_capacity_tokens: int | None) -> tuple[
        list[RunGroup], dict[str, Any]]:
    """The RunGroups of requests with prompt `lengths` and `max_tokens`, and the plan's
    figures for the summary. `order` None: unplanned, one group in input order."""
    # Blocks a request's decoding adds beyond its prompt's, were it to use all its max_tokens.
    decode = blocks_for(lengths + max_tokens, block_size) - blocks_for(lengths, block_size)
    if order is None or len(lengths) == 0:
        blocks = blocks_for(lengths + max_tokens, block_size)
        return ([RunGroup(np.arange(len(lengths)), 0, 0, blocks, decode_blocks=decode)],
                {"planned": False})
    plan = order.plan(kv_capacity_tokens)
    groups = []
    for g in plan.groups:
        members = plan.order[g.start:g.end]
        groups.append(RunGroup(members, g.prefix_len, g.prefix_blocks,
                               plan.suffix_blocks[members], g.prefix_id,
                               plan.groups[g.parent].prefix_id if g.parent >= 0 else -1,
                               plan.private_blocks[members], decode[members],
                               g.shared_above))
    return decode_heavy_first(groups, max_tokens), {"planned": True, **plan.stats.to_dict()}


def longest_first(lengths: np.ndarray, max_tokens: np.ndarray, block_size: int) -> tuple[
        list[RunGroup], dict[str, Any]]:
    """The plan of an embedding job: one group, longest input first. Embeddings decode
    nothing and vLLM runs its pooling models without a prefix cache, so prefix order buys
    nothing; sorting by length keeps each engine step's inputs alike and leaves no long input
    alone at the end."""
    order = np.argsort(-lengths, kind="stable")
    blocks = blocks_for(lengths[order] + max_tokens[order], block_size)
    return [RunGroup(order, 0, 0, blocks)], {"planned": False, "order": "longest first"}


def decode_heavy_first(groups: list[RunGroup], max_tokens: np.ndarray) -> list[RunGroup]:
    """The groups reordered: the heavy parts of all groups first, then the rest."""
    if not len(max_tokens):
        return groups
    threshold = HEAVY_FACTOR * float(np.median(max_tokens))
    heavy_parts, light_parts = [], []
    for g in groups:
        heavy = max_tokens[g.members] >= threshold
        chained = (g.suffix_blocks != g.private_blocks).any()
        if not heavy.any() or chained:
            light_parts.append(g)
        elif heavy.all():
            heavy_parts.append(g)
        else:
            heavy_parts.append(_part(g, heavy))
            light_parts.append(_part(g, ~heavy))
    return heavy_parts + light_parts if heavy_parts else groups


def _part(group: RunGroup, keep: np.ndarray) -> RunGroup:
    return replace(group, members=group.members[keep], suffix_blocks=group.suffix_blocks[keep],
                   private_blocks=group.private_blocks[keep],
                   decode_blocks=group.decode_blocks[keep])
