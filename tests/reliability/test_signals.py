"""SIGTERM / SIGINT: stop admitting, let in-flight requests finish for the grace period, save,
exit 4; a second signal stops at once; a third, while the cleanup after the second hangs,
leaves at once. Either way `--resume` finishes the job exactly once.
What happened when is counted in events a traced run writes (engine steps, signals
received), not in seconds.
Also: the handler's Interrupted landing inside an engine step or a journal write leaves a
checkpoint a resume can trust."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from batchrun.engine.base import GenerationResult, StepOutput
from batchrun.engine.fake import FakeEngine
from batchrun.errors import EXIT_INTERRUPTED, EXIT_OK
from batchrun.io.output.checkpoint import Checkpoint, ResultJournal, partial_dir_for
from batchrun.io.output.lock import JobLock
from batchrun.job.run import run_job
from tests.helpers import job
from tests.reliability.harness import (
    admitted,
    batchrun,
    check_nothing_finished_ran_again,
    check_output,
    check_summary_tokens,
    events,
    journaled_rows,
    start_batchrun,
    start_traced,
    wait_for_event,
    wait_for_rows,
    write_rows,
)

SLOW = {"step_delay_s": 0.05, "max_num_seqs": 8}


def run_args(tmp_path: Path, *extra: str) -> tuple[str | Path, ...]:
    return ("run", tmp_path / "in.jsonl", "-o", tmp_path / "out.parquet", "--engine", "fake",
            "--max-tokens", "16", "--log-lines", *extra)


def resume_completes_the_job(tmp_path: Path, resume_log: Path, ids: list[str],
                             saved: list[int]) -> None:
    """`--resume` after a stop: every row in the output once, none of the rows saved before
    generated again, and the summary's tokens agree with the output's."""
    out = tmp_path / "out.parquet"
    resumed = batchrun(*run_args(tmp_path, "--resume"),
                       fake_engine={"admitted_log": str(resume_log)})
    assert resumed.returncode == EXIT_OK, resumed.stderr
    check_output(out, ids)
    check_nothing_finished_ran_again(resume_log, saved)
    check_summary_tokens(out)


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> str:
    """Wait for the run to exit; its stderr. `timeout` only turns a hang into a failure."""
    _, stderr = proc.communicate(timeout=timeout)
    return stderr


def after(seen: list[list[str]], event: list[str]) -> list[list[str]]:
    """The events after the first `event`."""
    return seen[seen.index(event) + 1:]


def steps(seen: list[list[str]]) -> list[int]:
    """Requests in flight after each engine step among `seen` events."""
    return [int(e[1]) for e in seen if e[0] == "step"]


def in_flight_at(seen: list[list[str]], event: list[str]) -> int:
    """Requests the engine had in flight when `event` came: as its last step before left it."""
    return steps(seen[:seen.index(event)])[-1]


def paused(times: int) -> object:
    """Until a traced run's engine has paused `times` times (see traced.py)."""
    return lambda seen: seen.count(["pause"]) >= times


# The engine pauses in these steps for the test's signals. The fake engine and the planner
# are deterministic: at each, 8 requests are in flight (up to 16 tokens, one a step), and
# rows finished before it are journaled.
FIRST, SECOND = 8, 10


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_a_signal_drains_saves_and_exits_4_then_resume_finishes(
        tmp_path: Path, signum: signal.Signals) -> None:
    ids = write_rows(tmp_path / "in.jsonl", 200)
    out = tmp_path / "out.parquet"
    trace = tmp_path / "events.txt"
    first_log, resume_log = tmp_path / "admitted-1.txt", tmp_path / "admitted-2.txt"
    # A grace period no drain comes near: a run that waited it out would hang the test.
    proc = start_traced(trace, *run_args(tmp_path, "--grace-period", "3600"),
                        fake_engine={"max_num_seqs": 8, "admitted_log": str(first_log)},
                        pause=(FIRST,))
    wait_for_event(trace, proc, paused(1))
    proc.send_signal(signum)
    stderr = finish(proc)
    assert proc.returncode == EXIT_INTERRUPTED, stderr
    assert "Traceback" not in stderr and "--resume" in stderr
    assert f"{signum.name}: finishing requests in flight" in stderr
    seen = events(trace)
    assert seen.count(["signal", "1"]) == 1 and ["signal", "2"] not in seen
    # Work was in flight when the signal landed, and the run went on stepping the engine
    # until it was done: no more steps than the longest of those requests needs (16 tokens,
    # one a step), and nothing left running.
    drained = steps(after(seen, ["signal", "1"]))
    assert in_flight_at(seen, ["signal", "1"]) > 0
    assert 1 <= len(drained) <= 16 and drained[-1] == 0, drained
    saved = journaled_rows(out)
    assert not out.exists() and 0 < len(saved) < len(ids)
    # The drain: every request the engine had started finished and was saved; the ones it had
    # not started were dropped, not started after the signal.
    assert sorted(admitted(first_log)) == sorted(f"q{r}" for r in saved)
    resume_completes_the_job(tmp_path, resume_log, ids, saved)


