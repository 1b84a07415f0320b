"""Jobs bigger than their memory budget: cut into prefix shards on disk, run shard by shard,
written back in input order. On the deterministic fake engine, with budgets small enough that
a few hundred rows must spill."""

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


def sharded_job(tmp_path, rows, budget=BUDGET, name="out"):
    cfg = job(tmp_path, write_jsonl(tmp_path / "in.jsonl", rows))
    cfg = replace(cfg, output=tmp_path / name / "results.parquet",
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


def one_system_rows(n: int, seed: int = 0) -> list[dict]:
    """One system prompt before every row, one of 40 documents below it, then a question."""
    rng = random.Random(seed)
    system = "You are the one system prompt. " + "rule " * 40
    docs = [f" Document {d}: " + "fact " * rng.randint(15, 30) for d in range(40)]
    return [{"id": f"r{i}", "prompt": system + rng.choice(docs) + f" Q{i}?", "max_tokens": 2,
             "tag": 0} for i in range(n)]


def test_shards_compute_each_shared_prefix_about_once(tmp_path):
    """One system prompt shared by every row, 40 documents below it, cut into shards and run
    on a KV cache far smaller than the job, so that a prefix computed once is gone when a
    much later shard needs it again. Shards that are ranges of the prompts' token order
    hold each document whole (or split it between neighbours run one after the other), and
    compute each prefix about once: within 5% of the whole job's block ideal, and no more
    than the job run as one shard on the same cache. Shards that mix documents, or split
    one and run its halves apart, compute documents again."""
    rows = one_system_rows(600, seed=3)
    cache_tokens = 400

    def run_on_a_small_cache(cfg):
        engine = FakeEngine(block_size=4, kv_capacity_tokens=cache_tokens, max_num_seqs=64)
        outcome = run_fake(cfg, engine)
        assert outcome.exit_code == EXIT_OK
        return outcome.summary

    sharded = run_on_a_small_cache(sharded_job(tmp_path, rows, name="sharded"))
    whole = run_on_a_small_cache(sharded_job(tmp_path, rows, budget=4 << 30, name="whole"))
    assert sharded["shards"]["count"] > 3 and whole["shards"]["count"] == 1
    # The cache holds less than a tenth of the job's distinct prompt tokens.
    assert cache_tokens * 10 < whole["plan"]["distinct_prompt_tokens"]
    computed = sharded["tokens"]["computed_prompt"]
    assert computed <= 1.05 * whole["plan"]["block_ideal_computed_tokens"]
    assert computed <= 1.01 * whole["tokens"]["computed_prompt"]


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
                 "--engine", "fake", "--memory-budget", str(budget), "--json")
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
