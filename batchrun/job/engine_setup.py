"""What a job asks of its engine before it starts: the sizing (KV cache, context, batch;
engine/sizing.py) and the attention backend (engine/attention/selection.py), each read from
the first shard's plan."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np

from ..config import AttentionMode, EngineKind
from ..engine.attention.selection import (
    DEFAULT_CONCURRENCY,
    AttentionChoice,
    SharingFigures,
    choose_attention,
    sharing_figures,
)
from ..engine.lora import fetch_adapters, lora_settings
from ..engine.sizing import (
    DEFAULT_MAX_NUM_SEQS,
    EngineSizing,
    LongestRequest,
    peak_window_tokens,
    size_engine,
)
from ..ingest.prepare import PreparedJob
from ..model import kv_bytes_per_token, num_layers
from .terminal import terminal


def engine_sizing(job: PreparedJob, engine_kind: str = EngineKind.VLLM, *,
                  longest: LongestRequest | None = None,
                  rest_unread: Callable[[], LongestRequest | None] | None = None,
                  ) -> EngineSizing:
    """The engine settings this job gets (see engine/sizing.py), without starting it. A job
    of several shards is sized by its first shard's plan and the whole job's `longest`
    request; its LoRA adapters by the job's config (engine/lora.py), those given as URIs
    fetched first (with every engine: the fake one stands in for vLLM's run).
    `rest_unread`: the rest of the job is not read yet (early start), so the engine is sized
    for any request up to the model's context; where its KV cache cannot hold one (a
    kv_cache_memory set below that), `rest_unread()` waits for the read's end and gives the
    job's longest request to size for."""
    adapters = _fetched_adapters(job)
    sizing = _sized(job, engine_kind, longest or job.longest_request()) if rest_unread is None \
        else _sized_early(job, engine_kind, rest_unread)
    if engine_kind == EngineKind.FAKE:
        return sizing
    from ..engine.vllm_engine import on_cpu

    # On CPU base rows take a slot of their own (engine/lora.py); the sim holds none.
    stand_in = engine_kind == EngineKind.VLLM and on_cpu()
    return replace(sizing, lora=lora_settings(job.config, adapters, base_stand_in=stand_in))


def _fetched_adapters(job: PreparedJob) -> dict[str, str]:
    """The job's adapters as local folders, saying on the terminal what came from where."""
    folders, fetched = fetch_adapters(job.config)
    for name, copy in fetched.items():
        how = (f"fetched ({len(copy.files)} files, {copy.bytes / 2**20:.1f} MiB) into"
               if copy.downloaded else "unchanged since fetched: its copy in")
        terminal().write(f"adapter {name!r}: {job.config.adapters[name]} {how} "
                         f"{copy.path}\n")
    return folders


def _sized(job: PreparedJob, engine_kind: str,
           longest: LongestRequest | None) -> EngineSizing:
    """Sized for `longest`; None: for any request up to the model's context."""
    opts = job.config.engine
    # The sim engine is sized as vLLM is (block size, KV bytes a token from config.json): a
    # simulation sees the cache a real run would have.
    device_kv = None
    if engine_kind == EngineKind.FAKE:
        block_size, per_token, cpu = opts.block_size or 4, 0, False
    else:
        from ..engine.vllm_engine import default_block_size, default_dtype, on_cpu
        from ..model import resolve_model

        model_dir = resolve_model(job.config.model_name)
        if engine_kind == EngineKind.SIM:  # priced for a GPU: that card's defaults and KV
            from ..engine.sim_devices import gpu_kv_cache_memory, sim_options

            opts = sim_options(opts)
            device_kv = None if opts.kv_cache_memory else gpu_kv_cache_memory(model_dir, opts)
        block_size, cpu = opts.block_size or default_block_size(), on_cpu()
        per_token = kv_bytes_per_token(model_dir, opts.dtype or default_dtype())
    if device_kv is not None:
        sizing = size_engine(longest=longest, context=job.max_model_len, block_size=block_size,
                             kv_bytes_per_token=per_token, user_kv_cache_memory=device_kv[0],
                             size_kv_from_job=False, window_tokens=0)
        return replace(sizing, kv_cache_reason=device_kv[1])
    size_kv = cpu and not opts.kv_cache_memory
    window = 0
    if size_kv and len(job.tokens.positions):
        groups, _ = job.run_groups(block_size, None)
        window = peak_window_tokens(
            np.concatenate([g.suffix_blocks for g in groups]),
            np.repeat(np.arange(len(groups)), [len(g.members) for g in groups]),
            np.array([g.prefix_blocks for g in groups], dtype=np.int64),
            opts.max_num_seqs or DEFAULT_MAX_NUM_SEQS, block_size)
    return size_engine(longest=longest, context=job.max_model_len,
                       block_size=block_size, kv_bytes_per_token=per_token,
                       user_kv_cache_memory=opts.kv_cache_memory, size_kv_from_job=size_kv,
                       window_tokens=window)


