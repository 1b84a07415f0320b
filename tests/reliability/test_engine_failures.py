"""When the engine fails, the job fails fast (never hangs), keeps its checkpoint and exits 4
with a message naming the cause; a failure of one request is only that row's error."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from batchrun.engine.base import StepOutput
from batchrun.engine.fake import FakeEngine
from batchrun.runner import EXIT_INTERRUPTED, EXIT_OK, EXIT_ROW_ERRORS, run_job
from tests.conftest import TEST_ENGINE_OPTIONS
from tests.helpers import job, read_output, write_jsonl
from tests.reliability.harness import batchrun, check_output, write_rows


@contextmanager
def fails_instead_of_hanging(seconds: int) -> Iterator[None]:
    def hung(*_: object) -> None:
        raise AssertionError(f"still running after {seconds} s: hung")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_engine_death_exits_4_naming_the_cause_then_resume_finishes(tmp_path: Path) -> None:
    ids = write_rows(tmp_path / "in.jsonl", 100)
    out = tmp_path / "out.parquet"
    args = ("run", tmp_path / "in.jsonl", "-o", out, "--engine", "fake", "--max-tokens", "8")
    died = batchrun(*args, fake_engine={"die_after_steps": 10, "max_num_seqs": 8})
    assert died.returncode == EXIT_INTERRUPTED, died.stderr
    assert "the fake engine died" in died.stderr and "re-run with --resume" in died.stderr
    assert "Traceback" not in died.stderr
    summary = json.loads(out.with_name(out.name + ".summary.json").read_text())
    assert summary["status"] == "engine_failed" and 0 < summary["succeeded"] < 100
    resumed = batchrun(*args, "--resume")
    assert resumed.returncode == EXIT_OK, resumed.stderr
    check_output(out, ids)


class ForgetfulEngine(FakeEngine):
    """Loses a running request without ever reporting it (a silent engine bug)."""

    def step(self) -> StepOutput:
        out = super().step()
        if self.steps == 3 and self._running:
            self._running.pop(next(iter(self._running)))
        return out


def test_an_engine_that_loses_a_request_fails_fast_instead_of_hanging(tmp_path: Path) -> None:
    ids = write_rows(tmp_path / "in.jsonl", 30)
    cfg = job(tmp_path, tmp_path / "in.jsonl", max_tokens=20)
    with fails_instead_of_hanging(20):
        lost = run_job(cfg, engine_kind="fake", engine=ForgetfulEngine(max_num_seqs=4),
                       interactive=False, handle_signals=False)
    assert lost.exit_code == EXIT_INTERRUPTED
    assert "dropped 1 request(s) without a result" in lost.message
    assert run_job(cfg, engine_kind="fake", engine=FakeEngine(), resume=True,
                   interactive=False, handle_signals=False).exit_code == EXIT_OK
    check_output(cfg.output, ids)


def test_vllm_failing_to_start_exits_4_naming_the_cause(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cause = ("To serve at least one request with the models's max seq len (2048), (0.05 GiB "
             "KV cache is needed, which is larger than the available KV cache memory")

    class NoRoom:
        def __init__(self, *_: Any, **__: Any) -> None:
            raise ValueError(cause)

    monkeypatch.setattr("batchrun.engine.vllm_engine.VllmEngine", NoRoom)
    write_rows(tmp_path / "in.jsonl", 3)
    cfg = replace(job(tmp_path, tmp_path / "in.jsonl"), engine=TEST_ENGINE_OPTIONS)
    outcome = run_job(cfg, interactive=False, handle_signals=False)
    assert outcome.exit_code == EXIT_INTERRUPTED
    assert outcome.summary["status"] == "engine_failed"
    assert "the vLLM engine failed to start: ValueError: To serve at least one request" \
        in outcome.message and "--resume" in outcome.message


def test_vllm_dying_mid_job_exits_4_and_resume_finishes(
        tmp_path: Path, vllm_engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = write_rows(tmp_path / "in.jsonl", 6)
    cfg = replace(job(tmp_path, tmp_path / "in.jsonl", max_tokens=6), engine=TEST_ENGINE_OPTIONS)
    real_step, steps = vllm_engine._engine.step, 0

    def dies_at_step_3() -> Any:
        nonlocal steps
        steps += 1
        if steps == 3:
            raise RuntimeError("EngineCore encountered an issue (simulated)")
        return real_step()

    monkeypatch.setattr(vllm_engine._engine, "step", dies_at_step_3)
    with fails_instead_of_hanging(120):
        died = run_job(cfg, engine=vllm_engine, interactive=False, handle_signals=False)
    monkeypatch.undo()
    assert died.exit_code == EXIT_INTERRUPTED and died.summary["status"] == "engine_failed"
    assert "the vLLM engine failed: RuntimeError: EngineCore encountered an issue" in died.message
    # The shared engine was left without the dead job's requests: the resume sees only its own.
    resumed = run_job(cfg, engine=vllm_engine, resume=True, interactive=False,
                      handle_signals=False)
    assert resumed.exit_code == EXIT_OK, resumed.message
    check_output(cfg.output, ids)


def test_a_request_vllm_rejects_is_that_rows_error(tmp_path: Path, vllm_engine: Any) -> None:
    rows = [{"id": "ok", "prompt": "Say hi.", "max_tokens": 2},
            {"id": "bad", "prompt_token_ids": [1, 10**6], "max_tokens": 2}]
    cfg = replace(job(tmp_path, write_jsonl(tmp_path / "in.jsonl", rows)),
                  engine=TEST_ENGINE_OPTIONS)
    outcome = run_job(cfg, engine=vllm_engine, interactive=False, handle_signals=False)
    assert outcome.exit_code == EXIT_ROW_ERRORS
    ok, bad = read_output(cfg)
    assert ok["error"] is None and ok["text"]
    assert bad["error"] == "rejected by the engine: Token id 1000000 is out of vocabulary"
