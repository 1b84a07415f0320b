"""Random paged-KV batches with shared prefixes, for the tests and the benchmark.

The layout is vLLM's: physical blocks are handed out in a random order, each group's prefix
blocks appear at the start of every member's block-table row, and rows are padded with
other sequences' block ids (a kernel that reads past a sequence's end gets wrong numbers,
not zeros).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .metadata import PrefixGroup, SharedPrefixMetadata, build_shared_prefix_metadata


@dataclass(frozen=True)
class SeqSpec:
    """One sequence after its group's prefix: ``suffix_len`` own tokens (this step's
    ``query_len`` tokens are the last ones of the sequence)."""

    suffix_len: int
    query_len: int = 1


@dataclass(frozen=True)
class GroupSpec:
    """Sequences sharing ``prefix_len`` tokens; ``prefix_len == 0`` means no sharing (the
    sequences are left out of the ``PrefixGroup`` list)."""

    prefix_len: int
    seqs: Sequence[SeqSpec]


@dataclass
class PagedBatch:
    q: torch.Tensor  # [num_tokens, num_q_heads, head_size]
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_size]
    v_cache: torch.Tensor
    block_table: torch.Tensor  # [num_seqs, max_blocks] int32
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32, host
    seq_lens: torch.Tensor  # [num_seqs] int32, host
    groups: list[PrefixGroup]
    scale: float

    @property
    def num_queries_per_kv(self) -> int:
        return self.q.shape[1] // self.k_cache.shape[2]

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q, k_cache, v_cache, block_table), the per-layer kernel arguments."""
        return self.q, self.k_cache, self.v_cache, self.block_table

    @property
    def reference_args(self) -> tuple:
        """Arguments of the ``reference.ref_*`` functions that take groups."""
        return (self.q, self.k_cache, self.v_cache, self.block_table, self.query_start_loc,
                self.seq_lens, self.groups, self.scale)

    def metadata(self, **overrides) -> SharedPrefixMetadata:
        return build_shared_prefix_metadata(
            self.groups, self.query_start_loc, self.seq_lens,
            block_size=self.k_cache.shape[1], num_queries_per_kv=self.num_queries_per_kv,
            head_size=self.q.shape[2], device=self.q.device, **overrides)


def make_paged_batch(
    groups: Sequence[GroupSpec],
    *,
    num_kv_heads: int,
    num_queries_per_kv: int,
    head_size: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
    shuffle: bool = True,
) -> PagedBatch:
    """Build a batch; ``shuffle`` interleaves the groups' sequences in the batch order."""
    rng = torch.Generator().manual_seed(seed)
    members = [(g, spec) for g, group in enumerate(groups) for spec in group.seqs]
    order = torch.randperm(len(members), generator=rng).tolist() if shuffle else range(len(members))
    members = [members[i] for i in order]

    def blocks(tokens: int) -> int:
        return -(-tokens // block_size)

    for group in groups:
        if group.prefix_len % block_size:
            raise ValueError(f"prefix_len {group.prefix_len} is not a multiple of {block_size}")
    num_blocks = (sum(blocks(group.prefix_len) for group in groups)
                  + sum(blocks(spec.suffix_len) for _, spec in members) + 1)
    physical = torch.randperm(num_blocks, generator=rng).tolist()
    prefix_blocks = [[physical.pop() for _ in range(blocks(group.prefix_len))]
                     for group in groups]

    rows = [prefix_blocks[g] + [physical.pop() for _ in range(blocks(spec.suffix_len))]
            for g, spec in members]
    width = max((len(row) for row in rows), default=0) + 1
    block_table = torch.randint(0, num_blocks, (len(rows), width), generator=rng,
                                dtype=torch.int32)
    for s, row in enumerate(rows):
        block_table[s, : len(row)] = torch.tensor(row, dtype=torch.int32)

    seq_lens = torch.tensor([groups[g].prefix_len + spec.suffix_len for g, spec in members],
                            dtype=torch.int32)
    query_lens = torch.tensor([spec.query_len for _, spec in members], dtype=torch.int32)
    query_start_loc = torch.zeros(len(members) + 1, dtype=torch.int32)
    query_start_loc[1:] = torch.cumsum(query_lens, 0)

    prefix_groups = [
        PrefixGroup(seq_ids=[s for s, (g, _) in enumerate(members) if g == gi],
                    prefix_len=group.prefix_len)
        for gi, group in enumerate(groups) if group.prefix_len > 0 and group.seqs
    ]
    device_rng = torch.Generator(device=device).manual_seed(seed)
    num_q_heads = num_kv_heads * num_queries_per_kv
    cache_shape = (num_blocks, block_size, num_kv_heads, head_size)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=device_rng, device=device, dtype=dtype)

    return PagedBatch(
        q=randn(int(query_start_loc[-1]), num_q_heads, head_size),
        k_cache=randn(*cache_shape),
        v_cache=randn(*cache_shape),
        block_table=block_table.to(device),
        query_start_loc=query_start_loc,
        seq_lens=seq_lens,
        groups=prefix_groups,
        scale=head_size**-0.5,
    )
