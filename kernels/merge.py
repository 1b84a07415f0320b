"""Exact merge of partial attention results by their log-sum-exp.

If part ``i`` attended over key set ``K_i`` (disjoint sets) and produced the normalised output
``o_i`` with ``lse_i = log sum_{k in K_i} exp(s_k)``, attention over the union is

    o = sum_i w_i * o_i,   w_i = exp(lse_i - lse),   lse = log sum_i exp(lse_i).

A part with no keys (``lse_i = -inf``) gets weight 0, so empty suffixes, empty splits and
tokens outside every group need no special case.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _merge_kernel(
    parts_ptr, lse_ptr, out_ptr,
    num_parts, num_heads,
    stride_parts_part, stride_parts_tok, stride_parts_head,
    stride_lse_part, stride_lse_tok,
    stride_out_tok, stride_out_head,
    HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr,
    PARTS_PAD: tl.constexpr, BLOCK_H: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    head_mask = heads < num_heads
    offs_d = tl.arange(0, HEAD_PAD)
    tile_mask = head_mask[:, None] & (offs_d < HEAD_SIZE)[None, :]

    # Pass 1: the merged LSE of each head from the (few) part LSEs.
    parts = tl.arange(0, PARTS_PAD)
    all_lse = tl.load(lse_ptr + parts[:, None] * stride_lse_part + tok * stride_lse_tok
                      + heads[None, :],
                      mask=(parts < num_parts)[:, None] & head_mask[None, :],
                      other=float("-inf"))
    m = tl.max(all_lse, 0)
    m_shift = tl.where(m == float("-inf"), 0.0, m)  # a head no part saw stays 0, not NaN
    total = tl.sum(tl.exp(all_lse - m_shift[None, :]), 0)
    total = tl.where(total == 0.0, 1.0, total)

    # Pass 2: the weighted sum, one [BLOCK_H, HEAD_PAD] slice of the outputs at a time.
    acc = tl.zeros([BLOCK_H, HEAD_PAD], dtype=tl.float32)
    for part in range(num_parts):
        lse = tl.load(lse_ptr + part * stride_lse_part + tok * stride_lse_tok + heads,
                      mask=head_mask, other=float("-inf"))
        o = tl.load(parts_ptr + part * stride_parts_part + tok * stride_parts_tok
                    + heads[:, None] * stride_parts_head + offs_d[None, :],
                    mask=tile_mask, other=0.0)
        acc += (tl.exp(lse - m_shift) / total)[:, None] * o
    tl.store(out_ptr + tok * stride_out_tok + heads[:, None] * stride_out_head + offs_d[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=tile_mask)


def merge_attention_partials(
    out_parts: torch.Tensor,
    lse_parts: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Merge ``out_parts [num_parts, num_tokens, num_heads, head_size]`` (fp32, each part
    normalised over its own keys) using ``lse_parts [num_parts, num_tokens, num_heads]``
    (natural log). Returns ``[num_tokens, num_heads, head_size]`` in ``out``'s dtype, else
    ``out_dtype``, else fp32.

    To merge the results of ``prefix_attention`` and ``suffix_attention``, let both write
    into slices of one workspace (their ``out=``/``lse=`` arguments) and merge it whole.
    """
    num_parts, num_tokens, num_heads, head_size = out_parts.shape
    if lse_parts.shape != (num_parts, num_tokens, num_heads):
        raise ValueError(f"lse_parts {tuple(lse_parts.shape)} does not match out_parts")
    if out_parts.stride(-1) != 1 or lse_parts.stride(-1) != 1:
        raise ValueError("partials need a contiguous last dimension")
    if out is None:
        out = out_parts.new_empty((num_tokens, num_heads, head_size),
                                  dtype=out_dtype or torch.float32)
    if out.shape != (num_tokens, num_heads, head_size) or out.stride(-1) != 1:
        raise ValueError("out must be [num_tokens, num_heads, head_size], contiguous last dim")
    if num_tokens == 0:
        return out
    head_pad = triton.next_power_of_2(head_size)
    # ~2K elements per program: enough work per program, few registers.
    block_h = min(triton.next_power_of_2(num_heads), max(1, 2048 // head_pad))
    _merge_kernel[(num_tokens, triton.cdiv(num_heads, block_h))](
        out_parts, lse_parts, out,
        num_parts, num_heads,
        out_parts.stride(0), out_parts.stride(1), out_parts.stride(2),
        lse_parts.stride(0), lse_parts.stride(1),
        out.stride(0), out.stride(1),
        HEAD_SIZE=head_size, HEAD_PAD=head_pad,
        PARTS_PAD=triton.next_power_of_2(num_parts), BLOCK_H=block_h,
    )
    return out
