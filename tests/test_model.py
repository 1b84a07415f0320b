"""The default model's cache: converted once, even when jobs start together."""

from __future__ import annotations

import threading
import time

import pytest

from batchrun import model
from batchrun.errors import ModelError
from batchrun.model import default_model_dir, kv_bytes_per_token, resolve_model


def test_two_jobs_starting_together_convert_the_default_model_once(tmp_path, monkeypatch):
    monkeypatch.setenv("BATCHRUN_CACHE_DIR", str(tmp_path))
    calls = []

    def slow_convert(gguf, target):
        calls.append(gguf)
        time.sleep(0.3)  # long enough for the other job to arrive and wait on the lock
        target.mkdir()
        (target / "config.json").write_text("{}")

    monkeypatch.setattr(model, "_convert_gguf", slow_convert)
    results = []
    threads = [threading.Thread(target=lambda: results.append(default_model_dir()))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert results[0] == results[1] == tmp_path / "models" / "SmolLM2-135M-Instruct"


def test_a_model_folder_needs_a_config(tmp_path):
    with pytest.raises(ModelError, match="config.json"):
        resolve_model(str(tmp_path))


def test_kv_bytes_per_token_of_smollm2():
    # 30 layers x 3 KV heads x 64 dims x (K and V) x 4 bytes (fp32)
    assert kv_bytes_per_token(default_model_dir(), "float32") == 30 * 3 * 64 * 2 * 4
