"""Start the engine a job runs on: vLLM, the simulation of vLLM's scheduler (sim.py), or the
deterministic fake engine for pipeline tests.

The one place that knows which engine kinds exist and what starting each takes; the rest of
batchrun talks to the `Engine` interface (engine/base.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from ..config import EngineKind, EngineOptions, JobConfig
from ..errors import ConfigError, EngineDiedError, UsageError, one_line
from .base import Engine

if TYPE_CHECKING:
    from .attention.selection import AttentionChoice
    from .sizing import EngineSizing

# On CPU, a job asking for fewer new tokens than this runs vLLM eagerly: compiling costs
# minutes at every start, and only decoding this much wins it back (benchmarks/README.md,
# "Eager or compiled on CPU").
EAGER_BELOW_NEW_TOKENS = 13_000


def use_eager(options: EngineOptions, new_tokens: int, on_cpu: bool) -> bool:
    """The job's own choice (--enforce-eager / --compile), else eager on CPU for small jobs;
    on GPUs vLLM compiles."""
    if options.enforce_eager is not None:
        return options.enforce_eager
    return on_cpu and new_tokens < EAGER_BELOW_NEW_TOKENS


def start_engine(kind: str, config: JobConfig, sizing: EngineSizing, *, new_tokens: int,
                 attention: Callable[[], AttentionChoice | None] | None = None) -> Engine:
    """Start a `kind` engine ("vllm", "sim" or "fake") with the job's sized settings. `new_tokens`:
    the job's max new tokens in all (the eager/compile choice); `attention`: called to
    choose the attention backend the job asks vLLM for (it may plan the job: only vLLM
    calls it). An attention mode the platform lacks (AttentionUnavailable) and settings vLLM
    refuses are the user's to fix (ConfigError, exit 2); any other failure to start is an
    engine failure (EngineDiedError, exit 4)."""
    if kind == EngineKind.FAKE:
        from .fake import FAKE_EMBEDDING_DIM, FakeEngine

        return FakeEngine.from_env(
            max_model_len=config.engine.max_model_len or 2048,
            **({"embedding_dim": FAKE_EMBEDDING_DIM} if config.embeds else {}))
    if config.embeds:
        return _start_embed_engine(kind, config, new_tokens)
    if kind not in (EngineKind.VLLM, EngineKind.SIM):
        raise ConfigError(f"engine must be one of {EngineKind.values()}, not {kind!r}")
    from ..model import resolve_model
    from .vllm_engine import VllmEngine, on_cpu

    eager = use_eager(config.engine, new_tokens, on_cpu())
    options = replace(config.engine, max_model_len=sizing.max_model_len,
                      kv_cache_memory=sizing.kv_cache_memory)
    if kind == EngineKind.SIM:  # vLLM's settings checks raise ConfigError there
        from .sim import SimEngine

        return SimEngine(resolve_model(config.model_name), options, enforce_eager=eager,
                         lora=sizing.lora)
    choice = attention() if attention is not None else None  # not vLLM's verdict: as it is
    try:
        return VllmEngine(resolve_model(config.model_name), options, enforce_eager=eager,
                          attention=choice, lora=sizing.lora)
    except UsageError:  # the model, the attention mode: worded for the user already
        raise
    except ValueError as e:  # vLLM's verdict on its settings (too small a KV cache, ...)
        cause = one_line(e, None)
        raise ConfigError(
            f"the vLLM engine refused its settings: {cause} (engine settings: "
            f"max_model_len {sizing.max_model_len:,}, kv_cache_memory "
            f"{_mib(sizing.kv_cache_memory)}); change them in the job file's [engine] "
            "section or with the matching flag") from e
    except Exception as e:  # RuntimeError, torch's OutOfMemoryError, a dead worker, ...
        cause = one_line(e, None)
        raise EngineDiedError(f"the vLLM engine failed to start: {type(e).__name__}: {cause}") \
            from e


def _start_embed_engine(kind: str, config: JobConfig, new_tokens: int) -> Engine:
    """vLLM's pooling runner, with the job's own settings (an embedding job is not sized
    from a plan: it holds no KV cache past a request's one step)."""
    if kind != EngineKind.VLLM:
        raise ConfigError(f"an embedding job runs on the vllm or fake engine, not {kind!r}; "
                          "drop --engine sim")
    from ..model import resolve_model
    from .vllm_embed import VllmEmbedEngine
    from .vllm_engine import on_cpu

    eager = use_eager(config.engine, new_tokens, on_cpu())
    try:
        return VllmEmbedEngine(resolve_model(config.model_name), config.engine, enforce_eager=eager,
                               normalize=config.normalize)
    except UsageError:
        raise
    except ValueError as e:  # vLLM's verdict on the model or its settings
        raise ConfigError(f"the vLLM embedding engine refused its settings: "
                          f"{one_line(e, None)}; is {config.model_name} an embedding model?") from e
    except Exception as e:
        raise EngineDiedError(f"the vLLM embedding engine failed to start: "
                              f"{type(e).__name__}: {one_line(e, None)}") from e


def engine_kind(engine: Engine) -> EngineKind:
    """The kind of an engine already started (a caller's shared engine)."""
    from .fake import FakeEngine
    from .sim import SimEngine

    if isinstance(engine, FakeEngine):
        return EngineKind.FAKE
    return EngineKind.SIM if isinstance(engine, SimEngine) else EngineKind.VLLM


def _mib(size: int | None) -> str:
    return "the engine's default" if size is None else f"{size / 2**20:,.0f}MiB"
