"""Per-sequence paged attention: the suffix pass, and the per-sequence baseline.

One program owns a tile of one sequence's rows (its query tokens x the query heads of one KV
head, so GQA heads still share each K/V load) and walks that sequence's own blocks, causally.

- ``suffix_attention`` starts each sequence after its group's shared prefix and writes partial
  outputs and LSEs for the merge. A suffix can be empty (the prefix holds all the keys of a
  decode row): its rows get output 0 and LSE ``-inf``.
- ``paged_attention`` starts at token 0: ordinary per-sequence paged attention, what the
  shared-prefix kernels are measured against (same code, prefix read once per sequence).

Both can split each sequence's key range over ``num_splits`` programs (flash-decoding) when
there are too few sequences to fill the GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    LOG2E,
    attend_kv_range,
    final_output,
    kernel_launch,
    load_query_tile,
    new_partials,
    partials_for,
    write_attention_output,
)
from .merge import merge_attention_partials
from .metadata import SharedPrefixMetadata, check_inputs


@triton.jit
def _seq_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_table_ptr, out_ptr, lse_ptr,
    seq_tiles_ptr, query_start_loc_ptr, seq_lens_ptr, kv_start_ptr,
    stride_q_tok, stride_q_head,
    stride_cache_block, stride_cache_tok, stride_cache_head,
    stride_block_table,
    stride_out_split, stride_out_tok, stride_out_head,
    stride_lse_split, stride_lse_tok,
    qk_scale,
    GQA: tl.constexpr, HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SKIP_PREFIX: tl.constexpr, WRITE_LSE: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)

    seq = tl.load(seq_tiles_ptr + tile * 2)
    first_row = tl.load(seq_tiles_ptr + tile * 2 + 1)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)

    rows = first_row + tl.arange(0, BLOCK_M)
    row_mask = rows < q_len * GQA
    tok = q_start + rows // GQA
    row_pos = seq_len - q_len + rows // GQA
    q_head = kv_head * GQA + rows % GQA
    q, acc, m_i, l_i = load_query_tile(q_ptr, tok, q_head, row_mask, stride_q_tok,
                                       stride_q_head, HEAD_SIZE, HEAD_PAD, BLOCK_M, UPCAST)

    # Keys up to the tile's last query position (causal), from the prefix end or from 0,
    # cut into equal chunks of whole KV steps, one per split.
    if SKIP_PREFIX:
        seq_kv_lo = tl.load(kv_start_ptr + seq)
    else:
        seq_kv_lo = 0
    seq_kv_hi = tl.max(tl.where(row_mask, row_pos, -1), 0) + 1
    chunk = tl.cdiv(tl.cdiv(tl.maximum(seq_kv_hi - seq_kv_lo, 0), num_splits), BLOCK_N) * BLOCK_N
    kv_lo = seq_kv_lo + split * chunk
    kv_hi = tl.minimum(seq_kv_hi, kv_lo + chunk)
    acc, m_i, l_i = attend_kv_range(
        acc, m_i, l_i, q, row_pos, row_mask, kv_lo, kv_hi,
        block_table_ptr + seq.to(tl.int64) * stride_block_table,
        k_cache_ptr, v_cache_ptr, kv_head,
        stride_cache_block, stride_cache_tok, stride_cache_head, qk_scale,
        HEAD_SIZE, HEAD_PAD, BLOCK_N, BLOCK_SIZE, True, UPCAST, DOT_PRECISION)

    write_attention_output(acc, m_i, l_i, out_ptr, lse_ptr, split, tok, q_head, row_mask,
                           stride_out_split, stride_out_tok, stride_out_head,
                           stride_lse_split, stride_lse_tok, HEAD_SIZE, HEAD_PAD, WRITE_LSE)


def _launch_seq_kernel(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
    metadata: SharedPrefixMetadata, scale: float, out: torch.Tensor, lse: torch.Tensor | None,
    skip_prefix: bool,
) -> None:
    """``out`` is [num_splits, tokens, heads, head_size]; ``lse`` is None when ``out`` is the
    final output (one split), else [num_splits, tokens, heads]."""
    check_inputs(q, k_cache, v_cache, block_table, metadata)
    launch = kernel_launch(q, k_cache, block_table, out, lse, metadata.seq_block_m)
    num_tiles = metadata.seq_tiles.shape[0]
    if num_tiles == 0:
        return
    cfg = launch.config
    _seq_attention_kernel[(num_tiles, launch.num_kv_heads, out.shape[0])](
        q, k_cache, v_cache, block_table, out, launch.lse,
        metadata.seq_tiles, metadata.query_start_loc, metadata.seq_lens, metadata.seq_prefix_len,
        *launch.strides, scale * LOG2E,
        GQA=metadata.num_queries_per_kv, HEAD_SIZE=launch.head_size, HEAD_PAD=launch.head_pad,
        BLOCK_SIZE=metadata.block_size, BLOCK_M=metadata.seq_block_m, BLOCK_N=cfg.block_n,
        SKIP_PREFIX=skip_prefix, WRITE_LSE=lse is not None,
        UPCAST=cfg.upcast, DOT_PRECISION=cfg.dot_precision,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def suffix_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    metadata: SharedPrefixMetadata,
    scale: float,
    *,
    num_splits: int = 1,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of each sequence's query tokens over its own keys after its prefix
    (``metadata.seq_prefix_len``; all keys for sequences in no group).

    Returns fp32 ``(out [num_splits, num_tokens, num_q_heads, head_size],
    lse [num_splits, num_tokens, num_q_heads])``, like ``prefix_attention``.
    """
    out, lse = partials_for(q, num_splits, out, lse)
    _launch_seq_kernel(q, k_cache, v_cache, block_table, metadata, scale, out, lse,
                       skip_prefix=True)
    return out, lse


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    metadata: SharedPrefixMetadata,
    scale: float,
    *,
    num_splits: int = 1,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sequence causal paged attention over all of each sequence's keys, ignoring the
    groups (every prefix is read once per sequence). The baseline for the benchmarks, and a
    fallback for steps without shared prefixes. ``num_splits > 1`` splits each key range and
    merges the partials (flash-decoding)."""
    out = final_output(q, out)
    if num_splits == 1:
        _launch_seq_kernel(q, k_cache, v_cache, block_table, metadata, scale, out.unsqueeze(0),
                           None, skip_prefix=False)
        return out
    parts, lse = new_partials(q, num_splits)
    _launch_seq_kernel(q, k_cache, v_cache, block_table, metadata, scale, parts, lse,
                       skip_prefix=False)
    return merge_attention_partials(parts, lse, out=out)
