"""Planning a job whose rows run on several LoRA adapters.

vLLM keys its prefix cache by adapter: a prefix computed under one adapter is computed again
under another, however alike the tokens (the KV differs: the adapter changes the
projections). So the planner sees each row's tokens behind its adapter's key (`adapter_keys`):
the prefix tree shares nothing across adapters (`PrefixTree.build(..., keys)`: the root's
children are per adapter), shards are cut in (adapter, tokens) order, identical rows are
identical only on one adapter, and the block ideal is counted per adapter.

Where the engine holds fewer adapters at once than the job has (vLLM's max_loras), a request
whose adapter has no slot waits until the running adapters' requests finish; then the plan
runs each adapter's groups together (`order_requests_by_adapter`), the adapters one after
another. Otherwise adapters interleave freely, decode-heavy work first as in any plan.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from .prefix_tree import PrefixTree
from .prefixes import boundary_reuse
from .schedule import RequestOrder, _run_arrays, _run_order, choose_groups

BASE_KEY = 0  # the base model's key: no adapter


def adapter_key(name: str | None) -> int:
    """A stable int32 key per adapter name (the same in every shard and every run), from 1;
    BASE_KEY for none."""
    if name is None:
        return BASE_KEY
    return 1 + zlib.crc32(name.encode()) % (2**31 - 2)


def adapter_keys(column: pa.Array | pa.ChunkedArray) -> np.ndarray | None:
    """adapter_key of each row of a request table's `adapter` column, as int32; None when
    every row runs on the base model (nothing to key)."""
    if column.null_count == len(column):
        return None
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if not pa.types.is_dictionary(column.type):
        column = column.dictionary_encode()
    names = column.dictionary.to_pylist()
    keys = np.array([adapter_key(n) for n in names] + [BASE_KEY], dtype=np.int32)
    indices = column.indices.fill_null(len(names)).to_numpy(zero_copy_only=False)
    return keys[indices]


def keyed_prompt(key: int, tokens: np.ndarray) -> np.ndarray:
    """A prompt as shards sort and cut it: its adapter's key, then its tokens."""
    return np.concatenate((np.array([key], dtype=np.int32), tokens.astype(np.int32)))


def order_requests_by_adapter(tree: PrefixTree, keys: np.ndarray, max_tokens: np.ndarray,
                              *, block_size: int) -> RequestOrder:
    """schedule.order_requests, with each adapter's requests run together, adapters in key
    order (the base model first). `tree` is built with these `keys`, so every shared group
    lies within one adapter and keeps its place inside that adapter's run."""
    max_tokens = np.asarray(max_tokens, dtype=np.int64)
    block_tree = tree.coarsen(block_size)
    owner, group_parent = choose_groups(block_tree, deeper_wins_ties=True)
    group_node = owner[block_tree.request_node]
    run = _run_order(block_tree, group_parent >= 0, group_node, tree.lengths[tree.order],
                     max_tokens[tree.order], True)
    run = run[np.argsort(keys[tree.order][run], kind="stable")]
    runs = _run_arrays(tree, block_tree, group_node, run, max_tokens, block_size)
    return RequestOrder(tree, block_tree, group_parent, runs, block_size)


def per_adapter_figures(tree: PrefixTree, names: Sequence[str | None],
                        block_size: int) -> dict[str, dict[str, Any]]:
    """Per adapter ("" for the base model): requests, prompt tokens and the block ideal (as
    PrefixTree.block_ideal_computed_tokens, which a tree built with adapter keys counts per
    adapter already). `names`: each request's adapter, by request index."""
    reusable = np.minimum(tree.lcp, tree.lengths[tree.order] - 1)
    reused = np.maximum(reusable, 0) // block_size * block_size
    labels = np.array(["" if n is None else n for n in names], dtype=object)[tree.order]
    out: dict[str, dict[str, Any]] = {}
    for label in sorted(set(labels.tolist())):
        mine = labels == label
        prompt = int(tree.lengths[tree.order][mine].sum())
        out[label] = {"requests": int(mine.sum()), "prompt_tokens": prompt,
                      "block_ideal_computed_tokens": prompt - int(reused[mine].sum())}
    return out


def add_adapter_figures(total: dict[str, dict[str, Any]], shard: dict[str, dict[str, Any]],
                        last: np.ndarray | None, first: np.ndarray | None,
                        block_size: int) -> None:
    """Sum one shard's per-adapter figures into `total`, less what its first prompt shares
    with the previous shard's last (keyed prompts, `keyed_prompt`): counted in both shards,
    once in the whole job's tree, and only where the two run on one adapter."""
    for name, figures in shard.items():
        into = total.setdefault(name, dict.fromkeys(figures, 0))
        for k, v in figures.items():
            into[k] = into.get(k, 0) + v
    if last is None or first is None or last[0] != first[0]:
        return
    _, ideal = boundary_reuse(last[1:], first[1:], block_size)
    for name, figures in total.items():
        if adapter_key(name or None) == int(first[0]):
            figures["block_ideal_computed_tokens"] -= ideal


def with_savings(figures: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each adapter's figures with its expected prefill saving (1 - ideal / prompt)."""
    return {name: {**f, "expected_prefill_saving": (1 - f["block_ideal_computed_tokens"]
                                                    / f["prompt_tokens"])
                   if f["prompt_tokens"] else 0.0}
            for name, f in figures.items()}
