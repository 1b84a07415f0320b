"""Identical deterministic requests run once; their result serves every copy.

Two requests are identical when their prompt token ids and every setting that shapes the
output (max_tokens, temperature, top_p, seed, stop, constraint, logprobs) are the same.
Their results are then the same only when generation is deterministic: greedy (temperature
0), or sampled with the same explicit seed. Sampled rows without a seed are never merged:
each must draw its own sample.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .prefix_tree import PrefixTree

# Everything that shapes a request's output besides its prompt: (max_tokens, temperature,
# top_p, seed, stop, constraint, logprobs) as ingest/prepare.py builds it.
SamplingKey = tuple


@dataclass(frozen=True)
class Duplicates:
    """Which requests run, and which identical requests each one's result also serves."""

    runs: np.ndarray  # int64: request indices that run, ascending (the first of each set)
    copies: dict[int, list[int]]  # a running request index -> indices of its copies


def is_deterministic(temperature: float, seed: int | None) -> bool:
    return temperature == 0 or seed is not None


def find_duplicates(tree: PrefixTree,
                    key_of: Callable[[int], SamplingKey | None]) -> Duplicates:
    """Group the requests of `tree` whose prompts are equal and whose sampling keys
    (`key_of(i)`) are equal; a None key (non-deterministic sampling) is never merged.

    Equal prompts are neighbours in the tree's order, sharing all of both: only those
    requests are asked their key, so a job of distinct prompts costs no Python per row."""
    lengths = tree.lengths[tree.order]
    same = np.zeros(len(lengths), dtype=bool)  # position k holds its predecessor's prompt
    same[1:] = (tree.lcp[1:] == lengths[1:]) & (lengths[1:] == lengths[:-1]) & (lengths[1:] > 0)
    starts = np.flatnonzero(~same)
    sizes = np.diff(np.append(starts, len(same)))
    is_copy = np.zeros(len(lengths), dtype=bool)
    copies: dict[int, list[int]] = {}
    for start, size in zip(starts[sizes > 1].tolist(), sizes[sizes > 1].tolist(), strict=True):
        first_of: dict[SamplingKey, int] = {}
        for i in np.sort(tree.order[start:start + size]).tolist():
            key = key_of(i)
            if key is None:
                continue
            first = first_of.setdefault(key, i)
            if first != i:
                copies.setdefault(first, []).append(i)
                is_copy[i] = True
    return Duplicates(np.flatnonzero(~is_copy), copies)
