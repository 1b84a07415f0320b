"""Identical deterministic requests run once; their result serves every copy.

Two requests are identical when their prompt token ids and every setting that shapes the
output (max_tokens, temperature, top_p, seed, stop, constraint, logprobs) are the same.
Their results are then the same only when generation is deterministic: greedy (temperature
0), or sampled with the same explicit seed. Sampled rows without a seed are never merged:
each must draw its own sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

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


def find_duplicates(values: np.ndarray, offsets: np.ndarray,
                    sampling: Sequence[SamplingKey | None]) -> Duplicates:
    """Group requests `values[offsets[i]:offsets[i + 1]]` with equal sampling keys; a None
    key (non-deterministic sampling) is never merged."""
    first_of: dict[tuple[bytes, SamplingKey], int] = {}
    copies: dict[int, list[int]] = {}
    runs = []
    for i, key in enumerate(sampling):
        if key is None:
            runs.append(i)
            continue
        identity = (values[offsets[i]:offsets[i + 1]].tobytes(), key)
        first = first_of.setdefault(identity, i)
        if first == i:
            runs.append(i)
        else:
            copies.setdefault(first, []).append(i)
    return Duplicates(np.asarray(runs, dtype=np.int64), copies)
