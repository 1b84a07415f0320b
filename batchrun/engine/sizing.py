"""Engine settings sized from the job, before the engine starts.

batchrun knows every request's length and max_tokens before vLLM starts, so it does not have
to take vLLM's platform-wide defaults, which are sized for a server that could receive
anything: a context length of the model's full 8,192 tokens (which a small KV cache then
refuses to serve) and, on CPU, a KV cache of most of the machine's memory (15 GB for a 40-row
job). Instead:

- max_model_len: the job's longest request (prompt + that row's max_tokens), rounded up to a
  KV block; never above the model's context (or the user's cap), never below what a row needs.
- KV cache on CPU, unless the user set one: the most KV the plan can keep busy at once (its
  peak window of `max_num_seqs` consecutive requests in run order, shared prefixes once) plus
  headroom, at least one longest request, and at most a share of the memory free at start,
  so that a second job or replica still fits beside this one. On GPUs the KV cache is vLLM's
  own (gpu_memory_utilization): the card's memory serves nothing else.

One place computes these figures: a run (job/engine_setup.py, before starting vLLM) and
`batchrun plan` both call `size_engine`, so a plan and the run it describes agree.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..plan.blocks import ceil_div, round_up
from .lora import LoraSettings

# Headroom over the plan's peak window: the window is an estimate (vLLM allocates a block
# ahead at block boundaries, and a chunked prefill may hold blocks a little longer).
WINDOW_HEADROOM = 1.25
# Share of the memory available at start one job's KV cache may take: two jobs (or two
# replicas) started one after the other both fit, the second sizing itself to what is left.
MAX_SHARE_OF_FREE_MEMORY = 0.4
# vLLM's scheduler default on CPU (EngineArgs: 256 sequences for the LLM class).
DEFAULT_MAX_NUM_SEQS = 256


@dataclass(frozen=True)
class LongestRequest:
    index: int  # tokenized request index
    row_id: str
    prompt_tokens: int
    max_tokens: int

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.max_tokens


@dataclass(frozen=True)
class EngineSizing:
    """The engine settings derived from a job, and why."""

    block_size: int
    max_model_len: int
    max_model_len_reason: str
    kv_cache_memory: int | None  # bytes to ask vLLM for; None: vLLM's own default
    kv_cache_reason: str
    kv_bytes_per_token: int  # 0 where unknown (the fake engine)
    window_tokens: int  # KV the plan can keep busy at once (0: not computed)
    lora: LoraSettings | None = None  # the job's adapters and their slots (engine/lora.py)

    @property
    def kv_capacity_tokens(self) -> int | None:
        """Tokens the KV cache holds, whole blocks only (as vLLM allocates it)."""
        if not self.kv_cache_memory or not self.kv_bytes_per_token:
            return None
        blocks = self.kv_cache_memory // (self.kv_bytes_per_token * self.block_size)
        return int(blocks) * self.block_size

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_model_len": self.max_model_len,
            "max_model_len_reason": self.max_model_len_reason,
            "kv_cache_memory": self.kv_cache_memory,
            "kv_cache_memory_mib": round(self.kv_cache_memory / 2**20, 1)
            if self.kv_cache_memory else None,
            "kv_capacity_tokens": self.kv_capacity_tokens,
            "kv_cache_reason": self.kv_cache_reason,
            "window_tokens": self.window_tokens,
            **({"lora": self.lora.to_dict()} if self.lora is not None else {}),
        }


def longest_request(lengths: np.ndarray, max_tokens: np.ndarray,
                    row_id: Callable[[int], str]) -> LongestRequest | None:
    """The request needing the most KV on its own (prompt + max_tokens)."""
    if not len(lengths):
        return None
    i = int(np.argmax(lengths + max_tokens))
    return LongestRequest(i, row_id(i), int(lengths[i]), int(max_tokens[i]))


def job_max_model_len(longest: LongestRequest | None, block_size: int,
                      context: int) -> tuple[int, str]:
    """The context length the job needs, capped by the model's (or the user's) context."""
    if longest is None:
        return context, "no request left to run: the model's context"
    need = round_up(longest.tokens, block_size)
    if need >= context:
        return context, "the model's context (the longest request needs all of it)"
    return need, (f"the job's longest request, id {longest.row_id!r}: {longest.prompt_tokens:,}"
                  f" prompt + {longest.max_tokens:,} max_tokens, rounded up to a "
                  f"{block_size}-token block")


def peak_window_tokens(order_blocks: np.ndarray, group_of: np.ndarray,
                       group_prefix_blocks: np.ndarray, window: int, block_size: int) -> int:
    """The most KV any `window` consecutive requests of the run order hold at once.

    order_blocks: each request's KV blocks beyond its group's shared prefix, in run order;
    group_of: each request's group (non-decreasing, as groups are contiguous runs of the
    order); group_prefix_blocks: each group's shared prefix blocks. A window holds its
    requests' own blocks plus the prefixes of the groups it touches (each once)."""
    n = len(order_blocks)
    if n == 0:
        return 0
    w = max(1, min(window, n))
    own = np.concatenate(([0], np.cumsum(order_blocks)))
    prefixes = np.concatenate(([0], np.cumsum(group_prefix_blocks)))
    starts = np.arange(n - w + 1)
    ends = starts + w
    first, last = group_of[starts], group_of[ends - 1]
    blocks = own[ends] - own[starts] + prefixes[last + 1] - prefixes[first]
    return int(blocks.max()) * block_size


