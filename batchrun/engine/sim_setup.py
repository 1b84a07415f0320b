"""vLLM's v1 scheduler and KV-cache manager, set up the way vLLM's own engine core sets them
up (vllm/v1/engine/core.py, EngineCore.__init__ and _initialize_kv_caches), minus the model.

The configuration is the one a real run would have: the same EngineArgs batchrun's VllmEngine
passes (vllm_engine.engine_args: dtype, block size, context, KV memory, max_num_seqs),
turned into a VllmConfig by vLLM itself with the offline LLM class's defaults (on CPU 256
sequences and 4,096 tokens a step). The KV cache specs are what vLLM's model runner would
publish for a decoder of full-attention layers: one FullAttentionSpec per layer, with the
KV heads, head size and layer count vLLM reads from config.json; vLLM then turns them and the
KV memory into blocks with its own code. So a folder with only config.json is enough.

What is not simulated: sliding-window and hybrid (Mamba) layers (every layer is taken as full
attention), LoRA, multimodal inputs, speculative decoding, KV connectors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..config import AttentionMode, EngineOptions
from ..errors import ConfigError
from .lora import LoraSettings
from .sim_devices import sim_options, sim_scheduler_args
from .vllm_engine import engine_args, environment, on_cpu


@dataclass
class SimScheduler:
    """A scheduler ready to take requests, and what requests need from its setup."""

    scheduler: Any  # vllm.v1.core.sched.scheduler.Scheduler
    vllm_config: Any
    block_size: int
    num_blocks: int
    block_hasher: Callable[[Any], list[Any]] | None
    vocab_size: int
    eos_token_id: int


def sim_engine_args(model_dir: Path, options: EngineOptions, *,
                    enforce_eager: bool, lora: LoraSettings | None = None) -> dict[str, Any]:
    """The EngineArgs keywords of a real run with these options, without a tokenizer and with
    vLLM's own attention (batchrun's attention backend does not change scheduling); for a
    GPU sim device, with that card's defaults where the options set none (sim_devices.py)."""
    args = engine_args(model_dir, replace(sim_options(options),
                                          attention=AttentionMode.DEFAULT.value),
                       enforce_eager=enforce_eager, lora=lora)
    args["skip_tokenizer_init"] = True
    args.update(sim_scheduler_args(options))
    return args


def build_scheduler(model_dir: Path, options: EngineOptions, *,
                    enforce_eager: bool = True, lora: LoraSettings | None = None) -> SimScheduler:
    """vLLM's scheduler for a model folder (config.json is all it reads) and these options.
    Raises ConfigError where vLLM refuses the settings (a KV cache too small for the
    context, ...), as a real engine would refuse to start."""
    from vllm import EngineArgs
    from vllm.usage.usage_lib import UsageContext

    args = sim_engine_args(model_dir, options, enforce_eager=enforce_eager, lora=lora)
    # As the real engine on CPU runs: in-process (vllm_engine.engine_environment).
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"} if on_cpu() else {}
    try:
        with environment(env):
            config = EngineArgs(**args).create_engine_config(
                usage_context=UsageContext.LLM_CLASS)
        return _scheduler(config)
    except ValueError as e:
        raise ConfigError(f"vLLM refused the sim engine's settings: {e}") from e


def another_scheduler(sim: SimScheduler) -> SimScheduler:
    """A scheduler with the same settings as `sim` and a KV cache of its own (a replica's):
    building the configuration again would take a second or more."""
    return _scheduler(sim.vllm_config)


def _kv_specs(config: Any) -> dict[str, Any]:
    """The KV cache spec of every attention layer, as vLLM's model runner publishes them for
    a decoder of full-attention layers."""
    from vllm.utils.torch_utils import kv_cache_dtype_str_to_dtype
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    model = config.model_config
    spec = FullAttentionSpec(
        block_size=config.cache_config.block_size,
        num_kv_heads=model.get_num_kv_heads(config.parallel_config),
        head_size=model.get_head_size(),
        dtype=kv_cache_dtype_str_to_dtype(config.cache_config.cache_dtype, model))
    return {f"model.layers.{i}.self_attn.attn": spec
            for i in range(model.get_num_layers(config.parallel_config))}


def _scheduler(config: Any) -> SimScheduler:
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.attention.backends.utils import (
        get_supported_kv_cache_layouts,
        resolve_kv_cache_layout,
    )
    from vllm.v1.core.kv_cache_utils import (
        generate_scheduler_kv_cache_config,
        get_kv_cache_configs,
        get_request_block_hasher,
        init_none_hash,
        resolve_cache_hit_alignment_tokens,
        resolve_kv_cache_block_sizes,
        update_kv_cache_capacity,
    )
    from vllm.v1.core.single_type_kv_cache_manager import register_all_kvcache_specs
    from vllm.v1.structured_output import StructuredOutputManager

    memory = config.cache_config.kv_cache_memory_bytes
    if not memory:
        raise ConfigError("the sim engine needs the KV cache size a real run would have: "
                          "set --kv-cache-memory (job file: [engine] kv_cache_memory)")
    register_all_kvcache_specs(config)
    specs = _kv_specs(config)
    # The layout of a block in memory (which vLLM resolves from the attention backends the
    # workers report) changes no block count: the default preference, as for no backend.
    layouts = [[layout.name for layout in get_supported_kv_cache_layouts([])]]
    config.cache_config.kv_cache_layout = None
    resolve_kv_cache_layout(config, layouts, specs.values())
    kv_configs = get_kv_cache_configs(config, [specs], [memory])
    kv_config = generate_scheduler_kv_cache_config(kv_configs)
    config.cache_config.num_gpu_blocks = kv_config.num_blocks
    config.cache_config.block_size = min(g.kv_cache_spec.block_size
                                         for g in kv_config.kv_cache_groups)
    update_kv_cache_capacity(config, kv_config)
    config.validate_block_size()
    block_size, hash_block_size = resolve_kv_cache_block_sizes(kv_config, config)
    kv_config.hash_block_size = hash_block_size
    kv_config.cache_hit_alignment_tokens = resolve_cache_hit_alignment_tokens(
        kv_config, config, block_size, hash_block_size)
    scheduler_cls = config.scheduler_config.get_scheduler_cls()
    # log_stats off: the real engine keeps iteration stats, which decide nothing here.
    scheduler = scheduler_cls(vllm_config=config, kv_cache_config=kv_config,
                              structured_output_manager=StructuredOutputManager(config),
                              block_size=block_size, hash_block_size=hash_block_size,
                              log_stats=False)
    hasher = None
    if config.cache_config.enable_prefix_caching:
        hash_fn = get_hash_fn_by_name(config.cache_config.prefix_caching_hash_algo)
        init_none_hash(hash_fn)
        hasher = get_request_block_hasher(hash_block_size, hash_fn)
    hf = config.model_config.hf_text_config
    eos = getattr(hf, "eos_token_id", None)
    eos = eos[0] if isinstance(eos, list) and eos else eos
    return SimScheduler(scheduler, config, block_size, kv_config.num_blocks, hasher,
                        int(getattr(hf, "vocab_size", 0) or 32_000),
                        int(eos) if isinstance(eos, int) else 0)
