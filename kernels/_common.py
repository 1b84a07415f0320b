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

import torch
import triton
import triton.language as tl

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
    """Fixed per-shape launch settings, not autotuned: a tuning sweep would run at the first
    call of every new shape, in the middle of a job (grids and key lengths change every
    engine step), and Triton's interpreter, which the CPU tests use, runs one config only."""
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


def new_partials(q: torch.Tensor, num_splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty fp32 partial outputs ``[num_splits, *q.shape]`` and their LSEs
    ``[num_splits, num_tokens, num_q_heads]``."""
    return (q.new_empty((num_splits, *q.shape), dtype=torch.float32),
            q.new_empty((num_splits, *q.shape[:2]), dtype=torch.float32))


def partials_for(q: torch.Tensor, num_splits: int, out: torch.Tensor | None,
                 lse: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The partial buffers a pass writes: ``out`` and ``lse`` where given (a slice of a
    larger workspace), new ones otherwise; checked either way."""
    if out is None or lse is None:
        new_out, new_lse = new_partials(q, num_splits)
        out = new_out if out is None else out
        lse = new_lse if lse is None else lse
    check_partials(out, lse, (num_splits, *q.shape))
    return out, lse


def final_output(q: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """The buffer a pass writes final outputs to: ``out`` (checked), or a new one like q."""
    if out is None:
        return torch.empty_like(q)
    if out.shape != q.shape or out.stride(-1) != 1:
        raise ValueError("out must be shaped like q, with a contiguous head dimension")
    return out


@dataclass(frozen=True)
class KernelLaunch:
    """What the launchers of both kernels work out alike from the layer's tensors."""

    num_kv_heads: int
    head_size: int
    head_pad: int
    config: LaunchConfig
    lse: torch.Tensor  # the LSE buffer; ``out`` (never written) when there is none
    # q (token, head), cache (block, token, head), block table (row), out (split, token,
    # head), LSE (split, token): the kernels' stride arguments, in their order.
    strides: tuple[int, ...]


def kernel_launch(q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor,
                  out: torch.Tensor, lse: torch.Tensor | None, block_m: int) -> KernelLaunch:
    """The launch for inputs already checked (``metadata.check_inputs``): ``out`` is
    [num_splits, tokens, heads, head_size]; ``lse`` is None when ``out`` holds final outputs
    (the kernel then gets ``out`` with zero strides as its LSE pointer, and writes no LSE)."""
    num_kv_heads, head_size = k_cache.shape[2], k_cache.shape[3]
    lse_arg, lse_strides = (out, (0, 0)) if lse is None else (lse, lse.stride()[:2])
    return KernelLaunch(
        num_kv_heads, head_size, triton.next_power_of_2(head_size),
        launch_config(head_size, q.dtype, block_m), lse_arg,
        (q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
         block_table.stride(0), out.stride(0), out.stride(1), out.stride(2), *lse_strides))


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
def load_query_tile(
    q_ptr, tok, q_head, row_mask, stride_q_tok, stride_q_head,
    HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """A tile's queries (row r: token ``tok[r]``, head ``q_head[r]``; masked rows 0) as
    [BLOCK_M, HEAD_PAD], and a fresh online-softmax state for them: ``q, acc, m_i, l_i``."""
    offs_d = tl.arange(0, HEAD_PAD)
    q_row_offs = tok.to(tl.int64) * stride_q_tok + q_head * stride_q_head
    q = tl.load(q_ptr + q_row_offs[:, None] + offs_d[None, :],
                mask=row_mask[:, None] & (offs_d < HEAD_SIZE)[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    return q, acc, m_i, l_i


@triton.jit
def write_attention_output(
    acc, m_i, l_i,
    out_ptr, lse_ptr, split, tok, q_head, row_mask,
    stride_out_split, stride_out_tok, stride_out_head, stride_lse_split, stride_lse_tok,
    HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr, WRITE_LSE: tl.constexpr,
):
    """Normalise and store a tile of rows (cast to the output's dtype) at split ``split``,
    token ``tok[r]``, head ``q_head[r]``, plus its natural-log LSE when the result is a
    partial that will be merged."""
    out_row_offs = (split.to(tl.int64) * stride_out_split + tok.to(tl.int64) * stride_out_tok
                    + q_head * stride_out_head)
    lse_offs = split.to(tl.int64) * stride_lse_split + tok.to(tl.int64) * stride_lse_tok + q_head
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
