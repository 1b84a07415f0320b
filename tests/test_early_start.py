"""Early start (job/early_start.py): on a job larger than one sorted run the engine starts on
the first rows while the rest is still read, and gets more whenever it would wait.

The jobs are dataset folders of several JSONL files (each file a batch of the read) under a
memory budget of a few files' rows, on the deterministic fake engine: what is checked is
the pipeline (when the engine starts, every row once in input order, resume), not speed."""

from __future__ import annotations

import json
import signal
import threading
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batchrun.engine.fake import FakeEngine
from batchrun.errors import EXIT_INTERRUPTED, EXIT_OK
from batchrun.ingest import stream as ingest_stream
from batchrun.io.output.checkpoint import Checkpoint, partial_dir_for
from batchrun.job.engine_setup import WHOLE_CONTEXT_REASON
from batchrun.job.run import run_job
from tests.helpers import job, write_jsonl
from tests.reliability.harness import (
    admitted,
    events,
    journaled_rows,
    start_traced,
    wait_for_event,
    write_rows,
)
from tests.reliability.test_signals import (
    FIRST,
    after,
    finish,
    in_flight_at,
    paused,
    resume_completes_the_job,
    run_args,
    steps,
)
from tests.test_sharded_runs import rag_rows

FILES, PER_FILE = 6, 60
BUDGET = 160_000  # bytes: a run (a sixteenth) fills with about one file's rows


def dataset(tmp_path: Path, seed: int = 0) -> tuple[Path, list[dict]]:
    rows = rag_rows(FILES * PER_FILE, seed=seed)
    folder = tmp_path / "in"
    folder.mkdir()
    for k in range(FILES):
        write_jsonl(folder / f"part-{k}.jsonl", rows[k * PER_FILE:(k + 1) * PER_FILE])
    return folder, rows


def early_job(tmp_path: Path, folder: Path, *, early_start: bool = True, name: str = "out"):
    cfg = replace(job(tmp_path, folder), output=tmp_path / name / "results.parquet",
                  early_start=early_start)
    return replace(cfg, engine=replace(cfg.engine, memory_budget=BUDGET))


def fake(**kwargs) -> FakeEngine:
    return FakeEngine(**{"block_size": 4, "kv_capacity_tokens": 4096, "max_num_seqs": 16,
                         **kwargs})


def run_fake(cfg, engine: FakeEngine | None = None, **kwargs):
    return run_job(cfg, engine_kind="fake", engine=engine or fake(), interactive=False,
                   handle_signals=False, **kwargs)


