"""The engine is sized from the job: its context length from the longest request, its KV
cache (on CPU) from the plan's peak window, and a request that can never fit is refused
before vLLM starts, naming the row and the setting."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from batchrun.config import EngineOptions
from batchrun.engine import sizing
from batchrun.engine.sizing import (
    job_kv_cache_memory,
    longest_request,
    peak_window_tokens,
    size_engine,
)
from batchrun.errors import EXIT_USAGE, ConfigError
from batchrun.ingest.prepare import prepare_job
from batchrun.io.output.checkpoint import partial_dir_for
from batchrun.job.commands import describe_plan
from batchrun.job.engine_setup import engine_sizing
from tests.helpers import job, write_jsonl
from tests.reliability.harness import batchrun

GIB = 2**30


def test_peak_window_counts_each_group_prefix_once_per_window() -> None:
    # Run order: group 0 (prefix 4 blocks) has 3 members of 1, 2, 1 own blocks; group 1
    # (unshared) has 2 members of 5 blocks each. Windows of 2 requests:
    #   [0,1] 1+2 + 4 = 7   [1,2] 2+1 + 4 = 7   [2,3] 1+5 + 4 = 10   [3,4] 5+5 = 10
    own = np.array([1, 2, 1, 5, 5])
    group_of = np.array([0, 0, 0, 1, 1])
    prefixes = np.array([4, 0])
    assert peak_window_tokens(own, group_of, prefixes, window=2, block_size=32) == 10 * 32
    # A window as large as the job is the whole job: every block, each prefix once.
    assert peak_window_tokens(own, group_of, prefixes, window=99, block_size=32) == 18 * 32


def test_kv_cache_is_the_window_plus_headroom_capped_by_free_memory() -> None:
    per_token = 46_080  # SmolLM2 in fp32: 2 x 30 layers x 3 kv heads x 64 dims x 4 bytes
    kv, reason = job_kv_cache_memory(10_000, 1_024, per_token, available=20 * GIB)
    assert kv == 12_500 * per_token and reason.startswith("the plan's peak window")
    # A window larger than 40% of the free memory gets 40% of it.
    kv, reason = job_kv_cache_memory(10_000_000, 1_024, per_token, available=20 * GIB)
    assert kv == int(8 * GIB) // per_token * per_token and "40% of the 20.0 GiB" in reason
    # Never less than one longest request: the engine could not start with less.
    kv, reason = job_kv_cache_memory(100, 4_096, per_token, available=20 * GIB)
    assert kv == 4_096 * per_token and reason == "room for the job's longest request"


def test_context_is_the_longest_request_rounded_to_a_block() -> None:
    lengths, max_tokens = np.array([10, 700, 40]), np.array([64, 100, 500])
    longest = longest_request(lengths, max_tokens, lambda i: f"row-{i}")
    assert (longest.row_id, longest.tokens) == ("row-1", 800)
    sized = size_engine(longest=longest, context=8192, block_size=32, kv_bytes_per_token=0,
                        user_kv_cache_memory=None, size_kv_from_job=False, window_tokens=0)
    assert sized.max_model_len == 800 and "'row-1': 700 prompt + 100 max_tokens" in \
        sized.max_model_len_reason
    # Never above the model's context.
    capped = size_engine(longest=longest, context=512, block_size=32, kv_bytes_per_token=0,
                         user_kv_cache_memory=None, size_kv_from_job=False, window_tokens=0)
    assert capped.max_model_len == 512


def long_row_job(tmp_path: Path, **engine: object):
    rows = [{"id": f"short-{i}", "prompt": f"Say {i}.", "max_tokens": 8} for i in range(5)]
    rows.append({"id": "the-long-one", "prompt": "word " * 600, "max_tokens": 40})
    cfg = job(tmp_path, write_jsonl(tmp_path / "in.jsonl", rows))
    return replace(cfg, engine=EngineOptions(**engine))


def test_a_job_with_one_long_row_gets_that_rows_context(tmp_path: Path) -> None:
    prepared = prepare_job(long_row_job(tmp_path))
    longest = prepared.longest_request()
    assert longest.row_id == "the-long-one" and longest.max_tokens == 40
    sized = engine_sizing(prepared)
    assert sized.max_model_len == -(-longest.tokens // 32) * 32 < 1024
    assert sized.kv_capacity_tokens >= sized.max_model_len
    # `batchrun plan` shows the same sizes the run would get.
    assert describe_plan(prepared.config)["engine_sizing"] == sized.to_dict()


def test_a_row_larger_than_the_kv_cache_is_refused_before_the_engine_starts(
        tmp_path: Path) -> None:
    cfg = long_row_job(tmp_path, kv_cache_memory=16 << 20)
    with pytest.raises(ConfigError) as refused:
        engine_sizing(prepare_job(cfg))
    message = str(refused.value)
    assert "row id 'the-long-one' needs" in message and "kv_cache_memory 16MiB holds 352" in \
        message and "set --kv-cache-memory to at least 30MiB" in message


def test_the_cli_exits_2_naming_the_row_and_setting_and_leaves_nothing_to_resume(
        tmp_path: Path) -> None:
    cfg = long_row_job(tmp_path)
    result = batchrun("run", cfg.input, "-o", cfg.output, "--kv-cache-memory", "16MiB",
                      timeout=120)
    assert result.returncode == EXIT_USAGE, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("batchrun: error: row id 'the-long-one'")
    assert "--kv-cache-memory" in lines[0] and "Traceback" not in result.stderr
    assert not partial_dir_for(cfg.output).exists() and not cfg.output.exists()


def test_free_memory_is_read_from_the_system() -> None:
    assert sizing.memory_available() > 0


def test_plan_json_reports_the_sizes(tmp_path: Path) -> None:
    cfg = long_row_job(tmp_path)
    result = batchrun("plan", cfg.input, "--json", timeout=120)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)["engine_sizing"]
    assert figures["max_model_len"] % 32 == 0 and figures["kv_capacity_tokens"] > 0
    assert figures["kv_cache_reason"].startswith("the plan's peak window")
