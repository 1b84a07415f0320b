"""kill -9 at any moment loses at most the requests in flight, and `--resume` finishes the job
with every input row exactly once. Runs are real CLI processes, as cron starts them."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pytest

from batchrun.engine.fake import FakeEngine
from batchrun.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, CheckpointError
from batchrun.io.output.checkpoint import (
    Checkpoint,
    ResultJournal,
    partial_dir_for,
)
from batchrun.io.output.lock import JobLock
from batchrun.io.schema import RESULT_SCHEMA
from batchrun.job.run import run_job
from tests.helpers import job
from tests.reliability.harness import (
    TALLY,
    admitted,
    batchrun,
    check_nothing_finished_ran_again,
    check_output,
    check_summary_tokens,
    journaled_rows,
    kill9,
    start_batchrun,
    wait_for_rows,
    write_rows,
)

# Slow enough that a run takes a few seconds, so that kills land at every stage of it.
SLOW = {"step_delay_s": 0.02, "max_num_seqs": 16}
# Any engine step fails: a run that passes with it generated nothing.
NO_GENERATION = {"die_after_steps": 0}


def killed_itself(proc: subprocess.Popen[str]) -> None:
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, stderr
    TALLY.kills += 1


def finished(output: Path) -> bool:
    """The job is complete: its output is in place and its checkpoint removed."""
    return output.exists() and not partial_dir_for(output).exists()


def test_random_kills_then_resume_gives_every_row_exactly_once(tmp_path: Path) -> None:
    ids = write_rows(tmp_path / "in.jsonl", 400)
    out = tmp_path / "out.parquet"
    args = ("run", tmp_path / "in.jsonl", "-o", out, "--engine", "fake", "--max-tokens", "12",
            "--resume", "--log-lines")
    rng = random.Random(20240611)
    kills, mid_job, journaled = 0, 0, []
    while kills < 6:
        log = tmp_path / f"admitted-{kills}.txt"
        proc = start_batchrun(*args, fake_engine={**SLOW, "admitted_log": str(log)})
        if kills % 3 == 2:
            # At some moment of the start-up (~1 s: reading, the checkpoint, the first steps).
            time.sleep(rng.uniform(0.05, 1.5))
        else:
            # Mid-job: once this run has journaled a random share of the rows it has left
            # (at most half of them, so the other half still runs when the kill lands).
            left = len(ids) - len(journaled)
            wait_for_rows(out, proc, len(journaled) + rng.randint(1, max(1, left // 2)))
        before = journaled_rows(out)
        killed = kill9(proc)
        # This run generated only rows no earlier run had finished.
        check_nothing_finished_ran_again(log, journaled)
        if not killed or finished(out):
            # It finished first (or had finished the job and was exiting when the kill
            # landed: output in place, checkpoint removed): the checks below still hold.
            break
        kills += 1
        # A kill with rows of this run in the journal and the job unfinished: what a resume
        # must continue from without losing or repeating any of them.
        mid_job += len(before) > len(journaled)
        after = journaled_rows(out)
        # Nothing that was journaled before the kill is lost by it, and no row twice.
        assert set(before) <= set(after) and len(after) == len(set(after))
        assert len(after) >= len(journaled)  # each resume added to what the last one saved
        journaled = after
    assert mid_job >= 1, f"no kill of {kills} landed after rows were journaled and before " \
        "the job finished"
    log = tmp_path / "admitted-last.txt"
    unfinished = not finished(out)
    done = batchrun(*args, fake_engine={"admitted_log": str(log)})
    assert done.returncode == EXIT_OK, done.stderr
    assert "Traceback" not in done.stderr
    check_output(out, ids)
    check_nothing_finished_ran_again(log, journaled)
    if unfinished:  # the last run generated exactly the rows no killed run had journaled
        assert sorted(admitted(log)) == sorted(set(ids) - {ids[r] for r in journaled})
    check_summary_tokens(out)
    assert not partial_dir_for(out).exists()
    TALLY.kills += kills


@pytest.mark.parametrize("kill_at, leaves", [
    # Output renamed into place, checkpoint not yet removed.
    ("batchrun.io.output.checkpoint:Checkpoint.remove", "output and a finished checkpoint"),
    # Output written under its temporary name, not yet renamed.
    ("pyarrow.parquet:ParquetWriter.close after", "a complete temp file, no output"),
    # The checkpoint folder made, its manifest not yet written.
    ("batchrun.io.output.checkpoint:os.replace", "a checkpoint without a manifest"),
])
def test_kill_at_the_worst_moments(tmp_path: Path, kill_at: str, leaves: str) -> None:
    ids = write_rows(tmp_path / "in.jsonl", 40)
    out = tmp_path / "out.parquet"
    args = ("run", tmp_path / "in.jsonl", "-o", out, "--engine", "fake", "--max-tokens", "4")
    killed_itself(start_batchrun(*args, kill_at=kill_at))
    # The same cron line again (with --resume) finishes the job without generating anything
    # twice, and cleans up what the kill left behind.
    again = batchrun(*args, "--resume",
                     fake_engine=NO_GENERATION if "manifest" not in leaves else None)
    assert again.returncode == EXIT_OK, again.stderr
    check_output(out, ids)
    assert not partial_dir_for(out).exists()
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


@pytest.mark.parametrize("change, says", [
    ("input", "the input file changed"),
    ("sampling", "the model or sampling settings changed"),
])
def test_a_changed_job_is_not_resumed_and_a_finished_one_not_rerun(
        tmp_path: Path, change: str, says: str) -> None:
    ids = write_rows(tmp_path / "in.jsonl", 100)
    out = tmp_path / "out.parquet"
    args = ["run", tmp_path / "in.jsonl", "-o", out, "--engine", "fake", "--max-tokens", "8"]
    died = batchrun(*args, fake_engine={"die_after_steps": 6})
    assert died.returncode == EXIT_INTERRUPTED and journaled_rows(out)
    if change == "input":
        ids = write_rows(tmp_path / "in.jsonl", 101)  # upstream rewrote the file
    else:
        args[-1] = "5"  # --max-tokens 5, not 8
    refused = batchrun(*args, "--resume")
    assert refused.returncode == EXIT_USAGE
    assert f"cannot resume: {says}" in refused.stderr and "--overwrite" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert batchrun(*args, "--overwrite").returncode == EXIT_OK
    check_output(out, ids)
    # Run again (cron with --resume): says it is done and touches nothing.
    written = out.stat().st_mtime_ns
    again = batchrun(*args, "--resume")
    assert again.returncode == EXIT_OK and "nothing to do" in again.stderr
    assert out.stat().st_mtime_ns == written


def test_a_kill_before_the_manifest_does_not_block_a_run_without_resume(
        tmp_path: Path) -> None:
    ids = write_rows(tmp_path / "in.jsonl", 10)
    out = tmp_path / "out.parquet"
    args = ("run", tmp_path / "in.jsonl", "-o", out, "--engine", "fake")
    killed_itself(start_batchrun(*args, kill_at="batchrun.io.output.checkpoint:os.replace"))
    assert partial_dir_for(out).is_dir()
    again = batchrun(*args)
    assert again.returncode == EXIT_OK, again.stderr
    check_output(out, ids)


BATCHES = [range(0, 5), range(5, 12), range(12, 15)]  # rows of three engine steps


def _journal_bytes(tmp_path: Path) -> tuple[bytes, list[int]]:
    """A journal of BATCHES as a kill leaves it (never closed), and where each batch ends."""
    path = tmp_path / "journal-00000.arrows"
    journal = ResultJournal(path)
    ends = []
    for rows in BATCHES:
        n = len(rows)
        journal.append(pa.table({
            "row": list(rows), "id": [f"q{i}" for i in rows], "text": ["t"] * n,
            "finish_reason": ["stop"] * n, "prompt_tokens": [3] * n,
            "completion_tokens": [1] * n, "cached_tokens": [0] * n, "error": [None] * n,
            "duplicate_of": [None] * n,
            "logprobs": [None] * n, "cumulative_logprob": [None] * n, "embedding": [None] * n,
        }, schema=RESULT_SCHEMA))
        ends.append(path.stat().st_size)
    return path.read_bytes(), ends


def test_a_journal_cut_at_any_byte_keeps_exactly_its_complete_batches(tmp_path: Path) -> None:
    data, ends = _journal_bytes(tmp_path)
    ckpt = Checkpoint(tmp_path / "cut.partial")
    ckpt.path.mkdir()
    cut = ckpt.path / "journal-00000.arrows"
    # Every byte of the last batch (all its message parts), and a stride through the ones
    # before it: each read costs milliseconds.
    for size in [*range(0, ends[-2], 16), *range(ends[-2], len(data) + 1)]:
        cut.write_bytes(data[:size])
        whole = [r for rows, end in zip(BATCHES, ends, strict=True) if end <= size for r in rows]
        assert ckpt.read_done()["row"].to_pylist() == whole, f"cut at byte {size}"


def test_resume_from_a_cut_journal_runs_only_the_missing_rows(tmp_path: Path) -> None:
    ids = write_rows(tmp_path / "in.jsonl", 60)
    cfg = job(tmp_path, tmp_path / "in.jsonl", max_tokens=12)
    first = run_job(cfg, engine_kind="fake", engine=FakeEngine(die_after_steps=5),
                    interactive=False, handle_signals=False)
    journal = Checkpoint(partial_dir_for(cfg.output.local_path)).journals()[0]
    saved = journaled_rows(cfg.output.local_path)
    assert 0 < len(saved) < 60, first.message
    journal.write_bytes(journal.read_bytes()[:-9])  # the kill cut the last write short
    kept = journaled_rows(cfg.output.local_path)
    assert set(kept) < set(saved)
    engine = FakeEngine()
    resumed = run_job(cfg, engine_kind="fake", engine=engine, resume=True, interactive=False,
                      handle_signals=False)
    assert resumed.exit_code == EXIT_OK
    check_output(cfg.output.local_path, ids)
    # Only the rows missing from the checkpoint ran again.
    assert sorted(engine.admission_order) == sorted(set(ids) - {f"q{r}" for r in kept})


def test_a_second_run_of_a_running_job_is_refused_and_the_first_one_finishes(
        tmp_path: Path) -> None:
    # Last night's run overran into tonight's cron slot: two runs must not share a journal.
    ids = write_rows(tmp_path / "in.jsonl", 60)
    out = tmp_path / "out.parquet"
    args = ("run", tmp_path / "in.jsonl", "-o", out, "--engine", "fake", "--resume")
    hold = tmp_path / "hold"  # the first run stays in flight until the second has tried
    hold.touch()
    first = start_batchrun(*args, fake_engine={"step_delay_s": 0.05,
                                               "hold_while_exists": str(hold)})
    wait_for_rows(out, first, at_least=1)
    second = batchrun(*args)
    hold.unlink()
    assert second.returncode == EXIT_USAGE and "Traceback" not in second.stderr
    assert f"another batchrun is running this job (pid {first.pid}" in second.stderr
    first.communicate(timeout=120)
    assert first.returncode == EXIT_OK
    check_output(out, ids)
    assert not JobLock(out).path.exists()  # released and removed with the run
    # A run killed with -9 leaves its lock file, but no lock: the kernel dropped it with the
    # process, and the next run goes ahead.
    out.unlink()
    third = start_batchrun(*args, fake_engine={"step_delay_s": 0.05})
    wait_for_rows(out, third, at_least=1)
    assert kill9(third) and JobLock(out).path.exists()
    TALLY.kills += 1
    assert batchrun(*args).returncode == EXIT_OK
    check_output(out, ids)


def test_a_job_lock_is_one_holder_at_a_time(tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    with JobLock(out) as held:
        assert held.path.read_text() == str(os.getpid())
        with pytest.raises(CheckpointError, match="another batchrun is running this job"):
            JobLock(out).__enter__()
    with JobLock(out):  # free again once released
        pass
