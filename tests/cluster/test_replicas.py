"""Engine replicas as Ray actors on this machine. With the deterministic fake engine, the
pipeline: the job is shared out, every row comes back exactly once, also when a replica's
actor is killed mid-run (its rows that came back are never run again) or every replica is
gone (exit 4, and --resume finishes the job). What the engines admitted is read from their
own record (FakeEngine's admitted_log), not only from the output. With the sim engine
(vLLM's own scheduler and KV cache in each replica), what sharing the job out costs: the
prompt tokens vLLM computed, summed over replicas, against one engine's."""

from __future__ import annotations

import contextlib
import json
import random
import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pytest
import ray

from batchrun.cluster.actor import ReplicaJob
from batchrun.cluster.replicas import Fleet
from batchrun.config import ClusterOptions, EngineOptions, JobConfig
from batchrun.engine.sizing import EngineSizing
from batchrun.errors import EXIT_INTERRUPTED, EXIT_OK, ModelError
from batchrun.io.output.checkpoint import Checkpoint, partial_dir_for
from batchrun.job.run import run_job
from tests.helpers import job, read_output, shared_prefix_rows, write_jsonl
from tests.sim_engines import BLOCK_BYTES, tokens


def fake_engine(monkeypatch, admitted: Path, **options) -> None:
    """Every replica's fake engine gets these options (the driver passes its environment on)
    and appends each request it admits to `admitted`."""
    monkeypatch.setenv("BATCHRUN_FAKE_ENGINE", json.dumps({"admitted_log": str(admitted),
                                                           **options}))


def replicated(tmp_path: Path, rows: int, replicas: int = 2) -> JobConfig:
    path = write_jsonl(tmp_path / "in.jsonl", shared_prefix_rows(rows, groups=6))
    return replace(job(tmp_path, path, max_tokens=8), cluster=ClusterOptions(replicas=replicas))


def run(cfg: JobConfig, **kwargs):
    return run_job(cfg, engine_kind="fake", interactive=False, handle_signals=False, **kwargs)


def admitted(path: Path) -> Counter:
    return Counter(path.read_text().split())


def journaled_ids(cfg: JobConfig) -> set[str]:
    """Ids of the rows in the job's checkpoint journals now (a journal being written ends in
    a cut batch: what comes before it counts)."""
    ids: set[str] = set()
    for path in Checkpoint(partial_dir_for(cfg.output.local_path)).journals():
        with contextlib.suppress(pa.ArrowInvalid, OSError), pa.ipc.open_stream(path) as rows:
            for batch in rows:
                ids.update(batch.column("id").to_pylist())
    return ids


def kill_replicas_once(cfg: JobConfig, which: list[int], after_rows: int,
                       snapshot: set[str]) -> threading.Thread:
    """A thread that waits until `after_rows` rows are journaled, notes which (`snapshot`),
    then kills the actors of replicas `which` (ray.kill: the process dies at once)."""

    def kill() -> None:
        deadline = time.monotonic() + 60
        while len(journaled_ids(cfg)) < after_rows and time.monotonic() < deadline:
            time.sleep(0.02)
        snapshot.update(journaled_ids(cfg))
        names = ray.util.list_named_actors()
        for i in which:
            [name] = [n for n in names if n.endswith(f"-replica-{i}")]
            ray.kill(ray.get_actor(name))

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


def texts(cfg: JobConfig) -> dict[str, str]:
    return {r["id"]: r["text"] for r in read_output(cfg)}


