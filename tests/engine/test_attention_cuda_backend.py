"""The CUDA backend's host-side planning and its forward, run on CPU: the Triton kernels in
Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU). What this
cannot cover: vLLM on CUDA selecting and driving the backend (no GPU, no CUDA vLLM here)."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import numpy as np
import pytest
import torch

# The backend subclasses vLLM's TRITON_ATTN: without vLLM (the GPU machine's kernel-only
# environment) there is nothing to test. With vLLM installed, a failing import is an error.
if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed: the CUDA backend extends its TRITON_ATTN backend",
                allow_module_level=True)
from batchrun.engine.attention import cuda_backend  # noqa: E402
from batchrun.engine.attention.groups import PrefixPolicy  # noqa: E402

BLOCK, KV_HEADS, PER_KV, HEAD = 16, 2, 2, 32
KV_BYTES = 2 * KV_HEADS * HEAD * 2  # bf16 K and V of one token in one layer


def batch():
    """Five sequences: 0, 1, 3 share two blocks (decode, decode, 3-token chunk), 2 shares one
    block with them but is still prefilling it, 4 is alone."""
    table = np.array([[1, 2, 5, 0], [1, 2, 6, 0], [1, 7, 8, 0], [1, 2, 9, 10], [11, 12, 0, 0]],
                     dtype=np.int32)
    seq_lens = np.array([40, 35, 20, 50, 30])
    query_lens = np.array([1, 1, 20, 3, 1])
    return table, seq_lens, np.concatenate([[0], np.cumsum(query_lens)])


def test_plan_kernel_step_builds_the_kernel_metadata_for_the_groups():
    table, seq_lens, qsl = batch()
    step, shared = cuda_backend.plan_kernel_step(
        PrefixPolicy.for_mode("prefix", "cuda"), qsl, seq_lens, lambda width: table[:, :width],
        block_size=BLOCK, num_queries_per_kv=PER_KV, head_size=HEAD, device="cpu")
    assert [(g.seq_ids.tolist(), g.num_blocks) for g in step.groups] == [([0, 1, 3], 2)]
    assert shared.num_shared_groups == 1
    assert shared.group_prefix_len.tolist() == [32, 0]  # plus the kernels' ungrouped batch
    assert shared.group_seqs.tolist() == [0, 1, 3, 2, 4]
    assert shared.seq_prefix_len.tolist() == [32, 32, 0, 32, 0]
    assert step.prefix_query_key_pairs == (1 + 1 + 3) * 32
    step, shared = cuda_backend.plan_kernel_step(
        PrefixPolicy.for_mode("auto", "cuda", KV_BYTES), qsl, seq_lens,
        lambda width: table[:, :width], block_size=BLOCK, num_queries_per_kv=PER_KV,
        head_size=HEAD, device="cpu")
    assert shared is None and step.skipped == 1  # 2 * 32 saved keys do not pay


def test_kv_bytes_per_token_from_vllms_cache_spec():
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=KV_HEADS, head_size=HEAD,
                             dtype=torch.bfloat16)
    assert cuda_backend.kv_bytes_per_token(spec) == KV_BYTES == spec.page_size_bytes // BLOCK


def test_triton_impl_forward_matches_paged_attention():
    from batchrun_kernels.reference import ref_paged_attention

    table, seq_lens, qsl = batch()
    gen = torch.Generator().manual_seed(0)
    # TRITON_ATTN's logical cache: [blocks, kv_heads, block, 2 * head].
    kv_cache = torch.randn(13, KV_HEADS, BLOCK, 2 * HEAD, generator=gen)
    query = torch.randn(int(qsl[-1]), KV_HEADS * PER_KV, HEAD, generator=gen)
    _, shared = cuda_backend.plan_kernel_step(
        PrefixPolicy(), qsl, seq_lens, lambda width: table[:, :width], block_size=BLOCK,
        num_queries_per_kv=PER_KV, head_size=HEAD, device="cpu")
    block_table = torch.from_numpy(table)
    metadata = SimpleNamespace(shared_prefix=shared, block_table=block_table,
                               query_key_pairs=1, prefix_query_key_pairs=1)
    impl = cuda_backend.BatchrunTritonAttentionImpl(
        KV_HEADS * PER_KV, HEAD, HEAD**-0.5, KV_HEADS, None, None, "auto")
    assert impl.supports_shared_prefix()
    out = impl.forward(None, query, None, None, kv_cache, metadata, torch.empty_like(query))

    key_cache, value_cache = kv_cache.transpose(1, 2).split(HEAD, dim=-1)
    expected = ref_paged_attention(query, key_cache, value_cache, block_table,
                                   torch.from_numpy(qsl), torch.from_numpy(seq_lens), HEAD**-0.5)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)
