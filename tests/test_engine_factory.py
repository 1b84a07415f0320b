"""Starting engines (engine/factory.py) and what an engine reports for a job's summary
(base.EngineStats), without starting vLLM: its engine class is stood in for where needed."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchrun.config import EngineOptions, JobConfig
from batchrun.engine.base import EngineStats
from batchrun.engine.factory import engine_kind, start_engine, use_eager
from batchrun.engine.fake import FakeEngine
from batchrun.engine.sizing import EngineSizing
from batchrun.errors import ConfigError, EngineDiedError


def sizing() -> EngineSizing:
    return EngineSizing(block_size=32, max_model_len=512, max_model_len_reason="the job's",
                        kv_cache_memory=64 << 20, kv_cache_reason="given",
                        kv_bytes_per_token=46_080, window_tokens=0)


def config(tmp_path: Path, **engine: object) -> JobConfig:
    return JobConfig(input=tmp_path / "in.jsonl", output=tmp_path / "out.parquet",
                     engine=EngineOptions(**engine))


def test_the_fake_engine_takes_the_jobs_context_and_the_environments_knobs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHRUN_FAKE_ENGINE", '{"block_size": 8}')
    engine = start_engine("fake", config(tmp_path, max_model_len=300), sizing(), new_tokens=1,
                          attention=lambda: pytest.fail("only vLLM chooses an attention"))
    assert isinstance(engine, FakeEngine) and engine_kind(engine) == "fake"
    assert (engine.info.max_model_len, engine.info.block_size) == (300, 8)
    with pytest.raises(ConfigError, match="engine must be one of"):
        start_engine("tgi", config(tmp_path), sizing(), new_tokens=1)


def test_the_fake_engine_a_run_makes_keeps_no_id_per_request(tmp_path: Path) -> None:
    """A test's own fake engine lists what reached it; the one `--engine fake` makes does
    not: 10M ids would be ~0.7 GB of a scale run's peak, counted as batchrun's."""
    from batchrun.engine.base import GenerationRequest

    made = start_engine("fake", config(tmp_path), sizing(), new_tokens=1)
    own = FakeEngine()
    for engine in (made, own):
        engine.add(GenerationRequest("r0", [1, 2, 3, 4, 5], max_tokens=2))
        while not engine.step().finished:
            pass
    assert made.admission_order == [] and own.admission_order == ["r0"]


def test_cpu_runs_small_jobs_eagerly_and_the_jobs_own_choice_wins() -> None:
    assert use_eager(EngineOptions(), new_tokens=12_999, on_cpu=True)
    assert not use_eager(EngineOptions(), new_tokens=13_000, on_cpu=True)
    assert not use_eager(EngineOptions(), new_tokens=10, on_cpu=False)  # GPUs compile
    assert not use_eager(EngineOptions(enforce_eager=False), new_tokens=10, on_cpu=True)
    assert use_eager(EngineOptions(enforce_eager=True), new_tokens=10**6, on_cpu=False)


@pytest.mark.parametrize("error, raised, says", [
    (ValueError("KV cache is too small"), ConfigError,
     r"refused its settings: KV cache is too small \(engine settings: max_model_len 512, "
     r"kv_cache_memory 64MiB\)"),
    (RuntimeError("worker died"), EngineDiedError,
     "failed to start: RuntimeError: worker died"),
])
def test_vllm_failing_to_start_says_whose_fix_it_is(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception, raised: type,
        says: str) -> None:
    started: dict = {}

    class Refuses:
        def __init__(self, model_dir: Path, options: EngineOptions, **kwargs: object) -> None:
            started.update(options=options, **kwargs)
            raise error

    monkeypatch.setattr("batchrun.engine.vllm_engine.VllmEngine", Refuses)
    with pytest.raises(raised, match=says):
        start_engine("vllm", config(tmp_path, enforce_eager=True), sizing(), new_tokens=1,
                     attention=lambda: None)
    # The sized settings reach the engine.
    assert (started["options"].max_model_len, started["options"].kv_cache_memory) == \
        (512, 64 << 20)
    assert started["enforce_eager"] is True


def test_a_jobs_engine_stats_are_what_it_added_to_a_shared_engine() -> None:
    before = EngineStats({"xgrammar": 3}, {"forward_calls": 10, "query_key_pairs": 100,
                                           "prefix_query_key_pairs": 40, "backend": "b"})
    after = EngineStats({"xgrammar": 5, "guidance": 1},
                        {"forward_calls": 16, "query_key_pairs": 160,
                         "prefix_query_key_pairs": 100, "backend": "b"})
    job = after.since(before)
    assert job.structured_backends == {"xgrammar": 2, "guidance": 1}
    assert job.attention["forward_calls"] == 6 and job.attention["prefix_share"] == 1.0
    assert job.attention_summary()["batchrun_backend_ran"]
    fake = FakeEngine().stats(new_job=True)
    assert fake.since(fake) == EngineStats() and fake.attention_summary() is None
