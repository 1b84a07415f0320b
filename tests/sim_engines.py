"""Sim engines for tests: vLLM's own scheduler and KV-cache manager (batchrun/engine/sim.py)
over a model folder holding only config.json, SmolLM2-135M's shape (30 layers, 3 KV heads of
64, fp32 on CPU: 46,080 bytes of KV a token). A KV cache of `blocks` 32-token blocks is
`blocks * BLOCK_BYTES` bytes; vLLM keeps one of them back (its null block), so `blocks - 1`
hold requests. After vLLM's first import (seconds) an engine starts in milliseconds: tests
start one each rather than share one."""

from __future__ import annotations

import json
from pathlib import Path

from batchrun.config import EngineOptions

BLOCK = 32
BLOCK_BYTES = BLOCK * 2 * 30 * 3 * 64 * 4
SMOLLM2_SHAPE = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
    "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
    "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "bos_token_id": 1,
    "eos_token_id": 2, "tie_word_embeddings": True, "dtype": "float32",
}


LLAMA_8B_SHAPE = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "bos_token_id": 128000,
    "eos_token_id": 128001, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}


def write_config_only_model(folder: Path, shape: dict | None = None) -> Path:
    """A model folder holding only config.json (SmolLM2-135M's shape unless given)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(shape or SMOLLM2_SHAPE))
    return folder


def sim_engine(model: Path, blocks: int, *, max_model_len: int | None = None, **options):
    """A sim engine with a KV cache of `blocks` blocks; its context is what the cache holds
    (at most 1,024 tokens) unless given."""
    from batchrun.engine.sim import SimEngine

    if max_model_len is None:
        max_model_len = min(1024, (blocks - 1) * BLOCK)
    return SimEngine(model, EngineOptions(kv_cache_memory=blocks * BLOCK_BYTES,
                                          max_model_len=max_model_len, **options))


def tokens(seed: int, n: int) -> list[int]:
    """n token ids, different for every seed (none is the model's EOS, 2)."""
    return [3 + (seed * 7919 + k * 104_729) % 40_000 for k in range(n)]


def drain(engine) -> tuple[dict, list]:
    """Step until the engine is empty: the results by id, and each step's output."""
    results, steps = {}, []
    while engine.num_unfinished():
        out = engine.step()
        steps.append(out)
        results.update({r.request_id: r for r in out.finished})
        assert len(steps) < 10_000
    return results, steps
