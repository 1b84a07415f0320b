"""`--engine sim`: vLLM's own scheduler and KV-cache manager with a model that computes nothing
(batchrun/engine/sim.py). Caches here are small enough for vLLM's rules to show: a prefix
cached in whole blocks only, admission and preemption when the cache is full.

Every engine here reads a model folder holding only config.json (tests/sim_engines.py), so a
KV cache of `blocks` 32-token blocks is `blocks * BLOCK_BYTES` bytes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import batchrun
from batchrun.config import EngineOptions
from batchrun.engine.base import GenerationRequest
from batchrun.errors import ModelError
from batchrun.job.run import run_job
from tests.conftest import TEST_ENGINE_OPTIONS
from tests.helpers import job, shared_prefix_rows, write_jsonl
from tests.reliability.harness import batchrun as batchrun_cli
from tests.sim_engines import BLOCK, BLOCK_BYTES, drain, sim_engine, tokens

REPO = Path(__file__).resolve().parents[2]


def test_a_shared_prefix_is_computed_once_in_whole_blocks(config_only_model):
    engine = sim_engine(config_only_model, blocks=200)
    # vLLM keeps one of the 200 blocks back (its null block): 199 hold requests.
    assert engine.info.block_size == BLOCK and engine.info.kv_capacity_tokens == 199 * BLOCK
    system = tokens(0, 300)  # 9 whole blocks (288 tokens) and 12 tokens of a tenth
    prompts = {f"r{i}": system + tokens(i + 1, 20) for i in range(20)}
    for rid, prompt in prompts.items():
        engine.add(GenerationRequest(rid, prompt, max_tokens=4))
    results, steps = drain(engine)
    # vLLM caches whole blocks the moment they are scheduled, so the 19 requests scheduled
    # in the same step as r0 find its 9 blocks; the tenth block differs per request.
    assert {rid: r.cached_tokens for rid, r in results.items()} == \
        {rid: 0 if rid == "r0" else 288 for rid in prompts}
    figures = engine.figures()
    assert figures["prefill_tokens"] == 20 * 320 - 19 * 288
    assert figures["steps"] == len(steps) and figures["decode_requests"] == 20 * 3
    # Simulated seconds: the cost profile's, which says it is an assumption.
    assert figures["seconds"] == round(engine.profile.seconds(engine.counts()), 3) > 0
    assert figures["profile"]["assumed"] and figures["profile"]["source"].startswith("assum")
    # A prompt of exactly 10 blocks seen before: vLLM recomputes its last token, and so
    # its whole last block (288 cached, not 320).
    engine.add(GenerationRequest("again", prompts["r3"], max_tokens=1))
    assert drain(engine)[0]["again"].cached_tokens == 288


def test_a_tiny_kv_cache_admits_fewer_and_preempts_but_every_request_finishes(
        config_only_model):
    def run(blocks: int) -> tuple[dict, list, dict]:
        engine = sim_engine(config_only_model, blocks, max_model_len=512)
        for i in range(16):  # 96-token prompts (3 blocks) decoding 160 tokens (5 more)
            engine.add(GenerationRequest(f"r{i}", tokens(i, 96), max_tokens=160))
        results, steps = drain(engine)
        return results, steps, engine.figures()

    # 39 usable blocks (vLLM keeps one back): 13 prompts, 4 requests at their end.
    small, small_steps, small_figures = run(40)
    big, big_steps, big_figures = run(400)
    for results in (small, big):
        assert sorted(results) == sorted(f"r{i}" for i in range(16))
        assert {(r.completion_tokens, r.finish_reason) for r in results.values()} == \
            {(160, "length")}
    assert max(s.batch_size for s in big_steps) == 16
    assert max(s.batch_size for s in small_steps) < 16
    assert len(small_steps) > len(big_steps)
    # Preempted requests computed again what they had, beyond their prompts.
    assert small_figures["prefill_tokens"] > 16 * 96 == big_figures["prefill_tokens"]


def test_requests_end_at_their_target_length(config_only_model):
    engine = sim_engine(config_only_model, blocks=100)
    cases = {"one": (8, 1), "five": (8, 5), "at_max": (8, 8), "past_max": (8, 20),
             "none": (8, None), "zero": (8, 0)}
    for rid, (max_tokens, target) in cases.items():
        engine.add(GenerationRequest(rid, tokens(len(rid), 40), max_tokens=max_tokens,
                                     target_tokens=target))
    results, _ = drain(engine)
    got = {rid: (r.completion_tokens, r.finish_reason, r.text) for rid, r in results.items()}
    assert got == {"one": (1, "stop", ""), "five": (5, "stop", ""), "at_max": (8, "stop", ""),
                   "past_max": (8, "length", ""), "none": (8, "length", ""),
                   "zero": (1, "stop", "")}


def test_abort_drops_waiting_and_running_requests(config_only_model):
    engine = sim_engine(config_only_model, blocks=100, max_num_seqs=2)
    for i in range(5):
        engine.add(GenerationRequest(f"r{i}", tokens(i, 40), max_tokens=6))
    first = engine.step()
    assert first.batch_size == 2 and sorted(first.prefilled) == ["r0", "r1"]
    engine.abort(["r1", "r3"])  # one running, one waiting
    assert engine.num_unfinished() == 3
    results, _ = drain(engine)
    assert sorted(results) == ["r0", "r2", "r4"]
    assert engine.num_unfinished() == 0
    # Rows vLLM itself refuses come back as error results, as from VllmEngine.
    engine.add(GenerationRequest("long", tokens(9, 1024), max_tokens=1))
    assert drain(engine)[0]["long"].error.startswith("rejected by the engine")


def test_replayed_lengths_through_the_cli_with_a_config_only_model(tmp_path,
                                                                   config_only_model):
    # A first simulated run whose rows give their own lengths (the input column
    # `completion_tokens`) ...
    rows = [{"id": f"r{i}", "prompt_token_ids": tokens(i % 3, 100) + tokens(50 + i, 10)}
            for i in range(12)]
    write_jsonl(tmp_path / "first.jsonl", [
        {**row, "completion_tokens": 20 if i == 0 else 1 + i % 5} for i, row in enumerate(rows)])
    # (a job file that names the engine, run through the Python API) ...
    job_file = tmp_path / "first.toml"
    job_file.write_text(f'input = "first.jsonl"\noutput = "first.parquet"\n'
                        f'model = "{config_only_model}"\n[sampling]\nmax_tokens = 8\n'
                        f'[engine]\nkind = "sim"\nkv_cache_memory = {100 * BLOCK_BYTES}\n')
    summary = batchrun.run(job_file, progress=False)
    assert summary.exit_code == 0 and summary["engine"]["engine"] == "sim"
    before = {r["id"]: r for r in pq.read_table(tmp_path / "first.parquet").to_pylist()}
    assert before["r0"]["finish_reason"] == "length" and before["r0"]["completion_tokens"] == 8
    assert {before[f"r{i}"]["completion_tokens"] for i in range(1, 12)} == {1, 2, 3, 4, 5}
    # ... replayed by id into a second run of the same rows, without the column, in another
    # order and with room for more tokens: stopped rows stop where they stopped; the row
    # that ran out of max_tokens runs to the new max_tokens.
    second_in = write_jsonl(tmp_path / "second.jsonl", rows[::-1])
    out = tmp_path / "second.parquet"
    env = {**os.environ, "PYTHONPATH": str(REPO), "VLLM_LOGGING_LEVEL": "WARNING"}
    done = subprocess.run(
        [sys.executable, "-m", "batchrun", "run", str(second_in), "-o", str(out), "--engine",
         "sim", "--replay-lengths", "first.parquet", "--model", str(config_only_model),
         "--kv-cache-memory", str(100 * BLOCK_BYTES), "--max-tokens", "12", "--json"],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    after = {r["id"]: r for r in pq.read_table(out).to_pylist()}
    for rid, row in after.items():
        expected = (12, "length") if rid == "r0" else \
            (before[rid]["completion_tokens"], "stop")
        assert (row["completion_tokens"], row["finish_reason"], row["text"]) == (*expected, "")
    summary = json.loads(done.stdout)
    assert summary["simulated"]["replay_lengths"] == {
        "source": str(tmp_path / "first.parquet"), "rows": 12, "replayed": 11, "to_max_tokens": 1,
        "missing": 0}
    assert summary["simulated"]["steps"] == summary["batch"]["steps"] > 0
    assert summary["simulated"]["profile"]["assumed"] is True
    assert "simulated (vLLM's scheduler, no model)" in done.stderr
    assert "ASSUMED cost profile" in done.stderr


def test_text_rows_need_the_tokenizer_a_config_only_folder_lacks(tmp_path, config_only_model):
    cfg = replace(job(tmp_path, write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Hi."}])),
                  model=str(config_only_model))
    with pytest.raises(ModelError, match="no usable tokenizer.*pre-tokenized rows"):
        run_job(cfg, engine_kind="sim", interactive=False, handle_signals=False)


def story_rows(n: int, words: int, max_tokens: int) -> list[dict]:
    """Text rows that ask for more than max_tokens of story, each with its own notes."""
    return [{"id": f"s{i}", "max_tokens": max_tokens, "prompt": f"Notes {i}: " + " ".join(
        f"item {i}-{k} weighs {(i * 31 + k * 17) % 97} grams." for k in range(words))
        + " Write a long story about these items.\n"} for i in range(n)]


def assert_same_run(tmp_path: Path, real_engine, rows: list[dict],
                    options: EngineOptions) -> dict:
    """The job run on `real_engine`, then on a sim engine with the same options and the
    real run's lengths replayed: the same tokens (prompt, cached, computed, completion),
    engine steps, batch sizes and per-row results. The sim run's summary."""
    from batchrun.engine.sim import SimEngine
    from batchrun.model import default_model_dir

    path = write_jsonl(tmp_path / "in.jsonl", rows)
    real_job, sim_job = job(tmp_path / "real", path), job(tmp_path / "sim", path)
    sim_job = replace(sim_job, engine=replace(sim_job.engine, replay_lengths=real_job.output))
    real_engine.reset_prefix_cache()
    real = run_job(real_job, engine=real_engine, interactive=False, handle_signals=False)
    sim_engine_ = SimEngine(default_model_dir(), options)
    assert sim_engine_.info.kv_capacity_tokens == real_engine.info.kv_capacity_tokens
    assert sim_engine_.info.max_model_len == real_engine.info.max_model_len
    sim = run_job(sim_job, engine=sim_engine_, interactive=False, handle_signals=False)
    assert real.exit_code == sim.exit_code == 0
    r, s = real.summary, sim.summary
    assert s["tokens"] == r["tokens"]
    assert s["batch"]["steps"] == r["batch"]["steps"] == s["simulated"]["steps"]
    assert s["batch"]["mean_batch"] == r["batch"]["mean_batch"]
    key = ("id", "prompt_tokens", "cached_tokens", "completion_tokens", "finish_reason")
    assert [tuple(row[k] for k in key) for row in pq.read_table(sim_job.output).to_pylist()] \
        == [tuple(row[k] for k in key) for row in pq.read_table(real_job.output).to_pylist()]
    return s


