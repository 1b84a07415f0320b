"""Each shard is planned once: sizing the engine (its KV cache from the plan's peak window),
choosing its attention, describing the plan and running the shard all cut the same
RequestOrder to their KV capacity instead of building the groups and the run order again."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from batchrun.config import EngineOptions, JobConfig
from batchrun.ingest import prepare
from batchrun.job.commands import describe_plan
from batchrun.job.run import run_job
from tests.helpers import shared_prefix_rows, write_jsonl


@pytest.fixture
def orders_built(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The block size of every RequestOrder built from here on."""
    built: list[int] = []
    real = prepare.order_requests

    def counted(*args, **kwargs):
        built.append(kwargs["block_size"])
        return real(*args, **kwargs)

    monkeypatch.setattr(prepare, "order_requests", counted)
    return built


def config(tmp_path: Path, rows: int, **engine) -> JobConfig:
    source = write_jsonl(tmp_path / "in.jsonl", shared_prefix_rows(rows, max_tokens=8))
    return JobConfig(input=source, output=tmp_path / "out.parquet",
                     engine=EngineOptions(max_model_len=4096, **engine))


def test_plan_sizes_the_engine_and_describes_one_order(tmp_path: Path,
                                                       orders_built: list[int]) -> None:
    # On CPU with no --kv-cache-memory the engine's KV cache is sized from the plan's peak
    # window (no capacity yet), then the plan is described at that capacity: one order.
    figures = describe_plan(config(tmp_path, 30, block_size=32), "vllm")
    assert figures["engine_sizing"]["window_tokens"] > 0
    assert figures["shards"]["count"] == 1
    assert orders_built == [32]


def test_a_sharded_run_orders_each_shard_once(tmp_path: Path,
                                              orders_built: list[int]) -> None:
    # A memory budget small enough for several shards: one order per shard, no more.
    cfg = replace(config(tmp_path, 400, block_size=4, memory_budget=1 << 20),
                  early_start=False)  # every row in the global plan's shards
    outcome = run_job(cfg, engine_kind="fake", handle_signals=False, interactive=False)
    shards = outcome.summary["shards"]["count"]
    assert outcome.exit_code == 0 and shards > 1
    assert orders_built == [4] * shards
