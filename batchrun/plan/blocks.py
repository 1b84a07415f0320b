"""Whole KV blocks: vLLM caches and allocates by block, so every count of KV work here is
rounded up to `block_size` tokens."""

from __future__ import annotations

from typing import TypeVar

import numpy as np

N = TypeVar("N", int, np.ndarray)


def blocks_for(tokens: N, block_size: int) -> N:
    """Blocks that hold `tokens` tokens (an int, or an array of counts)."""
    return -(-tokens // block_size)