def test_two_replicas_share_the_job_and_every_row_comes_back_once(tmp_path, monkeypatch,
                                                                   local_ray):
    log = tmp_path / "admitted.txt"
    fake_engine(monkeypatch, log)
    cfg = replicated(tmp_path, 120)
    outcome = run(cfg)

    assert outcome.exit_code == EXIT_OK
    ids = [f"r{i}" for i in range(120)]
    assert [r["id"] for r in read_output(cfg)] == ids
    assert admitted(log) == Counter(ids)  # each row reached an engine exactly once
    per_replica = outcome.summary["replicas"]
    assert [r["status"] for r in per_replica] == ["ok", "ok"]
    assert all(r["rows"] > 0 and r["busy_s"] > 0 for r in per_replica)
    assert sum(r["rows"] for r in per_replica) == 120
    tokens = outcome.summary["tokens"]
    assert sum(r["prompt_tokens"] for r in per_replica) == tokens["prompt"]
    assert sum(r["computed_prompt_tokens"] for r in per_replica) == tokens["computed_prompt"]
    assert sum(r["completion_tokens"] for r in per_replica) == tokens["completion"]
    # The same texts as one engine (the fake engine's text depends on the prompt only).
    single = replace(cfg, output=tmp_path / "single.parquet", cluster=ClusterOptions())
    assert run(single).exit_code == EXIT_OK
    assert texts(cfg) == texts(single)


def test_replicas_start_on_the_first_rows_while_the_rest_is_read(tmp_path, monkeypatch,
                                                                 local_ray):
    # A dataset of six files, each a read batch larger than a run of this budget: the first
    # is handed to the replicas while the others are read (tests/test_early_start.py).
    from tests.test_early_start import BUDGET, dataset

    log = tmp_path / "admitted.txt"
    fake_engine(monkeypatch, log, step_delay_s=0.01)
    folder, rows = dataset(tmp_path)
    cfg = replace(job(tmp_path, folder), cluster=ClusterOptions(replicas=2))
    cfg = replace(cfg, engine=replace(cfg.engine, memory_budget=BUDGET))
    outcome = run(cfg)
    assert outcome.exit_code == EXIT_OK, outcome.message
    assert outcome.summary["early_start"]["runs"] >= 1
    assert [r["id"] for r in read_output(cfg)] == [r["id"] for r in rows]
    counts = admitted(log)
    assert max(counts.values()) == 1  # no request reached an engine twice
    assert all(r["rows"] > 0 for r in outcome.summary["replicas"])
    assert sum(r["rows"] for r in outcome.summary["replicas"]) == len(rows)


def family_rows(n: int, families: int = 8) -> list[dict]:
    """Pre-tokenized rows, shuffled: `families` prompts of 320 tokens (10 blocks) that no
    two share a block of, each row one of them and 8 tokens of its own."""
    heads = [tokens(500 + f, 320) for f in range(families)]
    rows = [{"id": f"r{i}", "prompt_token_ids": heads[i % families] + tokens(2000 + i, 8),
             "max_tokens": 4} for i in range(n)]
    random.Random(0).shuffle(rows)
    return rows


def test_replicas_compute_each_shared_prefix_about_once_between_them(tmp_path, local_ray,
                                                                     config_only_model):
    # 240 rows in 8 prefix shards, on 2 replicas of vLLM's scheduler (the sim engine), each
    # with a KV cache of 39 blocks: 3 of the 8 families' prefixes. Whole shards go to
    # replicas, and a shard cut into pieces is cut between families where it can: each
    # piece costs at most one prefix computed again (a family cut in two), against one
    # engine running the whole job. Shards that mixed the families would compute each of
    # them again in every piece (5.4x one engine's tokens, measured).
    path = write_jsonl(tmp_path / "in.jsonl", family_rows(240))
    cfg = replace(job(tmp_path, path), model=str(config_only_model))
    cfg = replace(cfg, engine=replace(cfg.engine, kv_cache_memory=40 * BLOCK_BYTES))
    one = run_job(cfg, engine_kind="sim", interactive=False, handle_signals=False)
    sharded = replace(cfg.engine, memory_budget=100_000)
    fleet = run_job(replace(cfg, output=tmp_path / "fleet.parquet", engine=sharded,
                            cluster=ClusterOptions(replicas=2)),
                    engine_kind="sim", interactive=False, handle_signals=False)
    assert one.exit_code == fleet.exit_code == EXIT_OK
    assert fleet.summary["shards"]["count"] > 4
    replicas = fleet.summary["replicas"]
    assert [r["status"] for r in replicas] == ["ok", "ok"] and all(r["rows"] for r in replicas)
    computed = sum(r["computed_prompt_tokens"] for r in replicas)
    assert computed == fleet.summary["tokens"]["computed_prompt"]
    # One engine computes the job's block ideal: each family's prefix once.
    assert one.summary["tokens"]["computed_prompt"] == 8 * 320 + 240 * 8
    pieces = sum(r["pieces"] for r in replicas)
    assert computed <= one.summary["tokens"]["computed_prompt"] + (pieces - 1) * 320


