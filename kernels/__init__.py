"""Triton shared-prefix attention over vLLM's paged KV cache (installed as ``batchrun_kernels``).

Typical use, once per step and then once per layer::

    metadata = build_shared_prefix_metadata(
        groups, query_start_loc_cpu, seq_lens_cpu,
        block_size=16, num_queries_per_kv=8, head_size=128, device="cuda")
    out = shared_prefix_attention(q, k_cache, v_cache, block_table, metadata, scale)

The three passes are public too (``prefix_attention``, ``suffix_attention``,
``merge_attention_partials``), as are the single-launch ``fused_shared_prefix_attention``,
the per-sequence baseline ``paged_attention`` and torch references in ``reference``.
"""

from .attention import shared_prefix_attention
from .merge import merge_attention_partials
from .metadata import PrefixGroup, SharedPrefixMetadata, build_shared_prefix_metadata
from .prefix_attention import fused_shared_prefix_attention, prefix_attention
from .suffix_attention import paged_attention, suffix_attention

__all__ = [
    "PrefixGroup",
    "SharedPrefixMetadata",
    "build_shared_prefix_metadata",
    "fused_shared_prefix_attention",
    "merge_attention_partials",
    "paged_attention",
    "prefix_attention",
    "shared_prefix_attention",
    "suffix_attention",
]