def test_a_second_signal_stops_at_once_and_is_still_resumable(tmp_path: Path) -> None:
    ids = write_rows(tmp_path / "in.jsonl", 200)
    out = tmp_path / "out.parquet"
    trace, log = tmp_path / "events.txt", tmp_path / "admitted-1.txt"
    proc = start_traced(trace, *run_args(tmp_path, "--grace-period", "3600"),
                        fake_engine={"max_num_seqs": 8, "admitted_log": str(log)},
                        pause=(FIRST, SECOND))
    wait_for_event(trace, proc, paused(1))
    proc.send_signal(signal.SIGTERM)
    # The drain has begun, and is under way in an engine step when the second signal lands.
    wait_for_event(trace, proc, paused(2))
    proc.send_signal(signal.SIGINT)
    stderr = finish(proc)
    assert proc.returncode == EXIT_INTERRUPTED, stderr
    assert "second SIGINT" in stderr and "Traceback" not in stderr
    seen = events(trace)
    assert steps(after(seen, ["signal", "1"]))  # the first signal drained: steps went on
    # It stopped at once: requests were in flight, and the engine never stepped again.
    assert in_flight_at(seen, ["signal", "2"]) > 0
    assert steps(after(seen, ["signal", "2"])) == []
    saved = journaled_rows(out)
    # The requests in flight were left unfinished, not saved: the resume runs them.
    abandoned = set(admitted(log)) - {f"q{r}" for r in saved}
    assert abandoned and 0 < len(saved) < len(ids)
    resume_log = tmp_path / "admitted-2.txt"
    resume_completes_the_job(tmp_path, resume_log, ids, saved)
    assert abandoned <= set(admitted(resume_log))


