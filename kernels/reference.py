"""Plain torch references for every kernel, written for clarity, not speed.

Like the Triton fused-attention tutorial's reference: gather the keys, ``q @ k^T * scale``,
mask with -inf, softmax, ``@ v``, all in fp32. They take the groups as the user describes them
(``PrefixGroup`` list), not the kernels' metadata, so the tests also check the metadata.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .metadata import PrefixGroup


def gather_kv(cache: torch.Tensor, block_table_row: torch.Tensor, start: int,
              end: int) -> torch.Tensor:
    """Tokens [start, end) of one sequence from a paged cache: [end - start, kv_heads, d]."""
    block_size = cache.shape[1]
    tokens = torch.arange(start, end, device=cache.device)
    blocks = block_table_row.long()[tokens // block_size]
    return cache[blocks, tokens % block_size]


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                       k_pos: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal GQA attention of q ``[m, hq, d]`` over k/v ``[n, hkv, d]`` (key j counts for
    query i iff ``k_pos[j] <= q_pos[i]``). Returns fp32 ``out [m, hq, d]`` and natural-log
    ``lse [m, hq]``; a query without keys gets 0 and -inf."""
    gqa = q.shape[1] // k.shape[1]
    qh = q.float().transpose(0, 1)  # [hq, m, d]
    kh = k.float().repeat_interleave(gqa, dim=1).transpose(0, 1)  # [hq, n, d]
    vh = v.float().repeat_interleave(gqa, dim=1).transpose(0, 1)
    s = torch.matmul(qh, kh.transpose(1, 2)) * scale  # [hq, m, n]
    s = s.masked_fill(k_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # -inf for rows without keys
    p = torch.exp(s - lse.masked_fill(lse == float("-inf"), 0.0)[..., None])
    out = torch.matmul(p, vh)
    return out.transpose(0, 1), lse.transpose(0, 1)


def _seq_ranges(query_start_loc: torch.Tensor, seq_lens: torch.Tensor):
    """Per sequence: (index, query token slice, absolute positions of those queries)."""
    for s in range(seq_lens.numel()):
        q0, q1 = int(query_start_loc[s]), int(query_start_loc[s + 1])
        seq_len = int(seq_lens[s])
        yield s, slice(q0, q1), torch.arange(seq_len - (q1 - q0), seq_len)


def _prefix_lens(groups: Sequence[PrefixGroup], num_seqs: int) -> list[int]:
    lens = [0] * num_seqs
    for group in groups:
        for s in group.seq_ids:
            lens[s] = group.prefix_len
    return lens


def _attend_ranges(q, k_cache, v_cache, block_table, query_start_loc, seq_lens, scale,
                   key_range) -> tuple[torch.Tensor, torch.Tensor]:
    """out/lse of every query token over keys ``key_range(s, seq_len)`` of its sequence."""
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
    for s, rows, q_pos in _seq_ranges(query_start_loc, seq_lens):
        start, end = key_range(s, int(seq_lens[s]))
        k = gather_kv(k_cache, block_table[s], start, end)
        v = gather_kv(v_cache, block_table[s], start, end)
        out[rows], lse[rows] = attention_with_lse(q[rows], k, v, q_pos.to(q.device),
                                                  torch.arange(start, end, device=q.device),
                                                  scale)
    return out, lse


def ref_paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_table: torch.Tensor, query_start_loc: torch.Tensor,
                        seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Ground truth: causal attention of each sequence over all its keys, in q's dtype."""
    out, _ = _attend_ranges(q, k_cache, v_cache, block_table, query_start_loc, seq_lens, scale,
                            lambda s, seq_len: (0, seq_len))
    return out.to(q.dtype)


def ref_prefix_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         block_table: torch.Tensor, query_start_loc: torch.Tensor,
                         seq_lens: torch.Tensor, groups: Sequence[PrefixGroup],
                         scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (out, lse) of each query token over its group's prefix (0 / -inf outside groups)."""
    prefix = _prefix_lens(groups, seq_lens.numel())
    return _attend_ranges(q, k_cache, v_cache, block_table, query_start_loc, seq_lens, scale,
                          lambda s, seq_len: (0, prefix[s]))


def ref_suffix_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         block_table: torch.Tensor, query_start_loc: torch.Tensor,
                         seq_lens: torch.Tensor, groups: Sequence[PrefixGroup],
                         scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (out, lse) of each query token over its sequence's keys after the prefix."""
    prefix = _prefix_lens(groups, seq_lens.numel())
    return _attend_ranges(q, k_cache, v_cache, block_table, query_start_loc, seq_lens, scale,
                          lambda s, seq_len: (prefix[s], seq_len))


def ref_merge_attention_partials(out_parts: torch.Tensor, lse_parts: torch.Tensor) -> torch.Tensor:
    """fp32 merge of [parts, tokens, heads, d] by [parts, tokens, heads] natural-log LSEs."""
    lse = torch.logsumexp(lse_parts, dim=0)  # [tokens, heads]
    weights = torch.exp(lse_parts - lse.masked_fill(lse == float("-inf"), 0.0))
    return (weights[..., None] * out_parts.float()).sum(dim=0)


def ref_shared_prefix_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                block_table: torch.Tensor, query_start_loc: torch.Tensor,
                                seq_lens: torch.Tensor, groups: Sequence[PrefixGroup],
                                scale: float) -> torch.Tensor:
    """The shared-prefix decomposition: prefix pass, suffix pass, merge (equals
    ``ref_paged_attention`` up to rounding), in q's dtype."""
    args = (q, k_cache, v_cache, block_table, query_start_loc, seq_lens, groups, scale)
    prefix_out, prefix_lse = ref_prefix_attention(*args)
    suffix_out, suffix_lse = ref_suffix_attention(*args)
    merged = ref_merge_attention_partials(torch.stack([prefix_out, suffix_out]),
                                          torch.stack([prefix_lse, suffix_lse]))
    return merged.to(q.dtype)
