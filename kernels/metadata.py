"""Per-step description of a batch with shared prefixes, built once on the host and reused by
every attention layer of the step.

A *prefix group* is a set of sequences whose first ``prefix_len`` tokens are the same physical
KV blocks: the first ``prefix_len // block_size`` entries of every member's block-table row are
identical. The kernels read those blocks once per tile for all members (through the first
member's row) and read each member's own blocks, from ``prefix_len`` to ``seq_len``, per
sequence. Sequences in no group are gathered into one extra group with ``prefix_len == 0`` so
that their decode rows still share tiles.

Precondition (checked here): every query token of a member sees the whole prefix, i.e.
``prefix_len <= seq_len - query_len + 1``. vLLM's cascade attention caps its common prefix at
the shortest computed context for the same reason; the prefix pass then needs no causal mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ._common import default_block_m


@dataclass(frozen=True)
class PrefixGroup:
    """Sequences (indices into the batch) that share their first ``prefix_len`` KV tokens."""

    seq_ids: Sequence[int]
    prefix_len: int


@dataclass
class SharedPrefixMetadata:
    """Everything the kernels need besides the tensors of one layer. All tensors are int32 on
    the kernels' device. Query token ``i`` of sequence ``s`` is ``q[query_start_loc[s] + i]``
    at absolute position ``seq_lens[s] - query_len(s) + i``.

    A group's *stacked matrix* has one row per (query token, query head of one KV head): row
    ``r`` is the group's ``r // num_queries_per_kv``-th query token (``group_tokens`` order) and
    query head ``kv_head * num_queries_per_kv + r % num_queries_per_kv``.
    """

    query_start_loc: torch.Tensor  # [num_seqs + 1]
    seq_lens: torch.Tensor  # [num_seqs], tokens in the KV cache including this step's
    seq_prefix_len: torch.Tensor  # [num_seqs], shared-prefix length of each sequence (or 0)
    token_seq: torch.Tensor  # [num_tokens], the sequence of each query token
    token_pos: torch.Tensor  # [num_tokens], the absolute position of each query token
    group_seqs: torch.Tensor  # [num_members], members of all groups, group after group
    group_prefix_len: torch.Tensor  # [num_groups]
    group_prefix_seq: torch.Tensor  # [num_groups], the member whose block table holds the prefix
    group_token_start: torch.Tensor  # [num_groups + 1], offsets into group_tokens
    group_tokens: torch.Tensor  # [num_tokens], query tokens in group order
    # One row per tile of BLOCK_M stacked rows: (group, first row, first member, end member).
    # The member range [lo, hi) lists the sequences whose rows lie in the tile.
    group_tiles: torch.Tensor  # [num_group_tiles, 4]
    # One row per tile of one sequence's rows: (sequence, first row).
    seq_tiles: torch.Tensor  # [num_seq_tiles, 2]
    num_queries_per_kv: int
    block_size: int
    group_block_m: int
    seq_block_m: int
    num_shared_groups: int  # groups with prefix_len > 0
    max_prefix_len: int
    max_suffix_len: int  # longest KV range after a sequence's prefix
    max_seq_len: int

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.numel()

    @property
    def num_tokens(self) -> int:
        return self.token_seq.numel()


def _to_numpy(x: torch.Tensor | Sequence[int]) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy().astype(np.int64)
    return np.asarray(x, dtype=np.int64)


def build_shared_prefix_metadata(
    groups: Sequence[PrefixGroup],
    query_start_loc: torch.Tensor | Sequence[int],
    seq_lens: torch.Tensor | Sequence[int],
    *,
    block_size: int,
    num_queries_per_kv: int,
    head_size: int,
    device: torch.device | str = "cpu",
    group_block_m: int | None = None,
    seq_block_m: int | None = None,
) -> SharedPrefixMetadata:
    """Validate the groups and build tile schedules for one step.

    ``query_start_loc`` and ``seq_lens`` are the host copies (vLLM keeps ``*_cpu`` versions);
    nothing here synchronises with the GPU. ``group_block_m`` / ``seq_block_m`` override the
    tile heights (see ``default_block_m``); they are fixed here because the schedule depends
    on them.
    """
    qsl = _to_numpy(query_start_loc)
    lens = _to_numpy(seq_lens)
    num_seqs = lens.shape[0]
    if qsl.shape != (num_seqs + 1,) or qsl[0] != 0 or np.any(np.diff(qsl) < 0):
        raise ValueError("query_start_loc must be non-decreasing, start at 0, len num_seqs + 1")
    q_lens = np.diff(qsl)
    if np.any(q_lens > lens):
        raise ValueError("a sequence has more query tokens than tokens (seq_lens includes them)")

    prefix_of_seq = np.zeros(num_seqs, dtype=np.int64)
    grouped = np.zeros(num_seqs, dtype=bool)
    plan: list[tuple[np.ndarray, int]] = []
    for group in groups:
        members = np.asarray(group.seq_ids, dtype=np.int64)
        if members.size == 0:
            raise ValueError("a prefix group has no sequences")
        if np.any(members < 0) or np.any(members >= num_seqs):
            raise ValueError(f"prefix group members {members.tolist()} out of range")
        if np.any(grouped[members]) or np.unique(members).size != members.size:
            raise ValueError("a sequence belongs to more than one prefix group")
        if group.prefix_len < 0 or group.prefix_len % block_size:
            raise ValueError(
                f"prefix_len {group.prefix_len} is not a multiple of block_size {block_size}")
        first_query_pos = lens[members] - q_lens[members]
        if np.any(group.prefix_len > first_query_pos + 1):
            raise ValueError(
                f"prefix_len {group.prefix_len} reaches past a member's first query token; "
                "every query token must see the whole prefix")
        grouped[members] = True
        prefix_of_seq[members] = group.prefix_len
        plan.append((members, group.prefix_len))
    ungrouped = np.flatnonzero(~grouped)
    if ungrouped.size:
        plan.append((ungrouped, 0))

    rows_per_seq = int(q_lens.max(initial=0)) * num_queries_per_kv
    group_block_m = group_block_m or default_block_m(head_size)
    seq_block_m = seq_block_m or default_block_m(head_size, rows_per_seq=rows_per_seq)

    group_tokens: list[np.ndarray] = []
    group_tiles: list[np.ndarray] = []
    token_start = [0]
    member_start = 0
    for members, _ in plan:
        member_q_lens = q_lens[members]
        group_tokens.extend(np.arange(qsl[s], qsl[s + 1]) for s in members)
        num_rows = int(member_q_lens.sum()) * num_queries_per_kv
        first_row = np.arange(0, num_rows, group_block_m, dtype=np.int64)
        last_row = np.minimum(first_row + group_block_m, num_rows) - 1
        # Member m owns the group's tokens [ends[m-1], ends[m]); find the members of the
        # first and last token of each tile.
        ends = np.cumsum(member_q_lens)
        lo = np.searchsorted(ends, first_row // num_queries_per_kv, side="right")
        hi = np.searchsorted(ends, last_row // num_queries_per_kv, side="right") + 1
        group_index = len(token_start) - 1
        group_tiles.append(np.stack(
            [np.full_like(first_row, group_index), first_row,
             lo + member_start, hi + member_start], axis=1))
        token_start.append(token_start[-1] + int(member_q_lens.sum()))
        member_start += members.size

    tiles_per_seq = -(-q_lens * num_queries_per_kv // seq_block_m)
    tile_seq = np.repeat(np.arange(num_seqs), tiles_per_seq)
    tile_index = np.arange(tile_seq.size) - np.repeat(np.cumsum(tiles_per_seq) - tiles_per_seq,
                                                      tiles_per_seq)
    seq_tiles = np.stack([tile_seq, tile_index * seq_block_m], axis=1)
    token_seq = np.repeat(np.arange(num_seqs), q_lens)
    token_pos = np.arange(qsl[-1]) - qsl[token_seq] + (lens - q_lens)[token_seq]

    def tensor(values: np.ndarray | Sequence[int], width: int | None = None) -> torch.Tensor:
        array = np.asarray(values, dtype=np.int64)
        if width is not None:
            array = array.reshape(-1, width)
        return torch.from_numpy(array.astype(np.int32)).to(device)

    def cat(parts: list[np.ndarray], width: int | None = None) -> torch.Tensor:
        empty = np.zeros((0,) if width is None else (0, width), dtype=np.int64)
        return tensor(np.concatenate(parts) if parts else empty, width)

    return SharedPrefixMetadata(
        query_start_loc=tensor(qsl),
        seq_lens=tensor(lens),
        seq_prefix_len=tensor(prefix_of_seq),
        token_seq=tensor(token_seq),
        token_pos=tensor(token_pos),
        group_seqs=cat([members for members, _ in plan]),
        group_prefix_len=tensor([prefix for _, prefix in plan]),
        group_prefix_seq=tensor([members[0] for members, _ in plan]),
        group_token_start=tensor(token_start),
        group_tokens=cat(group_tokens),
        group_tiles=cat(group_tiles, width=4),
        seq_tiles=tensor(seq_tiles, width=2),
        num_queries_per_kv=num_queries_per_kv,
        block_size=block_size,
        group_block_m=group_block_m,
        seq_block_m=seq_block_m,
        num_shared_groups=sum(1 for _, prefix in plan if prefix > 0),
        max_prefix_len=max((prefix for _, prefix in plan), default=0),
        max_suffix_len=int((lens - prefix_of_seq).max(initial=0)),
        max_seq_len=int(lens.max(initial=0)),
    )


def check_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 block_table: torch.Tensor, metadata: SharedPrefixMetadata) -> None:
    """Shape/layout checks of one layer's tensors against the step's metadata, shared by
    every kernel wrapper (cheap, no device sync)."""
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
