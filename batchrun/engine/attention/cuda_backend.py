"""batchrun's CUDA attention backend: TRITON_ATTN plus the shared-prefix Triton kernels of
``batchrun_kernels`` (Hydragen-style: each group's prefix read once per tile of stacked
queries).

The plugin points ``AttentionBackendEnum.TRITON_ATTN`` at ``BatchrunTritonAttentionBackend``
(the engine must select TRITON_ATTN). It keeps TRITON_ATTN's name, KV-cache layout and
kernels and changes two things:
- the metadata builder finds the step's prefix groups (``groups.plan_step``, on host copies)
  and builds the kernels' per-step metadata once for all layers;
- the impl's forward calls ``shared_prefix_attention`` for steps that have groups (the
  kernels batch the sequences outside every group themselves), the stock forward otherwise.

Full CUDA graphs are declined (``AttentionCGSupport.NEVER``, so vLLM runs attention eagerly
between piecewise graphs): the kernels' grids and metadata change every step, and a captured
decode graph would replay the stock path and never use the groups.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import ClassVar

import numpy as np
import torch
from batchrun_kernels import (
    PrefixGroup,
    SharedPrefixMetadata,
    build_shared_prefix_metadata,
    shared_prefix_attention,
)
from vllm.config import VllmConfig, get_layers_from_vllm_config
from vllm.model_executor.layers.attention import Attention
from vllm.utils.torch_utils import is_quantized_kv_cache
from vllm.v1.attention.backend import AttentionCGSupport, AttentionType, CommonAttentionMetadata
from vllm.v1.attention.backends.triton_attn import (
    TritonAttentionBackend,
    TritonAttentionImpl,
    TritonAttentionMetadata,
    TritonAttentionMetadataBuilder,
)
from vllm.v1.kv_cache_interface import AttentionSpec

from . import stats
from .groups import PrefixPolicy, StepGroups, step_groups
from .mode import get_mode, load_mode_from_env

BACKEND_NAME = "batchrun-triton"  # what the summary's attention.backend says when this ran


@dataclass
class BatchrunTritonMetadata(TritonAttentionMetadata):
    shared_prefix: SharedPrefixMetadata | None = None  # None: the stock forward for the step
    query_key_pairs: int = 0
    prefix_query_key_pairs: int = 0


def plan_kernel_step(policy: PrefixPolicy | None, query_start_loc: np.ndarray,
                     seq_lens: np.ndarray, read_block_table: Callable[[int], np.ndarray], *,
                     block_size: int, num_queries_per_kv: int, head_size: int,
                     device: torch.device | str) -> tuple[StepGroups, SharedPrefixMetadata | None]:
    """The step's groups (``groups.step_groups``) and, when some pay, the kernels' metadata
    for them. Host arrays in; ``read_block_table(width)`` copies only the block-table columns
    the groups can span."""
    step = step_groups(policy, query_start_loc, seq_lens, block_size, read_block_table)
    if not step.groups:
        return step, None
    groups = [PrefixGroup(g.seq_ids.tolist(), g.num_blocks * block_size) for g in step.groups]
    return step, build_shared_prefix_metadata(
        groups, query_start_loc, seq_lens, block_size=block_size,
        num_queries_per_kv=num_queries_per_kv, head_size=head_size, device=device)


def kv_bytes_per_token(spec: AttentionSpec) -> int:
    """KV bytes of one token in one layer on this GPU (its KV heads, K and V): what a shared
    prefix saves per member and token."""
    return spec.num_kv_heads * spec.state_content_size_bytes


class BatchrunTritonMetadataBuilder(TritonAttentionMetadataBuilder):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec: AttentionSpec, layer_names: list[str],
                 vllm_config: VllmConfig, device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        load_mode_from_env()  # this engine's BATCHRUN_ATTENTION (see cpu_backend)
        stats.note_tp_rank()
        self.kv_bytes_per_token = kv_bytes_per_token(kv_cache_spec)
        layers = get_layers_from_vllm_config(vllm_config, Attention, layer_names)
        # Speculative decoding makes the host seq_lens optimistic; R-SWA changes visibility.
        self.shared_prefix_ok = (
            vllm_config.speculative_config is None
            and self.rswa_window is None
            and all(isinstance(layer.impl, BatchrunTritonAttentionImpl)
                    and layer.impl.supports_shared_prefix() for layer in layers.values()))

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> BatchrunTritonMetadata:
        base = super().build(common_prefix_len, common_attn_metadata, fast_build)
        metadata = BatchrunTritonMetadata(**{f.name: getattr(base, f.name) for f in fields(base)})
        cm = common_attn_metadata
        num_reqs = cm.num_reqs
        query_start_loc = cm.query_start_loc_cpu[:num_reqs + 1].numpy().astype(np.int64)
        # Exact without speculative decoding (excluded above); no device sync.
        seq_lens = cm.seq_lens_cpu_upper_bound[:num_reqs].numpy().astype(np.int64)
        usable = (self.shared_prefix_ok and cm.causal is True
                  and cm.mm_req_doc_ranges is None)
        policy = PrefixPolicy.for_mode(get_mode(), "cuda", self.kv_bytes_per_token) \
            if usable else None
        # The block table lives on the GPU: copying its first columns is this step's one sync.
        step, shared = plan_kernel_step(
            policy, query_start_loc, seq_lens,
            lambda width: cm.block_table_tensor[:num_reqs, :width].cpu().numpy(),
            block_size=self.block_size, num_queries_per_kv=self.num_heads_q // self.num_heads_kv,
            head_size=self.headdim, device=self.device)
        metadata.shared_prefix = shared
        metadata.query_key_pairs = step.query_key_pairs
        metadata.prefix_query_key_pairs = step.prefix_query_key_pairs
        return metadata


class BatchrunTritonAttentionImpl(TritonAttentionImpl):
    def supports_shared_prefix(self) -> bool:
        """What the kernels implement: plain causal decoder attention on an unquantized cache
        (no windows, ALiBi, soft-capping, sinks, chunked lookback)."""
        return (self.attn_type == AttentionType.DECODER and self.alibi_slopes is None
                and self.sliding_window == (-1, -1) and not self.logits_soft_cap
                and self.sinks is None and self.chunk_lookback == -1
                and not is_quantized_kv_cache(self.kv_cache_dtype))

    def forward(self, layer: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                value: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: BatchrunTritonMetadata, output: torch.Tensor,
                output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        shared = None if attn_metadata is None else attn_metadata.shared_prefix
        if shared is None or output_scale is not None:
            super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                            output_scale, output_block_scale)
            if attn_metadata is not None:
                stats.record_forward(BACKEND_NAME, attn_metadata.query_key_pairs, 0)
            return output
        if output_block_scale is not None:
            raise NotImplementedError("fused block-scale output quantization is not supported")
        # Logical (blocks, kv_heads, block, 2 * head) -> the kernels' (blocks, block, kv_heads,
        # head) views of K and V, as TRITON_ATTN itself reads them.
        key_cache, value_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)
        tokens = shared.num_tokens
        shared_prefix_attention(query[:tokens], key_cache, value_cache,
                                attn_metadata.block_table, shared, self.scale,
                                out=output[:tokens])
        stats.record_forward(BACKEND_NAME, attn_metadata.query_key_pairs,
                             attn_metadata.prefix_query_key_pairs)
        return output


class BatchrunTritonAttentionBackend(TritonAttentionBackend):
    """TRITON_ATTN with shared-prefix attention; same name, layout and kernels otherwise."""

    @staticmethod
    def get_impl_cls() -> type[BatchrunTritonAttentionImpl]:
        return BatchrunTritonAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[BatchrunTritonMetadataBuilder]:
        return BatchrunTritonMetadataBuilder