def memory_available() -> int:
    """Bytes of memory available to a new allocation now (MemAvailable), or 0 if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0


def job_kv_cache_memory(window_tokens: int, min_tokens: int, bytes_per_token: int,
                        available: int) -> tuple[int, str]:
    """The KV cache a CPU job gets when the user sets none, and why."""
    want = int(window_tokens * WINDOW_HEADROOM)
    cap = int(available * MAX_SHARE_OF_FREE_MEMORY) // bytes_per_token if available else want
    if min_tokens > min(want, cap):
        return min_tokens * bytes_per_token, "room for the job's longest request"
    if want <= cap:
        return want * bytes_per_token, (f"the plan's peak window ({window_tokens:,} tokens) + "
                                        f"{WINDOW_HEADROOM - 1:.0%} headroom")
    return cap * bytes_per_token, (
        f"{MAX_SHARE_OF_FREE_MEMORY:.0%} of the {available / 2**30:.1f} GiB free at start "
        f"(the plan's peak window, {window_tokens:,} tokens, would need more)")


def check_requests_fit(longest: LongestRequest | None, sizing: EngineSizing) -> None:
    """A request larger than the whole KV cache can never run; vLLM would refuse to start."""
    capacity = sizing.kv_capacity_tokens
    if longest is None or capacity is None:
        return
    need = round_up(longest.tokens, sizing.block_size)
    if need <= capacity:
        return
    least = need * sizing.kv_bytes_per_token
    raise ConfigError(
        f"row id {longest.row_id!r} needs {need:,} tokens of KV cache ({longest.prompt_tokens:,}"
        f" prompt + {longest.max_tokens:,} max_tokens) but kv_cache_memory "
        f"{sizing.kv_cache_memory / 2**20:,.0f}MiB holds {capacity:,}: set --kv-cache-memory to "
        f"at least {ceil_div(least, 2**20):,}MiB (job file: [engine] kv_cache_memory), or lower "
        "that row's max_tokens")


def size_engine(*, longest: LongestRequest | None, context: int, block_size: int,
                kv_bytes_per_token: int, user_kv_cache_memory: int | None,
                size_kv_from_job: bool, window_tokens: int) -> EngineSizing:
    """The engine settings for a job (see the module notes). `window_tokens` is the plan's
    peak window, used only when the KV cache is sized from the job."""
    max_model_len, len_reason = job_max_model_len(longest, block_size, context)
    if user_kv_cache_memory:
        kv, kv_reason = user_kv_cache_memory, "set by the user (kv_cache_memory)"
    elif size_kv_from_job and kv_bytes_per_token:
        # One block more than the longest request: vLLM keeps a block as its null block.
        kv, kv_reason = job_kv_cache_memory(window_tokens,
                                            round_up(max_model_len, block_size) + block_size,
                                            kv_bytes_per_token, memory_available())
        kv = round_up(kv, kv_bytes_per_token * block_size)  # whole blocks
    else:
        kv, kv_reason = None, "the engine's own default"
    sizing = EngineSizing(block_size, max_model_len, len_reason, kv, kv_reason,
                          kv_bytes_per_token, window_tokens)
    check_requests_fit(longest, sizing)
    return sizing
