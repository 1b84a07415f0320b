"""Prefix attention over prefix groups, and the fused prefix + suffix kernel.

One program owns a tile of a group's *stacked matrix*: BLOCK_M rows, each a (query token of
some member, query head of one KV head), so the queries of every member and every query head
of a KV head (GQA) are multiplied against the group's prefix K/V together, as matrix-matrix
products. The prefix is read once per tile instead of once per sequence (Hydragen, BatchLLM).

- ``prefix_attention`` stops there and writes partial outputs and LSEs (optionally split
  along the prefix, flash-decoding style, when there are too few tiles to fill the GPU).
- ``fused_shared_prefix_attention`` goes on, in the same program and with the same softmax
  state, over each member's own keys after the prefix (causal, so decode and chunked-prefill
  rows mix freely), and writes the final output: one launch, no partials, no merge.
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
    partials_for,
    write_attention_output,
)
from .metadata import SharedPrefixMetadata, check_inputs


@triton.jit
def _group_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_table_ptr, out_ptr, lse_ptr,
    group_tiles_ptr, group_seqs_ptr, group_prefix_len_ptr, group_prefix_seq_ptr,
    group_token_start_ptr, group_tokens_ptr, token_seq_ptr, token_pos_ptr,
    stride_q_tok, stride_q_head,
    stride_cache_block, stride_cache_tok, stride_cache_head,
    stride_block_table,
    stride_out_split, stride_out_tok, stride_out_head,
    stride_lse_split, stride_lse_tok,
    qk_scale,
    GQA: tl.constexpr, HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    FUSE_SUFFIX: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)

    group = tl.load(group_tiles_ptr + tile * 4)
    first_row = tl.load(group_tiles_ptr + tile * 4 + 1)
    token_lo = tl.load(group_token_start_ptr + group)
    num_rows = (tl.load(group_token_start_ptr + group + 1) - token_lo) * GQA

    # Map the tile's stacked rows to (query token, query head) and gather Q.
    rows = first_row + tl.arange(0, BLOCK_M)
    row_mask = rows < num_rows
    tok = tl.load(group_tokens_ptr + token_lo + rows // GQA, mask=row_mask, other=0)
    q_head = kv_head * GQA + rows % GQA
    q, acc, m_i, l_i = load_query_tile(q_ptr, tok, q_head, row_mask, stride_q_tok,
                                       stride_q_head, HEAD_SIZE, HEAD_PAD, BLOCK_M, UPCAST)

    # This split's share of the prefix, in whole KV steps. Every row sees every prefix key
    # (a precondition of the metadata), so the prefix needs no mask beyond its length.
    prefix_len = tl.load(group_prefix_len_ptr + group)
    chunk = tl.cdiv(tl.cdiv(prefix_len, num_splits), BLOCK_N) * BLOCK_N
    kv_lo = split * chunk
    kv_hi = tl.minimum(prefix_len, kv_lo + chunk)
    prefix_seq = tl.load(group_prefix_seq_ptr + group)
    acc, m_i, l_i = attend_kv_range(
        acc, m_i, l_i, q, rows, row_mask, kv_lo, kv_hi,
        block_table_ptr + prefix_seq.to(tl.int64) * stride_block_table,
        k_cache_ptr, v_cache_ptr, kv_head,
        stride_cache_block, stride_cache_tok, stride_cache_head, qk_scale,
        HEAD_SIZE, HEAD_PAD, BLOCK_N, BLOCK_SIZE, False, UPCAST, DOT_PRECISION)

    if FUSE_SUFFIX:
        # Each member's own keys, with the rows of the other members masked out. The K/V of
        # a member is read once per tile it has rows in: once for decode rows.
        row_seq = tl.load(token_seq_ptr + tok, mask=row_mask, other=-1)
        row_pos = tl.load(token_pos_ptr + tok, mask=row_mask, other=-1)
        member_lo = tl.load(group_tiles_ptr + tile * 4 + 2)
        member_hi = tl.load(group_tiles_ptr + tile * 4 + 3)
        for member in range(member_lo, member_hi):
            seq = tl.load(group_seqs_ptr + member)
            in_seq = row_seq == seq
            seq_kv_hi = tl.max(tl.where(in_seq, row_pos, -1), 0) + 1  # causal bound
            acc, m_i, l_i = attend_kv_range(
                acc, m_i, l_i, q, row_pos, in_seq, prefix_len, seq_kv_hi,
                block_table_ptr + seq.to(tl.int64) * stride_block_table,
                k_cache_ptr, v_cache_ptr, kv_head,
                stride_cache_block, stride_cache_tok, stride_cache_head, qk_scale,
                HEAD_SIZE, HEAD_PAD, BLOCK_N, BLOCK_SIZE, True, UPCAST, DOT_PRECISION)

    write_attention_output(acc, m_i, l_i, out_ptr, lse_ptr, split, tok, q_head, row_mask,
                           stride_out_split, stride_out_tok, stride_out_head,
                           stride_lse_split, stride_lse_tok, HEAD_SIZE, HEAD_PAD, not FUSE_SUFFIX)


def _launch_group_kernel(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
    metadata: SharedPrefixMetadata, scale: float, out: torch.Tensor, lse: torch.Tensor | None,
) -> None:
    """``out`` is [num_splits, tokens, heads, head_size]; ``lse`` is None for the fused kernel
    (it writes final outputs), else [num_splits, tokens, heads]."""
    check_inputs(q, k_cache, v_cache, block_table, metadata)
    launch = kernel_launch(q, k_cache, block_table, out, lse, metadata.group_block_m)
    num_tiles = metadata.group_tiles.shape[0]
    if num_tiles == 0:
        return
    cfg = launch.config
    _group_attention_kernel[(num_tiles, launch.num_kv_heads, out.shape[0])](
        q, k_cache, v_cache, block_table, out, launch.lse,
        metadata.group_tiles, metadata.group_seqs, metadata.group_prefix_len,
        metadata.group_prefix_seq, metadata.group_token_start, metadata.group_tokens,
        metadata.token_seq, metadata.token_pos,
        *launch.strides, scale * LOG2E,
        GQA=metadata.num_queries_per_kv, HEAD_SIZE=launch.head_size, HEAD_PAD=launch.head_pad,
        BLOCK_SIZE=metadata.block_size, BLOCK_M=metadata.group_block_m, BLOCK_N=cfg.block_n,
        FUSE_SUFFIX=lse is None, UPCAST=cfg.upcast, DOT_PRECISION=cfg.dot_precision,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def prefix_attention(
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
    """Attention of every query token over its group's shared prefix only.

    Returns ``(out, lse)``: fp32 partial outputs ``[num_splits, num_tokens, num_q_heads,
    head_size]`` (each normalised over its own keys) and their natural-log LSEs
    ``[num_splits, num_tokens, num_q_heads]``. Split ``i`` covers the ``i``-th chunk of each
    prefix; a split or a token without prefix keys gets output 0 and LSE ``-inf``. Pass
    ``out``/``lse`` to write into a larger workspace (see ``merge_attention_partials``).
    """
    out, lse = partials_for(q, num_splits, out, lse)
    _launch_group_kernel(q, k_cache, v_cache, block_table, metadata, scale, out, lse)
    return out, lse


def fused_shared_prefix_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    metadata: SharedPrefixMetadata,
    scale: float,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Full causal attention (prefix + each sequence's own keys) in one launch.

    One program per (group tile, KV head): it folds the shared prefix into the softmax
    state with whole-tile dots, then each member's own keys with the other rows masked. Pays
    when the tiles alone fill the GPU (many sequences); with few tiles and long prefixes the
    split path of ``shared_prefix_attention`` has more parallelism.
    """
    out = final_output(q, out)
    _launch_group_kernel(q, k_cache, v_cache, block_table, metadata, scale, out.unsqueeze(0),
                         None)
    return out
