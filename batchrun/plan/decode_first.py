"""Decode-heavy work first, across prefix groups (BatchLLM's reordering).

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

from dataclasses import replace
from typing import Any, TypeVar

import numpy as np

HEAVY_FACTOR = 4

G = TypeVar("G", bound=Any)  # a run group: members, suffix/private/decode blocks per member


def decode_heavy_first(groups: list[G], max_tokens: np.ndarray) -> list[G]:
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


def _part(group: G, keep: np.ndarray) -> G:
    return replace(group, members=group.members[keep], suffix_blocks=group.suffix_blocks[keep],
                   private_blocks=group.private_blocks[keep],
                   decode_blocks=group.decode_blocks[keep])