def test_sim_with_replayed_lengths_matches_the_real_engine_step_for_step(tmp_path,
                                                                         vllm_engine):
    # Three families of chat rows sharing long prefixes, answers of mixed lengths.
    s = assert_same_run(tmp_path, vllm_engine, shared_prefix_rows(12, groups=3, max_tokens=16),
                        TEST_ENGINE_OPTIONS)
    assert s["tokens"]["cached"] > 0
    assert s["simulated"]["replay_lengths"]["missing"] == 0


@pytest.mark.slow
def test_sim_preempts_where_the_real_engine_preempts(tmp_path):
    """Stories that outgrow a KV cache of 40 blocks, run as a user would: `batchrun run` on
    the real engine, then `batchrun run --engine sim --replay-lengths` that output. Each in
    a process of its own: closing an in-process vLLM engine tears down vLLM's parallel state,
    which the session's engine (tests/conftest.py) shares."""
    path = write_jsonl(tmp_path / "in.jsonl", story_rows(8, words=8, max_tokens=160))
    same = ("--kv-cache-memory", str(40 * BLOCK_BYTES), "--max-model-len", "512",
            "--attention", "default", "--log-lines")
    real_out, sim_out = tmp_path / "real.parquet", tmp_path / "sim.parquet"
    real = batchrun_cli("run", path, "-o", real_out, "--enforce-eager", *same, timeout=900)
    assert real.returncode == 0, real.stderr[-2000:]
    sim = batchrun_cli("run", path, "-o", sim_out, "--engine", "sim", "--replay-lengths",
                   real_out, *same, timeout=300)
    assert sim.returncode == 0, sim.stderr[-2000:]
    r, s = (json.loads(Path(f"{out}.summary.json").read_text()) for out in (real_out, sim_out))
    assert s["engine"]["num_blocks"] == 40
    assert s["tokens"] == r["tokens"]
    assert s["batch"]["steps"] == r["batch"]["steps"] == s["simulated"]["steps"]
    assert s["batch"]["mean_batch"] == r["batch"]["mean_batch"]
    key = ("id", "prompt_tokens", "cached_tokens", "completion_tokens", "finish_reason")
    assert [tuple(row[k] for k in key) for row in pq.read_table(sim_out).to_pylist()] \
        == [tuple(row[k] for k in key) for row in pq.read_table(real_out).to_pylist()]
    # vLLM did preempt: requests computed again what they had held.
    assert s["simulated"]["prefill_tokens"] > s["tokens"]["computed_prompt"]
