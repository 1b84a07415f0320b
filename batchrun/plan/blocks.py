"""Whole KV blocks: vLLM caches and allocates by block, so every count of KV work here is
rounded up to `block_size` tokens. And the rounding up itself (`ceil_div`), for any count."""

from __future__ import annotations

from typing import TypeVar

import numpy as np

N = TypeVar("N", int, np.ndarray)


def ceil_div(n: N, d: int) -> N:
    """n / d rounded up (an int, or an array of them): the d-sized pieces that hold n."""
    return -(-n // d)


def blocks_for(tokens: N, block_size: int) -> N:
    """Blocks that hold `tokens` tokens (an int, or an array of counts)."""
    return ceil_div(tokens, block_size)


def round_up(n: int, multiple: int) -> int:
    """n rounded up to a multiple of `multiple`: tokens to whole blocks, bytes to whole KV
    blocks."""
    return ceil_div(n, multiple) * multiple
