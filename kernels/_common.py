"""Pieces shared by the attention kernels: interpreter detection, tile sizes and launch
settings, the online-softmax loop over a paged K/V range, and the output epilogue.

Conventions used by every kernel in this package:
- Scores are kept in base 2 (``qk_scale = scale * log2(e)``, ``exp2``), as in the Triton
  fused-attention tutorial; every log-sum-exp that leaves a kernel is in natural log.
- A query row that saw no key has ``l == 0``: its output is 0 and its LSE is ``-inf``, which is
  exactly the identity element of the LSE merge.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

if TYPE_CHECKING:
    from .metadata import SharedPrefixMetadata

LOG2E = math.log2(math.e)


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def default_block_m(head_size: int, rows_per_seq: int | None = None) -> int:
    """Rows (query tokens x query heads of one KV head) per tile.

    ``rows_per_seq`` is given for per-sequence tiles: a decode-only batch has ``GQA`` rows per
    sequence, and 16 is the smallest tile ``tl.dot`` accepts. The GPU sizes are first guesses
    that keep Q + two stages of K/V under ~130 KB of shared memory; they were not tuned.
    """
    if rows_per_seq is not None and rows_per_seq <= 16:
        return 16
    if interpreting():
        return 32  # the interpreter pays per op, not per element: few, mid-sized tiles
    if rows_per_seq is not None:
        return 64
    return 128 if head_size <= 128 else 64


@dataclass(frozen=True)
class LaunchConfig:
    block_n: int  # keys per inner-loop step
    num_warps: int
    num_stages: int
    upcast: bool  # compute the dots in fp32 (interpreter: its bf16 dot is wrong)
    dot_precision: str  # "ieee" for fp32 inputs, so a GPU does not silently use TF32


def launch_config(head_size: int, dtype: torch.dtype, block_m: int) -> LaunchConfig:
    """Fixed per-shape launch settings. Autotuning is avoided on purpose: vLLM captures CUDA
    graphs, and a first-call tuning sweep inside a capture is not allowed."""
    if interpreting():
        return LaunchConfig(block_n=64, num_warps=4, num_stages=1, upcast=True,
                            dot_precision="ieee")
    head_pad = triton.next_power_of_2(head_size)
    wide = head_pad > 128 or dtype == torch.float32
    block_n = 64 if not wide else (16 if head_pad > 128 and dtype == torch.float32 else 32)
    return LaunchConfig(
        block_n=block_n,
        num_warps=8 if block_m >= 128 or head_pad > 128 else 4,
        num_stages=2,
        upcast=False,
        dot_precision="ieee" if dtype == torch.float32 else "tf32",
    )


def check_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 block_table: torch.Tensor, metadata: SharedPrefixMetadata) -> None:
    """Shape/layout checks shared by every wrapper (cheap, no device sync)."""
    num_tokens, num_q_heads, head_size = q.shape
    num_blocks, block_size, num_kv_heads, cache_head_size = k_cache.shape
    if v_cache.shape != k_cache.shape or v_cache.stride() != k_cache.stride():
        raise ValueError("key_cache and value_cache must have the same shape and strides")
    if cache_head_size != head_size or not 16 <= head_size <= 256:
        raise ValueError(f"head sizes must match and lie in 16..256: q {head_size}, "
                         f"cache {cache_head_size}")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1:
        raise ValueError("q and the caches need a contiguous head dimension")
    if num_q_heads != num_kv_heads * metadata.num_queries_per_kv:
        raise ValueError(f"{num_q_heads} query heads != {num_kv_heads} KV heads x "
                         f"{metadata.num_queries_per_kv} (metadata's num_queries_per_kv)")
    if block_size != metadata.block_size:
        raise ValueError(f"cache block size {block_size} != metadata's {metadata.block_size}")
    if num_tokens != metadata.num_tokens or block_table.shape[0] < metadata.num_seqs:
        raise ValueError("q / block_table do not match the metadata's batch")
    if block_table.dtype != torch.int32 or block_table.stride(-1) != 1:
        raise ValueError("block_table must be int32 with contiguous rows")


def check_partials(out: torch.Tensor, lse: torch.Tensor, shape: tuple[int, ...]) -> None:
    """Partial buffers: fp32, ``out`` of ``shape`` and ``lse`` of ``shape[:-1]``."""
    if out.shape != shape or lse.shape != shape[:-1]:
        raise ValueError(f"partials must be {tuple(shape)} and {tuple(shape[:-1])}, got "
                         f"{tuple(out.shape)} and {tuple(lse.shape)}")
    if out.dtype != torch.float32 or lse.dtype != torch.float32:
        raise ValueError("partial outputs and LSEs are fp32")
    if out.stride(-1) != 1 or lse.stride(-1) != 1:
        raise ValueError("partials need a contiguous last dimension")


@triton.jit
def attend_kv_range(
    acc, m_i, l_i, q,
    row_pos, row_sel,
    kv_lo, kv_hi,
    block_table_row_ptr, k_cache_ptr, v_cache_ptr, kv_head,
    stride_cache_block, stride_cache_tok, stride_cache_head,
    qk_scale,
    HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Fold keys [kv_lo, kv_hi) of one sequence's paged K/V into the running softmax state.

    ``q`` is a [BLOCK_M, HEAD_PAD] tile; ``acc``/``m_i``/``l_i`` are the unnormalised output,
    the running max (base 2) and the running sum. With CAUSAL, key t counts for row r only if
    ``row_sel[r]`` and ``t <= row_pos[r]``; otherwise every key in range counts for every row.
    Each key's physical block is looked up per token, so any block size works with any BLOCK_N.
    """
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_PAD)
    d_mask = offs_d < HEAD_SIZE
    for start in range(kv_lo, kv_hi, BLOCK_N):
        kv_tok = start + offs_n
        kv_mask = kv_tok < kv_hi
        block = tl.load(block_table_row_ptr + kv_tok // BLOCK_SIZE, mask=kv_mask, other=0)
        offs = (block.to(tl.int64)[:, None] * stride_cache_block
                + (kv_tok % BLOCK_SIZE)[:, None] * stride_cache_tok
                + kv_head * stride_cache_head + offs_d[None, :])
        kv_load_mask = kv_mask[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + offs, mask=kv_load_mask, other=0.0)
        v = tl.load(v_cache_ptr + offs, mask=kv_load_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)

        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        valid = kv_mask[None, :]
        if CAUSAL:
            valid = valid & row_sel[:, None] & (kv_tok[None, :] <= row_pos[:, None])
        s = tl.where(valid, s, float("-inf"))

        # Rows with no valid key yet keep m = -inf; shifting them by 0 instead of -inf keeps
        # exp2 at 0 rather than NaN, so masked rows pass through unchanged.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_shift)
        p = tl.math.exp2(s - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def write_attention_output(
    acc, m_i, l_i,
    out_ptr, out_row_offs, lse_ptr, lse_offs, row_mask,
    HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr, WRITE_LSE: tl.constexpr,
):
    """Normalise and store a tile of rows (cast to the output's dtype), plus its natural-log
    LSE when the result is a partial that will be merged."""
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    offs_d = tl.arange(0, HEAD_PAD)
    tl.store(out_ptr + out_row_offs[:, None] + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & (offs_d < HEAD_SIZE)[None, :])
    if WRITE_LSE:
        ln2 = 0.6931471805599453
        lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * ln2)
        tl.store(lse_ptr + lse_offs, lse, mask=row_mask)