class SteppedFake(FakeEngine):
    """Sets `stepped` at its first step."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.stepped = threading.Event()

    def step(self):
        self.stepped.set()
        return super().step()


@pytest.mark.parametrize("early_start", [True, False])
def test_the_engine_steps_before_the_last_file_is_read(tmp_path, monkeypatch, early_start):
    """The read of the third file waits (up to 10 s) for the engine's first step: with early
    start the engine takes that step on the first file's rows; without it nothing reaches
    the engine before the whole job is read, so the wait runs out."""
    folder, _ = dataset(tmp_path)
    engine = SteppedFake(block_size=4, kv_capacity_tokens=4096, max_num_seqs=16)
    read_before_first_step: list[int] = []
    real_open = ingest_stream.open_request_stream

    class GatedStream:  # the reader's stream; its third batch waits for the first step
        def __init__(self, stream) -> None:
            self.stream = stream

        def __getattr__(self, name: str):
            return getattr(self.stream, name)

        def __iter__(self):
            for n, batch in enumerate(self.stream):
                if n == 2:
                    engine.stepped.wait(10)
                    read_before_first_step.append(n if engine.stepped.is_set() else FILES)
                yield batch

    def gated_stream(*args, **kwargs):
        return GatedStream(real_open(*args, **kwargs))

    monkeypatch.setattr(ingest_stream, "open_request_stream", gated_stream)
    outcome = run_fake(early_job(tmp_path, folder, early_start=early_start), engine)
    assert outcome.exit_code == EXIT_OK
    if early_start:
        assert read_before_first_step == [2]
        assert outcome.summary["early_start"]["rows"] > 0
    else:
        assert read_before_first_step == [FILES]
        assert outcome.summary["early_start"] == {"runs": 0, "rows": 0}


def test_an_early_started_job_gives_every_row_once_like_the_whole_plan(tmp_path):
    folder, rows = dataset(tmp_path, seed=1)
    early_engine, whole_engine = fake(), fake()
    early = run_fake(early_job(tmp_path, folder, name="early"), early_engine)
    whole = run_fake(early_job(tmp_path, folder, early_start=False, name="whole"), whole_engine)
    assert early.exit_code == whole.exit_code == EXIT_OK
    runs, handed = early.summary["early_start"]["runs"], early.summary["early_start"]["rows"]
    assert runs >= 1 and 0 < handed < len(rows)
    # What reached the engine: every distinct request once (duplicates within a piece run
    # once), none twice, whichever piece of the job (early runs or shards) it was in.
    assert len(early_engine.admission_order) == len(set(early_engine.admission_order))
    a = pq.read_table(tmp_path / "early" / "results.parquet")
    b = pq.read_table(tmp_path / "whole" / "results.parquet")
    assert a["row"].to_pylist() == list(range(len(rows)))
    assert a["id"].to_pylist() == [r["id"] for r in rows]
    # The same generations (the fake engine's depend on the prompt only); what the cache
    # served may differ.
    assert a.drop(["cached_tokens"]).equals(b.drop(["cached_tokens"]))
    assert not (tmp_path / "early" / "results.parquet.partial").exists()


def test_a_job_killed_while_it_ran_early_resumes_without_losing_or_repeating_a_row(tmp_path):
    folder, rows = dataset(tmp_path, seed=2)
    cfg = early_job(tmp_path, folder)
    first = run_fake(cfg, fake(max_num_seqs=4, die_after_steps=6))
    assert first.exit_code == EXIT_INTERRUPTED and "--resume" in first.message
    assert first.summary["early_start"]["runs"] == 1  # it died in the first rows handed on
    finished = set(Checkpoint(partial_dir_for(cfg.output.local_path)).read_done()["id"]
                   .to_pylist())
    assert 0 < len(finished) < len(rows)
    resumed = fake()
    second = run_fake(cfg, resumed, resume=True)
    assert second.exit_code == EXIT_OK
    admitted = resumed.admission_order
    assert len(admitted) == len(set(admitted)) and not set(admitted) & finished
    assert set(admitted) | finished >= {r["id"] for r in rows} - _duplicate_ids(rows)
    out = pq.read_table(cfg.output)
    assert out["row"].to_pylist() == list(range(len(rows)))
    assert second.summary["succeeded"] == len(rows)


def _duplicate_ids(rows: list[dict]) -> set[str]:
    """Ids of rows whose prompt an earlier row has (run once, their copies reuse it)."""
    seen: set[tuple] = set()
    dups = set()
    for r in rows:
        key = (r["prompt"], r["max_tokens"])
        if key in seen:
            dups.add(r["id"])
        seen.add(key)
    return dups


def test_an_engine_started_early_is_sized_for_the_whole_context(tmp_path):
    """Started before the job's longest request is read, the engine (here vLLM's scheduler
    and KV cache: the sim engine) is sized for the model's whole context; with a
    kv_cache_memory too small for that, it is sized for the job's longest request once the
    read ends, and the rows read first still run first, as a piece of their own."""
    folder, rows = dataset(tmp_path, seed=3)
    block_bytes = 32 * 46_080  # a 32-token block of SmolLM2-135M's KV, float32
    for kv_blocks, name in ((None, "whole"), (100, "small")):
        cfg = early_job(tmp_path, folder, name=name)  # the default model, SmolLM2-135M
        cfg = replace(cfg, engine=replace(cfg.engine, kv_cache_memory=kv_blocks and
                                          kv_blocks * block_bytes))
        outcome = run_job(cfg, engine_kind="sim", interactive=False, handle_signals=False)
        assert outcome.exit_code == EXIT_OK, outcome.message
        sizing = outcome.summary["engine_sizing"]
        assert outcome.summary["early_start"]["runs"] >= 1
        if kv_blocks is None:
            assert sizing["max_model_len_reason"] == WHOLE_CONTEXT_REASON
        else:  # 3,200 tokens of KV, under the model's 8,192-token context
            assert sizing["max_model_len_reason"].startswith("the job's longest request")
            assert sizing["max_model_len"] < 3_200
        assert pq.read_table(cfg.output)["row"].to_pylist() == list(range(len(rows)))


def test_a_signal_while_rows_run_early_drains_saves_and_resume_finishes(tmp_path):
    """SIGTERM lands while the engine runs the rows handed on first (the whole 200-row file
    is one read batch, larger than a run of this budget): the requests in flight finish and
    are saved, nothing else starts, the run exits 4, and --resume runs only the rest."""
    ids = write_rows(tmp_path / "in.jsonl", 200)
    out, trace = tmp_path / "out.parquet", tmp_path / "events.txt"
    first_log, resume_log = tmp_path / "admitted-1.txt", tmp_path / "admitted-2.txt"
    proc = start_traced(trace, *run_args(tmp_path, "--grace-period", "3600",
                                         "--memory-budget", str(BUDGET)),
                        fake_engine={"max_num_seqs": 8, "admitted_log": str(first_log)},
                        pause=(FIRST,))
    wait_for_event(trace, proc, paused(1))
    proc.send_signal(signal.SIGTERM)
    stderr = finish(proc)
    assert proc.returncode == EXIT_INTERRUPTED, stderr
    summary = json.loads(out.with_name(out.name + ".summary.json").read_text())
    assert summary["early_start"]["runs"] == 1 and summary["status"] == "interrupted"
    seen = events(trace)
    assert in_flight_at(seen, ["signal", "1"]) > 0  # work in flight when it landed
    drained = steps(after(seen, ["signal", "1"]))
    assert drained and drained[-1] == 0
    saved = journaled_rows(out)
    assert 0 < len(saved) < len(ids)
    assert sorted(admitted(first_log)) == sorted(f"q{r}" for r in saved)
    resume_completes_the_job(tmp_path, resume_log, ids, saved)


def test_the_read_sorts_no_run_while_the_engine_prepares_rows(tmp_path, monkeypatch):
    """Sorting a run and preparing rows to run each peak at several times a run's bytes: the
    read's thread and the engine's take turns, so the peaks never add. Each preparation
    waits (up to 2 s) for a sort to begin beside it; none may."""
    from batchrun.ingest import shards
    from batchrun.job import run as job_run

    folder, _ = dataset(tmp_path, seed=4)
    sorting, overlaps, sorts = threading.Event(), [], []
    real_sort, real_prepare = shards.SortedRun.sort.__func__, job_run.prepare_shard

    def sort(cls, *args, **kwargs):
        sorting.set()
        sorts.append(1)
        try:
            return real_sort(cls, *args, **kwargs)
        finally:
            sorting.clear()

    def prepare(*args, **kwargs):
        if sorting.wait(2):
            overlaps.append(1)
        return real_prepare(*args, **kwargs)

    monkeypatch.setattr(shards.SortedRun, "sort", classmethod(sort))
    monkeypatch.setattr(job_run, "prepare_shard", prepare)
    outcome = run_fake(early_job(tmp_path, folder))
    assert outcome.exit_code == EXIT_OK
    assert outcome.summary["early_start"]["runs"] >= 1 and sorts  # both happened
    assert overlaps == []
