"""Identical deterministic rows run once: the engine receives one request per distinct
(prompt, sampling), and every row still gets its own output row, marked with the id of the
row whose generation it reuses. Sampled rows without a shared seed always run."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from batchrun.engine.fake import FakeEngine
from batchrun.errors import EXIT_INTERRUPTED, EXIT_OK
from batchrun.job.run import run_job
from batchrun.plan import PrefixTree
from batchrun.plan.dedupe import find_duplicates
from tests.helpers import job, read_output, write_jsonl
from tests.reliability.harness import check_output


def run_fake(cfg, engine: FakeEngine, **kwargs):
    return run_job(cfg, engine_kind="fake", engine=engine, interactive=False,
                   handle_signals=False, **kwargs)


def rows_with_repeats() -> list[dict]:
    rows = [{"id": f"q{i}", "prompt": f"Question {i % 4}?"} for i in range(12)]  # 4 distinct
    rows += [{"id": "hot-a", "prompt": "Question 0?", "temperature": 0.8},  # sampled, no seed
             {"id": "hot-b", "prompt": "Question 0?", "temperature": 0.8},
             {"id": "seed-a", "prompt": "Question 1?", "temperature": 0.8, "seed": 7},
             {"id": "seed-b", "prompt": "Question 1?", "temperature": 0.8, "seed": 7},
             {"id": "longer", "prompt": "Question 2?", "max_tokens": 3}]  # other sampling
    return rows


def test_identical_greedy_rows_reach_the_engine_once(tmp_path):
    cfg = job(tmp_path, write_jsonl(tmp_path / "in.jsonl", rows_with_repeats()), max_tokens=6)
    engine = FakeEngine(block_size=4, kv_capacity_tokens=8192)
    outcome = run_fake(cfg, engine)
    assert outcome.exit_code == EXIT_OK
    # 4 greedy prompts + 2 unseeded sampled rows + 1 seeded pair + the other max_tokens.
    assert sorted(engine.admission_order) == sorted(
        ["q0", "q1", "q2", "q3", "hot-a", "hot-b", "seed-a", "longer"])
    out = {r["id"]: r for r in read_output(cfg)}
    assert len(out) == 17
    for i in range(4, 12):
        copy, first = out[f"q{i}"], out[f"q{i % 4}"]
        assert copy["duplicate_of"] == f"q{i % 4}" and copy["text"] == first["text"]
        assert copy["cached_tokens"] == copy["prompt_tokens"] == first["prompt_tokens"]
    assert out["seed-b"]["duplicate_of"] == "seed-a"
    assert out["hot-b"]["duplicate_of"] is None and out["longer"]["duplicate_of"] is None
    assert all(out[f"q{i}"]["duplicate_of"] is None for i in range(4))
    assert outcome.summary["duplicate_rows"] == 9
    # The engine computed no prompt token for a served row.
    engine_prompt = sum(r["prompt_tokens"] for r in out.values() if r["duplicate_of"] is None)
    cached = sum(r["cached_tokens"] for r in out.values() if r["duplicate_of"] is None)
    assert outcome.summary["tokens"]["computed_prompt"] == engine_prompt - cached


# Pairs of identical rows (the same prompt, greedy) that differ from the plain pair only in
# stop, in a constraint or in logprobs, and a row differing from each pair in that value too.
KEYED = {
    "plain": {},
    "stop": {"stop": ["."]},
    "stop-other": {"stop": ["!"]},
    "choices": {"choices": ["yes", "no"]},
    "choices-other": {"choices": ["yes", "maybe"]},
    "schema": {"json_schema": {"type": "object", "properties": {"a": {"type": "string"}},
                               "required": ["a"]}},
    "json-object": {"response_format": {"type": "json_object"}},
    "logprobs": {"logprobs": True},
    "top-logprobs": {"top_logprobs": 2},
}


def test_rows_differing_only_in_stop_constraint_or_logprobs_are_not_merged(tmp_path):
    rows = [{"id": f"{name}-{k}", "prompt": "Is the shelf full?", **extra}
            for name, extra in KEYED.items() for k in (1, 2)]
    cfg = job(tmp_path, write_jsonl(tmp_path / "in.jsonl", rows), max_tokens=16)
    engine = FakeEngine(block_size=4, kv_capacity_tokens=8192)
    assert run_fake(cfg, engine).exit_code == EXIT_OK
    # What reached the engine: one request for each distinct (prompt, sampling, stop,
    # constraint, logprobs), the first of its pair; the second is served from its result.
    assert sorted(engine.admission_order) == sorted(f"{name}-1" for name in KEYED)
    out = {r["id"]: r for r in read_output(cfg)}
    for name in KEYED:
        first, copy = out[f"{name}-1"], out[f"{name}-2"]
        assert first["duplicate_of"] is None and copy["duplicate_of"] == f"{name}-1"
        assert copy["text"] == first["text"] and copy["logprobs"] == first["logprobs"]
    # Each kept what makes it differ: its constraint's answer, its logprobs.
    assert out["choices-1"]["text"] in ("yes", "no")
    assert json.loads(out["schema-1"]["text"]) == {"a": "x"}
    assert out["plain-1"]["logprobs"] is None and out["logprobs-1"]["logprobs"]
    assert all(len(t["top_logprobs"]) == 2 for t in out["top-logprobs-1"]["logprobs"])
    assert out["logprobs-1"]["logprobs"][0]["top_logprobs"] == []
    summary = json.loads((tmp_path / "out" / "results.parquet.summary.json").read_text())
    assert summary["duplicate_rows"] == len(KEYED)


def test_no_plan_runs_every_row_like_plain_vllm(tmp_path):
    cfg = job(tmp_path, write_jsonl(tmp_path / "in.jsonl", rows_with_repeats()), max_tokens=6)
    engine = FakeEngine(block_size=4, kv_capacity_tokens=8192)
    run_fake(replace(cfg, plan=False), engine)
    assert len(engine.admission_order) == 17
    assert all(r["duplicate_of"] is None for r in read_output(cfg))


def test_a_killed_job_with_duplicates_resumes_with_every_row_once(tmp_path):
    rows = [{"id": f"r{i}", "prompt": f"Item {i % 10} please."} for i in range(60)]
    cfg = job(tmp_path, write_jsonl(tmp_path / "in.jsonl", rows), max_tokens=20)
    # 10 distinct prompts, 3 at a time, each done within max_tokens (20) steps: the engine
    # dies after the first 3 finished and before the last.
    died = run_fake(cfg, FakeEngine(block_size=4, kv_capacity_tokens=8192, max_num_seqs=3,
                                    die_after_steps=21))
    assert died.exit_code == EXIT_INTERRUPTED and 0 < died.summary["succeeded"] < 60
    done = set(read_ids_journaled(cfg))
    resumed_engine = FakeEngine(block_size=4, kv_capacity_tokens=8192)
    assert run_fake(cfg, resumed_engine, resume=True).exit_code == EXIT_OK
    # The resume sent only prompts whose rows were not finished, each once.
    sent = resumed_engine.admission_order
    assert len(sent) == len(set(sent)) and not set(sent) & done
    check_output(cfg.output.local_path, [r["id"] for r in rows])


def read_ids_journaled(cfg) -> list[str]:
    from batchrun.io.output.checkpoint import Checkpoint, partial_dir_for

    return Checkpoint(partial_dir_for(cfg.output.local_path)).read_done()["id"].to_pylist()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2), st.booleans()),
                min_size=1, max_size=30))
def test_duplicates_are_exactly_the_equal_deterministic_requests(spec):
    # Each request: (prompt choice, sampling choice, deterministic?).
    prompts = [[1, 2], [1, 2, 3], [7], [1, 2, 3, 4]]
    values = np.concatenate([prompts[p] for p, _, _ in spec]).astype(np.int32)
    offsets = np.concatenate(([0], np.cumsum([len(prompts[p]) for p, _, _ in spec])))
    keys = [(s, 0.0) if det else None for _, s, det in spec]
    found = find_duplicates(PrefixTree.build(values, offsets), keys.__getitem__)
    served = {c: r for r, cs in found.copies.items() for c in cs}
    assert sorted([*found.runs.tolist(), *served]) == list(range(len(spec)))
    for copy, first in served.items():
        assert first < copy and spec[first] == spec[copy] and spec[copy][2]
    firsts = [spec[r] for r in found.runs.tolist() if spec[r][2]]
    assert len(firsts) == len(set(firsts))  # no two deterministic runs are identical
