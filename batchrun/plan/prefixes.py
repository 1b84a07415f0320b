"""How two token sequences relate at their start: the order and the shared prefix the
shards (ingest/shards.py) cut by, and what a shard boundary shares (plan/job_figures.py)."""

from __future__ import annotations

import numpy as np


def compare(a: np.ndarray, b: np.ndarray) -> int:
    """-1, 0 or 1 as token sequence a sorts before, with or after b (a prefix sorts first)."""
    k = shared_prefix(a, b)
    if k < min(len(a), len(b)):
        return -1 if a[k] < b[k] else 1
    return (len(a) > len(b)) - (len(a) < len(b))


def shared_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Tokens a and b share from the start."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


def boundary_reuse(last: np.ndarray | None, first: np.ndarray, block_size: int) -> tuple[int, int]:
    """What the global tree shares across a shard boundary that the shards count twice:
    (distinct tokens, block-ideal tokens). `last` ends one shard, `first` starts the next;
    the figures follow PrefixTree.distinct_tokens and block_ideal_computed_tokens."""
    if last is None:
        return 0, 0
    lcp = shared_prefix(last, first)
    return lcp, max(min(lcp, len(first) - 1), 0) // block_size * block_size
