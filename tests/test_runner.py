"""The pipeline end to end on the deterministic fake engine: fast, and exact about what the
runner does with rows, order, errors, checkpoints and summaries."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pyarrow.parquet as pq
import pytest

from batchrun.engine.fake import FakeEngine
from batchrun.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_ROW_ERRORS
from batchrun.io.output.checkpoint import Checkpoint, partial_dir_for
from batchrun.job.run import run_job
from tests.helpers import job, read_output, shared_prefix_rows, write_jsonl


def run_fake(cfg, **kwargs):
    engine = kwargs.pop("engine", None) or FakeEngine(block_size=4, kv_capacity_tokens=8192)
    return run_job(cfg, engine_kind="fake", engine=engine, interactive=False,
                   handle_signals=False, **kwargs)


def test_every_row_gets_one_output_row_in_input_order(tmp_path):
    cfg = job(tmp_path, write_jsonl(tmp_path / "in.jsonl", shared_prefix_rows(30)), max_tokens=8)
    outcome = run_fake(cfg)
    assert outcome.exit_code == EXIT_OK
    out = read_output(cfg)
    assert [r["id"] for r in out] == [f"r{i}" for i in range(30)]
    assert [r["row"] for r in out] == list(range(30))
    assert all(r["error"] is None and r["text"] and r["completion_tokens"] <= 8 for r in out)
    summary = json.loads((tmp_path / "out" / "results.parquet.summary.json").read_text())
    assert summary["rows"] == summary["succeeded"] == 30
    assert summary["tokens"]["prompt"] == sum(r["prompt_tokens"] for r in out)
    assert not (tmp_path / "out" / "results.parquet.partial").exists()


def test_output_schema_and_metadata(tmp_path):
    cfg = job(tmp_path, write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hi", "tag": "a"}]))
    cfg = replace(cfg, columns=replace(cfg.columns, passthrough=("tag",)))
    run_fake(cfg)
    table = pq.read_table(cfg.output)
    assert table.column_names[:8] == ["row", "id", "text", "finish_reason", "prompt_tokens",
                                      "completion_tokens", "cached_tokens", "error"]
    assert table["tag"].to_pylist() == ["a"]
    assert table["id"].to_pylist() == ["0"]  # no id column: the row number
    meta = json.loads(table.schema.metadata[b"batchrun"])
    assert meta["model"] == "default" and "batchrun_version" in meta


def test_bad_rows_become_error_rows_and_exit_code_3(tmp_path):
    rows = [{"id": "ok", "prompt": "hello"}, '{"id": "broken", "prompt": ', {"id": "none"},
            {"id": "neg", "prompt": "x", "max_tokens": -1}]
    cfg = job(tmp_path, write_jsonl(tmp_path / "in.jsonl", rows))
    outcome = run_fake(cfg)
    assert outcome.exit_code == EXIT_ROW_ERRORS
    out = read_output(cfg)
    assert len(out) == 4
    assert out[0]["error"] is None and out[0]["text"]
    assert all(r["error"] and r["error"].startswith(f"row {r['row']}") for r in out[1:])


def test_prompt_longer_than_context_is_a_row_error(tmp_path):
    rows = [{"prompt": "x" * 5000}, {"prompt": "short"}]
    cfg = job(tmp_path, write_jsonl(tmp_path / "in.jsonl", rows))
    assert run_fake(cfg).exit_code == EXIT_ROW_ERRORS
    long_row, short_row = read_output(cfg)
    assert "max_model_len" in long_row["error"] and short_row["error"] is None


def test_outputs_do_not_depend_on_input_order(tmp_path):
    # The same rows in file order and shuffled, each planned and not: the planner sends both
    # files to the engine in one order of its own, so only the unplanned runs make the engine
    # see them in two other orders. Every row must get the same output in all four runs.
    rows = shared_prefix_rows(24)
    shuffled = rows[:]
    random.Random(3).shuffle(shuffled)
    texts, sent = {}, {}
    for name, these in (("file", rows), ("shuffled", shuffled)):
        for planned in (True, False):
            cfg = job(tmp_path / f"{name}-{planned}", write_jsonl(tmp_path / f"{name}.jsonl",
                                                                  these), max_tokens=6)
            engine = FakeEngine(block_size=4, kv_capacity_tokens=8192, max_num_seqs=4)
            assert run_fake(replace(cfg, plan=planned), engine=engine).exit_code == EXIT_OK
            out = read_output(cfg)
            assert [r["id"] for r in out] == [r["id"] for r in these]  # in input order
            texts[name, planned] = {r["id"]: r["text"] for r in out}
            sent[name, planned] = engine.admission_order
    # The engine ran the rows in three different orders (4 at a time: different batches too).
    assert sent["file", True] == sent["shuffled", True]
    assert len({tuple(order) for order in sent.values()}) == 3
    # Every row's output is its own: the rows' outputs all differ, and each is the same in
    # every run, whatever the file's order and the engine's.
    first = texts["file", True]
    assert len(set(first.values())) == len(rows)
    assert all(t == first for t in texts.values())


def test_planning_computes_each_shared_prefix_once(tmp_path):
    rows = shared_prefix_rows(36, groups=3)
    random.Random(0).shuffle(rows)
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    planned = job(tmp_path / "p", path, max_tokens=4)
    unplanned = replace(job(tmp_path / "u", path, max_tokens=4), plan=False)

    def small_cache():  # holds about two families' prefixes, like a real job's KV pressure
        return FakeEngine(block_size=4, kv_capacity_tokens=1200, max_num_seqs=8)

    p = run_fake(planned, engine=small_cache()).summary
    u = run_fake(unplanned, engine=small_cache()).summary
    assert p["plan"]["planned"] and not u["plan"]["planned"]
    assert p["tokens"]["computed_prompt"] < u["tokens"]["computed_prompt"]
    # Each family's prefix is computed once: within 5% of the block-granular ideal.
    assert p["tokens"]["computed_prompt"] <= 1.05 * p["plan"]["block_ideal_computed_tokens"]


class KeepsRequests(FakeEngine):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.requests = {}

    def add(self, request):
        self.requests[request.request_id] = request
        super().add(request)


def test_a_rows_sampling_values_reach_the_engine_over_the_job_defaults(tmp_path):
    rows = [{"id": "own", "prompt": "a", "temperature": 0.7, "top_p": 0.9, "seed": 5,
             "stop": ["x", "y"]},
            {"id": "default", "prompt": "b"}]
    cfg = job(tmp_path, write_jsonl(tmp_path / "in.jsonl", rows), temperature=0.2, top_p=0.5,
              seed=1, stop=("z",))
    engine = KeepsRequests()
    assert run_fake(cfg, engine=engine).exit_code == EXIT_OK
    sent = {rid: (r.temperature, r.top_p, r.seed, r.stop) for rid, r in engine.requests.items()}
    assert sent == {"own": (0.7, 0.9, 5, ("x", "y")), "default": (0.2, 0.5, 1, ("z",))}


def test_finished_job_is_not_run_again(tmp_path):
    cfg = job(tmp_path, write_jsonl(tmp_path / "in.jsonl", shared_prefix_rows(3)))
    run_fake(cfg)
    before = cfg.output.local_path.stat().st_mtime_ns
    outcome = run_fake(cfg)
    assert outcome.exit_code == EXIT_OK and outcome.summary["status"] == "already_done"
    assert "nothing to do" in outcome.message
    assert cfg.output.local_path.stat().st_mtime_ns == before
    assert run_fake(cfg, overwrite=True).summary["status"] == "ok"


def test_engine_failure_keeps_checkpoint_and_resume_finishes_exactly_once(tmp_path):
    cfg = job(tmp_path, write_jsonl(tmp_path / "in.jsonl", shared_prefix_rows(40)), max_tokens=5)
    dying = FakeEngine(block_size=4, kv_capacity_tokens=8192, max_num_seqs=4, die_after_steps=12)
    outcome = run_fake(cfg, engine=dying)
    assert outcome.exit_code == EXIT_INTERRUPTED and "--resume" in outcome.message
    assert not cfg.output.exists()
    partial_done = outcome.summary["succeeded"]
    assert 0 < partial_done < 40
    with pytest.raises(Exception, match="--resume"):
        run_fake(cfg)  # an unfinished run is never silently thrown away
    finished = set(Checkpoint(partial_dir_for(cfg.output.local_path)).read_done()["id"].to_pylist())
    engine = FakeEngine(block_size=4, kv_capacity_tokens=8192)
    resumed = run_fake(cfg, resume=True, engine=engine)
    assert resumed.exit_code == EXIT_OK
    ids = [r["id"] for r in read_output(cfg)]
    assert ids == [f"r{i}" for i in range(40)]
    # The resume generated exactly the rows the dead run had not finished.
    assert sorted(engine.admission_order) == sorted(set(ids) - finished)


def test_resume_refuses_a_changed_input(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", shared_prefix_rows(20))
    cfg = job(tmp_path, path, max_tokens=5)
    interrupted = run_fake(cfg, engine=FakeEngine(block_size=4, die_after_steps=8, max_num_seqs=2))
    assert interrupted.summary["succeeded"] > 0  # a checkpoint with no result is just replaced
    write_jsonl(path, shared_prefix_rows(21))
    with pytest.raises(Exception, match="input file changed"):
        run_fake(cfg, resume=True)


def test_a_failing_request_is_that_rows_error(tmp_path):
    cfg = job(tmp_path, write_jsonl(tmp_path / "in.jsonl", shared_prefix_rows(5)))
    engine = FakeEngine(block_size=4, fail_request_ids=frozenset({"r2"}))
    assert run_fake(cfg, engine=engine).exit_code == EXIT_ROW_ERRORS
    out = read_output(cfg)
    assert [r["error"] is not None for r in out] == [False, False, True, False, False]


def test_openai_batch_output(tmp_path):
    rows = [{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
             "body": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}},
            {"custom_id": "b", "method": "POST", "url": "/v1/completions",
             "body": {"prompt": "once upon", "max_tokens": 4}}]
    cfg = replace(job(tmp_path, write_jsonl(tmp_path / "batch.jsonl", rows)),
                  openai_output=tmp_path / "out.jsonl")
    assert run_fake(cfg).exit_code == EXIT_OK
    lines = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [x["custom_id"] for x in lines] == ["a", "b"]
    assert lines[0]["response"]["body"]["choices"][0]["message"]["role"] == "assistant"
    assert "text" in lines[1]["response"]["body"]["choices"][0]
    assert lines[1]["response"]["body"]["usage"]["completion_tokens"] <= 4


def test_results_that_do_not_add_up_are_a_bug_not_a_usage_error(tmp_path, monkeypatch):
    # Were a result lost between the engine and the books, the job must not be declared done,
    # nor blamed on the user (exit 2): it is batchrun's bug, which the CLI reports as exit 1.
    from batchrun.errors import BatchrunError
    from batchrun.job.summary import ResultCounts

    cfg = job(tmp_path, write_jsonl(tmp_path / "in.jsonl", shared_prefix_rows(6)))
    count = ResultCounts.count
    monkeypatch.setattr(ResultCounts, "count",
                        lambda self, table: count(self, table.slice(1)))
    with pytest.raises(RuntimeError, match="results for 6 rows") as raised:
        run_fake(cfg)
    assert not isinstance(raised.value, BatchrunError)
    assert not cfg.output.exists()


def test_the_summary_says_how_long_the_engine_waited_for_its_first_step(tmp_path):
    cfg = job(tmp_path, write_jsonl(tmp_path / "in.jsonl", shared_prefix_rows(12)), max_tokens=4)
    summary = run_fake(cfg).summary
    waited = summary["time_to_first_step_s"]
    # Reading, tokenizing and planning come first, then the steps.
    assert 0 < waited < summary["wall_time_s"]
    assert waited >= summary["stages"]["read"]["seconds"] + summary["stages"]["plan"]["seconds"]


def test_a_job_with_only_error_rows_never_steps_an_engine(tmp_path):
    cfg = job(tmp_path, write_jsonl(tmp_path / "in.jsonl", [{"id": "none"}]))
    assert run_fake(cfg).summary["time_to_first_step_s"] is None
