"""Find the groups of running sequences that share prefix KV blocks, once per engine step.

With prefix caching, requests that share a prompt prefix point at the same physical blocks at
the start of their block tables. A *shared prefix* is a set of >= 2 sequences whose first
``num_blocks`` block ids are identical. Attention over those blocks can then be computed for
all members' queries at once (Hydragen), and merged exactly with each member's attention over
the rest of its keys, provided every query token sees the whole prefix. So only full blocks
that lie entirely before a sequence's first query token count (a block this step is still
writing for one sequence may already be mapped by another).

Numpy on host copies: the same code plans the CPU and the CUDA backends.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ...config import AttentionMode
from ...plan.prefix_tree import PrefixTree
from ...plan.sharing import choose_groups
from . import stats
from .selection import MIN_SAVED_BYTES_PER_LAYER, min_saved_tokens

# `auto` takes a group when it saves at least this many bytes of key/value reads per layer,
# (members - 1) * prefix tokens * KV bytes per token and layer; None: never (no group search).
# - cpu: never. The stock kernel was faster at every size measured (benchmarks/README.md,
#   "Attention plugin (CPU)"): it finds the shared blocks in the CPU cache anyway, so sharing
#   saves it little, and the same FLOPs cost more as torch ops.
# - cuda: 24 MiB, an estimate (not yet measured on a GPU) of the shared path's fixed cost per
#   layer call, derived in selection.py, which applies the same rule to the whole job before
#   the engine starts.
AUTO_MIN_SAVED_BYTES: dict[str, int | None] = {"cpu": None, "cuda": MIN_SAVED_BYTES_PER_LAYER}
# A member's queries are stacked into the prefix matmul and its suffix is attended in torch;
# long prefill chunks gain nothing from sharing (their own queries already amortise the
# prefix reads) and would make the suffix score matrix large, so they stay on the stock path.
MAX_MEMBER_QUERY_LEN = 64


@dataclass(frozen=True)
class SharedPrefix:
    """Batch rows ``seq_ids`` (ascending) whose first ``num_blocks`` KV blocks are the same."""

    seq_ids: np.ndarray
    num_blocks: int

    @property
    def num_members(self) -> int:
        return int(self.seq_ids.size)

    def saved_keys(self, block_size: int) -> int:
        """Key reads per KV head that one shared pass saves against per-sequence attention."""
        return (self.num_members - 1) * self.num_blocks * block_size


@dataclass(frozen=True)
class PrefixPolicy:
    """Which sequences may join a group, and which groups are worth the shared-prefix path."""

    min_saved_keys: int = 1
    max_member_query_len: int = MAX_MEMBER_QUERY_LEN

    @classmethod
    def for_mode(cls, mode: str, platform: str,
                 kv_bytes_per_token: int | None = None) -> PrefixPolicy | None:
        """``prefix`` takes every group; ``auto`` only the ones that pay on ``platform``
        (``cpu`` or ``cuda``), for a cache of ``kv_bytes_per_token`` per token and layer.
        None: the stock path for every step, without a group search."""
        if mode == AttentionMode.PREFIX:
            return cls(min_saved_keys=1)
        threshold = AUTO_MIN_SAVED_BYTES[platform] if mode == AttentionMode.AUTO else None
        if threshold is None:
            return None
        if not kv_bytes_per_token:
            raise ValueError(f"auto on {platform} needs the KV bytes per token")
        return cls(min_saved_keys=min_saved_tokens(kv_bytes_per_token, threshold))

    def eligible_blocks(self, query_lens: np.ndarray, seq_lens: np.ndarray,
                        block_size: int) -> np.ndarray:
        """Leading blocks each sequence may share: full blocks wholly before its first query
        token; none for padding rows and long prefill chunks."""
        blocks = (seq_lens - query_lens) // block_size
        blocks[(query_lens <= 0) | (query_lens > self.max_member_query_len)] = 0
        return blocks

    def split(self, groups: list[SharedPrefix],
              block_size: int) -> tuple[list[SharedPrefix], list[SharedPrefix]]:
        """(groups that pay, groups left to the stock path)."""
        kept = [g for g in groups if g.saved_keys(block_size) >= self.min_saved_keys]
        return kept, [g for g in groups if g.saved_keys(block_size) < self.min_saved_keys]


@dataclass(frozen=True)
class StepGroups:
    """The groups one step will use, and its attention work in (query, key) pairs."""

    groups: list[SharedPrefix]
    skipped: int  # groups found but not worth the shared-prefix path
    query_key_pairs: int
    prefix_query_key_pairs: int  # served by the groups' shared prefixes


def step_groups(policy: PrefixPolicy | None, query_start_loc: np.ndarray,
                seq_lens: np.ndarray, block_size: int,
                read_block_table: Callable[[int], np.ndarray]) -> StepGroups:
    """What a backend's metadata builder does each step (both backends): group the step's
    sequences and count the step in the attention stats. ``policy`` None: no groups, the
    stock path for the whole step (the mode, or the layers, rule the shared path out)."""
    query_lens = np.diff(query_start_loc)
    if policy is None:
        stats.record_step([], 0)
        return StepGroups([], 0, causal_pairs(query_lens, seq_lens), 0)
    step = plan_step(policy, query_lens, seq_lens, block_size, read_block_table)
    stats.record_step([(g.num_members, g.num_blocks * block_size) for g in step.groups],
                      step.skipped)
    return step


def plan_step(policy: PrefixPolicy, query_lens: np.ndarray, seq_lens: np.ndarray,
              block_size: int, read_block_table: Callable[[int], np.ndarray]) -> StepGroups:
    """Group the step's sequences. ``read_block_table(width)`` returns the host block table's
    first ``width`` columns (on a GPU only those are copied to the host)."""
    eligible = policy.eligible_blocks(query_lens, seq_lens, block_size)
    width = int(eligible.max(initial=0))
    found = find_shared_prefixes(read_block_table(width), eligible) if width else []
    kept, skipped = policy.split(found, block_size)
    prefix_pairs = sum(int(query_lens[g.seq_ids].sum()) * g.num_blocks * block_size
                       for g in kept)
    return StepGroups(kept, len(skipped), causal_pairs(query_lens, seq_lens), prefix_pairs)


def find_shared_prefixes(block_table: np.ndarray, eligible_blocks: np.ndarray) -> list[
        SharedPrefix]:
    """Partition the rows that share leading block ids into groups of >= 2 rows.

    ``block_table`` is ``[num_seqs, >= max(eligible_blocks)]``; only each row's first
    ``eligible_blocks[row]`` entries are compared. Rows sorted by block ids form a prefix tree
    (neighbours' common blocks are its LCP array), and the groups are the planner's choice on
    it (``batchrun.plan.sharing.choose_groups``): the most prefix key reads saved,
    ``sum((members - 1) * prefix)``, preferring fewer, larger groups on ties.
    """
    width = int(eligible_blocks.max(initial=0))
    rows = np.flatnonzero(eligible_blocks > 0)
    if width == 0 or rows.size < 2:
        return []
    table = block_table[rows, :width].astype(np.int64)
    # Entries past a row's eligible blocks must match nothing: give each row its own negatives.
    beyond = np.arange(width)[None, :] >= eligible_blocks[rows, None]
    table = np.where(beyond, -1 - rows[:, None], table)
    order = np.lexsort(table.T[::-1])  # lexicographic by column 0, then 1, ...
    table, rows = table[order], rows[order]
    equal = table[1:] == table[:-1]
    lcp = np.zeros(rows.size, dtype=np.int64)  # common blocks with the row before
    lcp[1:] = np.where(equal.all(axis=1), width, equal.argmin(axis=1))
    tree = PrefixTree.from_lcp(np.arange(rows.size), lcp, eligible_blocks[rows])
    owner, _ = choose_groups(tree, deeper_wins_ties=False)
    group = owner[tree.request_node]
    by_group = np.argsort(group, kind="stable")
    nodes, starts, sizes = np.unique(group[by_group], return_index=True, return_counts=True)
    return [SharedPrefix(np.sort(rows[by_group[s:s + m]]), int(tree.node_depth[u]))
            for u, s, m in zip(nodes.tolist(), starts.tolist(), sizes.tolist(), strict=True)
            if u != 0 and m >= 2]


def causal_pairs(query_lens: np.ndarray, seq_lens: np.ndarray) -> int:
    """(query, key) pairs of causal attention: query ``i`` of a sequence sees its context plus
    queries ``0..i``."""
    context = seq_lens - query_lens
    return int((query_lens * context + query_lens * (query_lens + 1) // 2).sum())