def test_a_replica_killed_mid_run_loses_nothing_and_reruns_no_row_it_returned(
        tmp_path, monkeypatch, local_ray):
    log = tmp_path / "admitted.txt"
    fake_engine(monkeypatch, log, step_delay_s=0.03, max_num_seqs=4)
    cfg = replicated(tmp_path, 160)
    returned_before_kill: set[str] = set()
    killer = kill_replicas_once(cfg, [1], after_rows=40, snapshot=returned_before_kill)
    outcome = run(cfg)
    killer.join()

    assert outcome.exit_code == EXIT_OK
    ids = [f"r{i}" for i in range(160)]
    assert [r["id"] for r in read_output(cfg)] == ids
    lost = [r for r in outcome.summary["replicas"] if r["status"] != "ok"]
    assert len(lost) == 1 and lost[0]["status"].startswith("lost: ")
    assert lost[0]["rows"] > 0  # it died mid-run, with rows of its piece returned
    counts = admitted(log)
    assert set(counts) == set(ids)
    run_twice = {i for i, n in counts.items() if n > 1}
    # Only requests the killed replica had not returned ran again, and no more of them
    # than it held at once (its 4 in flight, and results on their way out).
    assert not run_twice & returned_before_kill
    assert len(returned_before_kill) >= 40 and len(run_twice) <= 8


def test_every_replica_gone_exits_4_and_one_engine_resumes_the_job(tmp_path, monkeypatch,
                                                                   local_ray):
    first_log = tmp_path / "admitted-1.txt"
    fake_engine(monkeypatch, first_log, step_delay_s=0.03, max_num_seqs=4)
    cfg = replicated(tmp_path, 120)
    returned: set[str] = set()
    killer = kill_replicas_once(cfg, [0, 1], after_rows=30, snapshot=returned)
    outcome = run(cfg)
    killer.join()
    assert outcome.exit_code == EXIT_INTERRUPTED
    assert outcome.summary["status"] == "engine_failed"
    assert "every engine replica is gone" in outcome.message

    # The checkpoint is the driver's: any number of engines may continue it, here one.
    second_log = tmp_path / "admitted-2.txt"
    fake_engine(monkeypatch, second_log)
    assert run(replace(cfg, cluster=ClusterOptions()), resume=True).exit_code == EXIT_OK
    ids = [f"r{i}" for i in range(120)]
    assert [r["id"] for r in read_output(cfg)] == ids
    rerun = admitted(second_log)
    assert not set(rerun) & returned  # rows journaled before the kill never ran again
    assert set(rerun) | set(admitted(first_log)) == set(ids)


def test_a_replica_that_cannot_see_the_model_fails_the_job_in_one_line(tmp_path, local_ray):
    config = JobConfig(input=tmp_path / "in.jsonl", output=tmp_path / "out.parquet",
                       model=str(tmp_path / "models" / "not-copied-to-this-node"),
                       engine=EngineOptions(enforce_eager=True),
                       cluster=ClusterOptions(replicas=2))
    sizing = EngineSizing(32, 512, "test", 64 << 20, "test", 46_080, 0)
    with pytest.raises(ModelError) as failure:
        Fleet.start(ray, ReplicaJob(config, "vllm", sizing, 100, "jsonl", 512))
    message = str(failure.value)
    assert "\n" not in message
    assert message.startswith("replica ") and "on node " in message
    assert "not-copied-to-this-node" in message and "every node must see the model" in message
