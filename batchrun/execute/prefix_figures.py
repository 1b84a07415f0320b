"""A shard's largest shared prefixes as a tree, sized by the prompt tokens sharing saves:
the report's prefix-plan chart."""

from __future__ import annotations

from ..plan.groups import RunGroup

LARGEST = 60  # prefixes kept per shard (and for the job): a readable chart, a small file


def largest_prefixes(groups: list[RunGroup], limit: int = LARGEST) -> list[dict[str, int]]:
    """The shared prefixes saving the most tokens, each {id, parent, tokens, requests,
    saved}: `tokens` its length, `requests` the requests that start with it (nested
    prefixes' included), `saved` the prompt tokens computed once instead of once per such
    request (its nested prefixes' savings included, so a parent is never smaller than its
    children). A kept prefix's parent is -1 unless the parent is kept too."""
    length: dict[int, int] = {}
    parent: dict[int, int] = {}
    members: dict[int, int] = {}
    for g in groups:
        if g.prefix_len <= 0 or g.prefix_id < 0:
            continue
        length[g.prefix_id] = g.prefix_len
        parent.setdefault(g.prefix_id, g.parent_id)
        members[g.prefix_id] = members.get(g.prefix_id, 0) + len(g.members)
    # Parents are shorter than their children: longest first sums every subtree bottom up.
    requests, saved = dict(members), dict.fromkeys(members, 0)
    for pid in sorted(length, key=length.__getitem__, reverse=True):
        up = parent[pid] if parent[pid] in length else -1
        own = length[pid] - (length[up] if up >= 0 else 0)
        saved[pid] += max(requests[pid] - 1, 0) * own
        if up >= 0:
            requests[up] += requests[pid]
            saved[up] += saved[pid]
    kept = sorted(saved, key=saved.__getitem__, reverse=True)[:limit]
    chosen = set(kept)
    return [{"id": pid, "parent": parent[pid] if parent[pid] in chosen else -1,
             "tokens": length[pid], "requests": requests[pid], "saved": saved[pid]}
            for pid in kept]
