"""Jobs bigger than their memory budget: cut into prefix shards on disk, run shard by shard,
written back in input order, with budgets small enough that a few hundred rows must spill.

What the shard boundaries cost in computed prompt tokens is vLLM's prefix cache's doing: that
test runs on the sim engine (vLLM's own scheduler and KV cache, engine/sim.py) with a cache
far smaller than the job. The others are about the pipeline (the same rows, order and
columns as an unsharded run, resume, the OpenAI output) and run on the deterministic fake
engine, which is fast and whose text depends on the prompt only."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pyarrow.parquet as pq

from batchrun.engine.fake import FakeEngine
from batchrun.errors import EXIT_INTERRUPTED, EXIT_OK
from batchrun.io.output.checkpoint import Checkpoint, partial_dir_for
from batchrun.io.output.writer import _AtomicOutput
from batchrun.job.run import run_job
from tests.helpers import job, write_jsonl
from tests.reliability.harness import cli
from tests.sim_engines import sim_engine, tokens
from tests.test_structured import check_openai_output

BUDGET = 200_000  # bytes: a run of ~25 KB, shards of ~25 KB: 300 rows make about 8 shards


def rag_rows(n: int, seed: int = 0) -> list[dict]:
    """Rows under 6 system prompts and 30 documents, shuffled, each with a tag to pass
    through."""
    rng = random.Random(seed)
    systems = [f"System {k}: " + "rule " * rng.randint(5, 20) for k in range(6)]
    docs = [f" Document {d}: " + "fact " * rng.randint(3, 15) for d in range(30)]
    rows = [{"id": f"r{i}", "prompt": rng.choice(systems) + rng.choice(docs) + f" Q{i}?",
             "max_tokens": rng.choice([2, 4, 8]), "tag": i % 5} for i in range(n)]
    rng.shuffle(rows)
    return rows


def sharded_job(tmp_path, rows, budget=BUDGET, name="out", early_start=False):
    """The job in prefix shards; `early_start` False: every row in the global plan's shards
    (test_early_start.py runs the pipeline's claims with it on)."""
    cfg = job(tmp_path, write_jsonl(tmp_path / "in.jsonl", rows))
    cfg = replace(cfg, output=tmp_path / name / "results.parquet", early_start=early_start,
                  columns=replace(cfg.columns, passthrough=("tag",)))
    return replace(cfg, engine=replace(cfg.engine, memory_budget=budget))


def run_fake(cfg, engine=None, **kwargs):
    engine = engine or FakeEngine(block_size=4, kv_capacity_tokens=4096, max_num_seqs=16)
    return run_job(cfg, engine_kind="fake", engine=engine, interactive=False,
                   handle_signals=False, **kwargs)


def test_a_job_over_its_budget_runs_in_shards_and_matches_the_in_memory_run(tmp_path):
    rows = rag_rows(300)
    small = sharded_job(tmp_path, rows, name="sharded")
    whole = sharded_job(tmp_path, rows, budget=4 << 30, name="whole")
    sharded, in_memory = run_fake(small), run_fake(whole)
    assert sharded.exit_code == in_memory.exit_code == EXIT_OK
    assert sharded.summary["shards"]["count"] > 3 and sharded.summary["shards"]["spilled_bytes"]
    assert in_memory.summary["shards"] == {**in_memory.summary["shards"], "count": 1,
                                           "spilled_bytes": 0}
    a, b = pq.read_table(small.output), pq.read_table(whole.output)
    # The same rows, in input order, with the same generations and pass-through column;
    # only what the cache served may differ.
    assert a["row"].to_pylist() == list(range(300))
    assert a.drop(["cached_tokens"]).equals(b.drop(["cached_tokens"]))
    assert a["tag"].to_pylist() == [r["tag"] for r in rows]
    # The whole job's prefix figures, summed over shards with their boundaries, are exact.
    for key in ("distinct_prompt_tokens", "block_ideal_computed_tokens", "prompt_tokens"):
        assert sharded.summary["plan"][key] == in_memory.summary["plan"][key]
    # Nothing spilled is left behind.
    assert not (tmp_path / "sharded" / "results.parquet.partial").exists()


def one_system_rows(n: int, seed: int = 3) -> list[dict]:
    """Pre-tokenized rows: one system prompt (3 blocks of 32 tokens) before every row, one of
    40 documents (2 to 6 blocks) below it, then 8 tokens of question."""
    rng = random.Random(seed)
    system = tokens(0, 96)
    docs = [tokens(100 + d, rng.randint(64, 191)) for d in range(40)]
    return [{"id": f"r{i}", "prompt_token_ids": system + rng.choice(docs) + tokens(1000 + i, 8),
             "max_tokens": 2} for i in range(n)]


def test_shards_compute_each_shared_prefix_once(tmp_path, config_only_model):
    """One system prompt shared by every row, 40 documents below it, cut into 31 shards and
    run on vLLM's scheduler (the sim engine) with a KV cache of 27 blocks, far smaller than
    the job, so that a prefix computed once is gone when a much later shard needs it again.
    Shards that are ranges of the prompts' token order, cut where neighbours share least,
    hold each document whole: vLLM computes each prefix once, the whole job's block ideal,
    as much as the job run as one shard. Shards that mix documents compute them again in
    every shard (3.6x here); cuts through documents compute their blocks twice."""
    path = write_jsonl(tmp_path / "in.jsonl", one_system_rows(600))
    cache_tokens = 27 * 32

    def run_on_a_small_cache(budget: int, name: str) -> dict:
        cfg = replace(job(tmp_path, path), model=str(config_only_model),
                      output=tmp_path / name / "results.parquet", early_start=False)
        cfg = replace(cfg, engine=replace(cfg.engine, memory_budget=budget))
        engine = sim_engine(config_only_model, 28)
        assert engine.info.kv_capacity_tokens == cache_tokens
        outcome = run_job(cfg, engine=engine, interactive=False, handle_signals=False)
        assert outcome.exit_code == EXIT_OK
        return outcome.summary

    sharded = run_on_a_small_cache(300_000, "sharded")
    whole = run_on_a_small_cache(4 << 30, "whole")
    assert sharded["shards"]["count"] > 20 and whole["shards"]["count"] == 1
    # The cache holds less than a tenth of the job's distinct prompt tokens.
    assert cache_tokens * 10 < whole["plan"]["distinct_prompt_tokens"]
    assert sharded["tokens"]["computed_prompt"] == whole["tokens"]["computed_prompt"] == \
        whole["plan"]["block_ideal_computed_tokens"]


def test_a_killed_sharded_job_resumes_without_losing_or_repeating_a_row(tmp_path):
    rows = rag_rows(300, seed=5)
    cfg = sharded_job(tmp_path, rows)
    dying = FakeEngine(block_size=4, kv_capacity_tokens=4096, max_num_seqs=8,
                       die_after_steps=30)
    first = run_fake(cfg, dying)
    assert first.exit_code == EXIT_INTERRUPTED and "--resume" in first.message
    finished = set(Checkpoint(partial_dir_for(cfg.output.local_path)).read_done()["id"].to_pylist())
    assert 0 < len(finished) == first.summary["succeeded"] < 300
    resumed_engine = FakeEngine(block_size=4, kv_capacity_tokens=4096, max_num_seqs=8)
    second = run_fake(cfg, resumed_engine, resume=True)
    assert second.exit_code == EXIT_OK and second.summary["shards"]["count"] > 1
    # What reached the engine the second time: every row the first run did not finish, once,
    # and none that it did.
    admitted = resumed_engine.admission_order
    assert len(admitted) == len(set(admitted)) == 300 - len(finished)
    assert not set(admitted) & finished
    out = pq.read_table(cfg.output)
    assert out["row"].to_pylist() == list(range(300))
    assert out["id"].to_pylist() == [r["id"] for r in rows]
    # The summary's totals are the output's, over both runs.
    s = second.summary
    assert s["succeeded"] == 300
    assert s["tokens"]["prompt"] == sum(out["prompt_tokens"].to_pylist())
    assert s["tokens"]["completion"] == sum(out["completion_tokens"].to_pylist())
    assert s["tokens"]["cached"] == sum(out["cached_tokens"].to_pylist())


def openai_batch_rows(n: int, seed: int = 0) -> list[dict]:
    """OpenAI Batch API lines for both endpoints, under shared system prompts, shuffled: the
    shards' token order is far from the file's."""
    rng = random.Random(seed)
    systems = [f"System {k}: " + "rule " * rng.randint(5, 20) for k in range(6)]
    lines = []
    for i in range(n):
        system, question = rng.choice(systems), f"Question {i}: " + "fact " * rng.randint(1, 9)
        if i % 3:
            body = {"messages": [{"role": "system", "content": system},
                                 {"role": "user", "content": question}], "max_tokens": 4}
            url = "/v1/chat/completions"
        else:
            body, url = {"prompt": system + question, "max_tokens": 4}, "/v1/completions"
        lines.append({"custom_id": f"req-{i}", "method": "POST", "url": url, "body": body})
    rng.shuffle(lines)
    return lines


def test_a_sharded_run_writes_every_openai_line_once_in_input_order(tmp_path, monkeypatch):
    lines = openai_batch_rows(300, seed=2)
    budget = 60_000  # ~20 shards; the output in ranges of an eighth of it
    write_jsonl(tmp_path / "batch.jsonl", lines)
    out, openai_out = tmp_path / "out.parquet", tmp_path / "out.jsonl"
    monkeypatch.setenv("BATCHRUN_FAKE_ENGINE", "{}")
    ranges = []  # the row ranges the output is written in, one call each
    real_write = _AtomicOutput.write
    monkeypatch.setattr(_AtomicOutput, "write", lambda self, results, columns: (
        ranges.append(results.num_rows), real_write(self, results, columns))[1])
    result = cli("run", tmp_path / "batch.jsonl", "-o", out, "--openai-output", openai_out,
                 "--engine", "fake", "--memory-budget", str(budget), "--no-early-start",
                 "--json")
    assert result.exit_code == EXIT_OK, result.stderr
    summary = json.loads(result.stdout)
    # Several shards, and the output (both files) written in several row ranges.
    assert summary["shards"]["count"] > 3 and summary["shards"]["spilled_bytes"]
    assert len(ranges) > 3 and sum(ranges) == 300
    # Every line once, in input order, each parsed by the openai package's own models, each
    # matching its Parquet row (tests/test_structured.py's check).
    written = [json.loads(x) for x in openai_out.read_text().splitlines()]
    assert [x["custom_id"] for x in written] == [x["custom_id"] for x in lines]
    cfg = replace(job(tmp_path, tmp_path / "batch.jsonl"), output=out, openai_output=openai_out)
    ok, failed = check_openai_output(cfg)
    assert len(ok) == 300 and not failed
    objects = {x["custom_id"]: x["response"]["body"]["object"] for x in written}
    assert objects == {x["custom_id"]: "chat.completion" if x["url"] == "/v1/chat/completions"
                       else "text_completion" for x in lines}
