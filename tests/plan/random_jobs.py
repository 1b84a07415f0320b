"""Helpers for the planner tests: flat token buffers and a strategy for jobs that share a lot."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st


def flat(prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """The flat buffers the tree takes: request i is values[offsets[i]:offsets[i + 1]]."""
    offsets = np.zeros(len(prompts) + 1, dtype=np.int64)
    np.cumsum([len(p) for p in prompts], out=offsets[1:])
    values = np.array([t for p in prompts for t in p], dtype=np.int32)
    return values, offsets


def common(a: list[int], b: list[int]) -> int:
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k


@st.composite
def jobs(draw, vocab: int = 3, min_requests: int = 0, max_requests: int = 40) -> list[list[int]]:
    """Prompts that share long prefixes: cuts of a few base prompts plus short tails, over a
    tiny vocabulary, so repeats, prompts that are prefixes of others, and prefixes longer
    than the 16-token hash chunks all happen."""
    tokens = st.integers(0, vocab - 1)
    bases = draw(st.lists(st.lists(tokens, max_size=70), min_size=1, max_size=4))
    prompts = []
    for _ in range(draw(st.integers(min_requests, max_requests))):
        base = draw(st.sampled_from(bases))
        cut = draw(st.integers(0, len(base)))
        prompts.append(base[:cut] + draw(st.lists(tokens, min_size=0 if cut else 1, max_size=12)))
    return prompts