def test_a_third_signal_leaves_at_once_while_cleanup_hangs_and_is_still_resumable(
        tmp_path: Path) -> None:
    ids = write_rows(tmp_path / "in.jsonl", 200)
    out = tmp_path / "out.parquet"
    trace = tmp_path / "events.txt"
    # The cleanup after the second signal closes the engine: here that close never returns.
    proc = start_traced(trace, *run_args(tmp_path, "--grace-period", "3600"),
                        fake_engine={"max_num_seqs": 8}, pause=(FIRST, SECOND),
                        hang="batchrun.engine.fake:FakeEngine.close")
    try:
        wait_for_event(trace, proc, paused(1))
        proc.send_signal(signal.SIGTERM)
        wait_for_event(trace, proc, paused(2))
        proc.send_signal(signal.SIGTERM)
        wait_for_event(trace, proc, lambda seen: ["hang"] in seen)
        proc.send_signal(signal.SIGTERM)
        # A hang detector, not a time limit: without the third signal's exit it never ends.
        stderr = finish(proc, timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == EXIT_INTERRUPTED, stderr
    assert stderr.rstrip().endswith("batchrun: third signal: exiting now; finished rows are "
                                    "saved, run again with --resume"), stderr
    assert "Traceback" not in stderr
    seen = events(trace)
    # It left from the handler: nothing ran after the third signal, the hung cleanup did not
    # end, and none of the cleanup after it ran (the summary is unwritten, the lock file
    # still there: the kernel released the lock itself with the process).
    assert seen[-2:] == [["hang"], ["signal", "3"]], seen[-5:]
    assert not out.with_name(out.name + ".summary.json").exists()
    assert JobLock(out).path.exists()
    saved = journaled_rows(out)
    assert 0 < len(saved) < len(ids) and len(saved) == len(set(saved))
    resume_log = tmp_path / "admitted-2.txt"
    resume_completes_the_job(tmp_path, resume_log, ids, saved)


def test_a_signal_while_reading_the_input_exits_4_without_starting_the_engine(
        tmp_path: Path) -> None:
    # A large input: reading and tokenizing it takes a moment, and any engine step would die.
    write_rows(tmp_path / "in.jsonl", 60_000)
    proc = start_batchrun(*run_args(tmp_path), fake_engine={"die_after_steps": 0})
    while not partial_dir_for(tmp_path / "out.parquet").exists() and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    stderr = finish(proc)
    assert proc.returncode == EXIT_INTERRUPTED, stderr
    assert "interrupted by a signal" in stderr and "died" not in stderr


class SignalledEngine(FakeEngine):
    """A fake engine that gets SIGTERM twice while its step `at_step` runs: the second
    signal's Interrupted is raised inside the step, as it would be inside vLLM's."""

    def __init__(self, at_step: int, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self._at_step = at_step

    def step(self) -> StepOutput:
        if self.steps + 1 == self._at_step:
            os.kill(os.getpid(), signal.SIGTERM)  # handled at once: drain mode
            threading.Timer(0.01, os.kill, (os.getpid(), signal.SIGTERM)).start()
            time.sleep(1)  # the step is busy when the second one lands
        return super().step()


def test_interrupted_inside_an_engine_step_or_a_journal_write_keeps_a_clean_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = write_rows(tmp_path / "in.jsonl", 80)
    cfg = job(tmp_path, tmp_path / "in.jsonl", max_tokens=10)

    def run(engine: FakeEngine, **kwargs: bool) -> int:
        return run_job(cfg, engine_kind="fake", engine=engine, interactive=False,
                       **kwargs).exit_code

    assert run(SignalledEngine(at_step=6, max_num_seqs=8)) == EXIT_INTERRUPTED
    saved = journaled_rows(cfg.output.local_path)
    assert 0 < len(saved) < len(ids) and len(set(saved)) == len(saved)

    # Now the second signal lands right after a journal write returns, inside on_results.
    real_append = ResultJournal.append
    appends = 0

    def append_then_signal(self: ResultJournal, table: object) -> None:
        nonlocal appends
        real_append(self, table)
        appends += 1
        if appends == 2:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(ResultJournal, "append", append_then_signal)
    assert run(FakeEngine(max_num_seqs=8), resume=True) == EXIT_INTERRUPTED
    monkeypatch.undo()
    again = journaled_rows(cfg.output.local_path)
    assert set(saved) < set(again) and len(set(again)) == len(again)

    engine = FakeEngine()
    assert run(engine, resume=True, handle_signals=False) == EXIT_OK
    check_output(cfg.output.local_path, ids)
    assert sorted(engine.admission_order) == sorted(set(ids) - {f"q{r}" for r in again})


class ReportsAbortedRequests(FakeEngine):
    """Reports a result for requests aborted since its last step, as VllmEngine does for a
    request it rejected when it was added. SIGTERM arrives at step 3."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self._late: list[str] = []

    def abort(self, request_ids: list[str]) -> None:
        super().abort(request_ids)
        self._late += request_ids

    def step(self) -> StepOutput:
        if self.steps + 1 == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        out = super().step()
        out.finished += [GenerationResult(rid, None, None, 1, 0, 0, error="rejected")
                         for rid in self._late]
        self._late = []
        return out


def test_requests_aborted_at_a_stop_are_not_journaled_even_if_reported(tmp_path: Path) -> None:
    ids = write_rows(tmp_path / "in.jsonl", 60)
    cfg = job(tmp_path, tmp_path / "in.jsonl", max_tokens=10)
    engine = ReportsAbortedRequests(max_num_seqs=4)
    stopped = run_job(cfg, engine_kind="fake", engine=engine, interactive=False)
    assert stopped.exit_code == EXIT_INTERRUPTED
    saved = Checkpoint(partial_dir_for(cfg.output.local_path)).read_done()
    assert saved.num_rows and saved["error"].null_count == saved.num_rows
    assert run_job(cfg, engine_kind="fake", engine=FakeEngine(), resume=True, interactive=False,
                   handle_signals=False).exit_code == EXIT_OK
    check_output(cfg.output.local_path, ids)



def test_a_signal_drains_every_replica_and_resume_finishes(tmp_path: Path) -> None:
    ids = write_rows(tmp_path / "in.jsonl", 200)
    out = tmp_path / "out.parquet"
    proc = start_batchrun(*run_args(tmp_path, "--replicas", "2"), fake_engine=SLOW)
    assert wait_for_rows(out, proc, at_least=1) < len(ids)
    proc.send_signal(signal.SIGTERM)
    stderr = finish(proc)
    assert proc.returncode == EXIT_INTERRUPTED, stderr
    assert "Traceback" not in stderr and "SIGTERM: finishing requests in flight" in stderr
    assert "replica 0 (" in stderr and "replica 1 (" in stderr  # each one's share so far
    assert not out.exists() and 0 < len(journaled_rows(out)) < len(ids)
    resumed = batchrun(*run_args(tmp_path, "--replicas", "2", "--resume"), timeout=120)
    assert resumed.returncode == EXIT_OK, resumed.stderr
    check_output(out, ids)
