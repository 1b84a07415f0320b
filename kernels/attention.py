"""The entry point: shared-prefix attention for one layer of one step.

Two ways to compute the same thing (``mode``):
- ``"split"``: ``prefix_attention`` + ``suffix_attention`` into one fp32 workspace, then
  ``merge_attention_partials``; three launches, but each pass can split its key ranges, so a
  few long prefixes still fill the GPU.
- ``"fused"``: ``fused_shared_prefix_attention``, one launch, no workspace; the parallelism is
  (group tiles x KV heads), so it pays when there are many sequences.
``"auto"`` takes the fused kernel when its grid already covers every SM, and plain
per-sequence ``paged_attention`` when no group has a prefix this step.
"""

from __future__ import annotations

from typing import Literal

import torch
import triton

from ._common import new_partials
from .merge import merge_attention_partials
from .metadata import SharedPrefixMetadata
from .prefix_attention import fused_shared_prefix_attention, prefix_attention
from .suffix_attention import paged_attention, suffix_attention

Mode = Literal["auto", "fused", "split"]

# A split below this many keys costs more in partial traffic than it gains in parallelism.
MIN_KEYS_PER_SPLIT = 512


def _num_sms(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_num_splits(num_programs: int, max_kv_len: int, device: torch.device) -> int:
    """Splits of each key range so that about two waves of programs cover the GPU; 1 on CPU
    (the interpreter gains nothing from more programs)."""
    num_sms = _num_sms(device)
    if num_sms is None or num_programs == 0 or num_programs >= num_sms:
        return 1
    wanted = triton.cdiv(2 * num_sms, num_programs)
    return max(1, min(wanted, max_kv_len // MIN_KEYS_PER_SPLIT))


def shared_prefix_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    metadata: SharedPrefixMetadata,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    mode: Mode = "auto",
    num_prefix_splits: int | None = None,
    num_suffix_splits: int | None = None,
) -> torch.Tensor:
    """Causal attention of every query token over all of its sequence's keys, reading each
    group's shared prefix once per tile rather than once per sequence.

    Args:
        q: ``[num_tokens, num_q_heads, head_size]`` (fp16, bf16 or fp32), the step's queries.
        k_cache, v_cache: ``[num_blocks, block_size, num_kv_heads, head_size]``, q's dtype,
            already holding this step's keys and values (vLLM writes them first).
        block_table: ``[num_seqs, max_blocks]`` int32.
        metadata: ``build_shared_prefix_metadata(...)`` for this step (shared by all layers).
        scale: softmax scale, usually ``head_size ** -0.5``.
        out: optional ``[num_tokens, num_q_heads, head_size]`` output buffer.
        mode: ``"fused"``, ``"split"`` or ``"auto"`` (see the module docstring).
        num_prefix_splits, num_suffix_splits: key-range splits of the split path's two passes;
            by default enough to fill the GPU.
    Returns:
        ``out``, in q's dtype.
    """
    if out is None:
        out = torch.empty_like(q)
    num_kv_heads = k_cache.shape[2]
    group_programs = metadata.group_tiles.shape[0] * num_kv_heads
    seq_programs = metadata.seq_tiles.shape[0] * num_kv_heads
    if mode == "auto" and metadata.num_shared_groups == 0:
        # Nothing is shared this step: the per-sequence kernel alone, no partials, no merge.
        return paged_attention(q, k_cache, v_cache, block_table, metadata, scale, out=out,
                               num_splits=default_num_splits(seq_programs, metadata.max_seq_len,
                                                             q.device))
    if mode == "auto":
        num_sms = _num_sms(q.device)
        mode = "fused" if num_sms is None or group_programs >= num_sms else "split"
    if mode == "fused":
        return fused_shared_prefix_attention(q, k_cache, v_cache, block_table, metadata, scale,
                                             out=out)
    if mode != "split":
        raise ValueError(f"mode must be 'auto', 'fused' or 'split', not {mode!r}")

    if num_prefix_splits is None:
        num_prefix_splits = default_num_splits(group_programs, metadata.max_prefix_len, q.device)
    if num_suffix_splits is None:
        num_suffix_splits = default_num_splits(seq_programs, metadata.max_suffix_len, q.device)
    # Both passes write into one workspace, so the merge is a single launch over all parts.
    num_parts = num_prefix_splits + num_suffix_splits
    parts, lse = new_partials(q, num_parts)
    prefix_attention(q, k_cache, v_cache, block_table, metadata, scale,
                     num_splits=num_prefix_splits,
                     out=parts[:num_prefix_splits], lse=lse[:num_prefix_splits])
    suffix_attention(q, k_cache, v_cache, block_table, metadata, scale,
                     num_splits=num_suffix_splits,
                     out=parts[num_prefix_splits:], lse=lse[num_prefix_splits:])
    return merge_attention_partials(parts, lse, out=out)