WHOLE_CONTEXT_REASON = ("the model's context: the engine started while the job was still "
                        "being read, before its longest request was known (early start)")


def _sized_early(job: PreparedJob, engine_kind: str,
                 rest_unread: Callable[[], LongestRequest | None]) -> EngineSizing:
    sizing = replace(_sized(job, engine_kind, None), max_model_len_reason=WHOLE_CONTEXT_REASON)
    capacity = sizing.kv_capacity_tokens
    if capacity is None or capacity >= sizing.max_model_len:
        return sizing
    return _sized(job, engine_kind, rest_unread() or job.longest_request())


def job_sharing(job: PreparedJob, *, block_size: int, kv_bytes_per_token: int,
                concurrency: int = DEFAULT_CONCURRENCY) -> SharingFigures:
    """The plan's shared-prefix figures (``selection.SharingFigures``), computed before an
    engine exists: planned at ``block_size`` without a KV capacity (the groups' prefixes do
    not depend on it)."""
    plan = job.request_order(block_size).plan()
    n = len(job.tokens.positions)
    prefix_ids = np.full(n, -1, dtype=np.int64)
    prefix_lens = np.zeros(n, dtype=np.int64)
    for g in plan.groups:
        if g.prefix_len:
            members = plan.order[g.start:g.end]
            prefix_ids[members], prefix_lens[members] = g.prefix_id, g.prefix_len
    return sharing_figures(job.tokens.lengths(), job.max_tokens, prefix_ids, prefix_lens,
                           kv_bytes_per_token=kv_bytes_per_token, concurrency=concurrency)


def choose_job_attention(job: PreparedJob) -> AttentionChoice:
    """The attention backend this job asks vLLM for (``selection.choose_attention``). Only
    ``auto`` on CUDA depends on the job, and only it plans here, before the engine starts."""
    from ..engine.vllm_engine import (
        default_block_size,
        default_dtype,
        kernels_available,
        platform_name,
    )
    from ..model import resolve_model

    opts = job.config.engine
    platform, kernels = platform_name(), kernels_available()
    sharing = None
    if (opts.attention == AttentionMode.AUTO and platform == "cuda" and kernels
            and len(job.tokens.positions)):
        model_dir = resolve_model(job.config.model_name)
        per_token = kv_bytes_per_token(model_dir, opts.dtype or default_dtype())
        # Per layer and per GPU: tensor parallelism splits the KV heads.
        per_gpu_layer = per_token // num_layers(model_dir) // max(1, opts.tensor_parallel_size)
        sharing = job_sharing(job, block_size=opts.block_size or default_block_size(),
                              kv_bytes_per_token=per_gpu_layer,
                              concurrency=opts.max_num_seqs or DEFAULT_CONCURRENCY)
    return choose_attention(opts.attention, platform, kernels_available=kernels,
                            sharing=sharing)
