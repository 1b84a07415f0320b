"""A Ray instance batchrun started itself (no --ray-address) that loses its node mid-run: the
node's dashboard agent is killed, which takes the raylet and every replica down. batchrun
starts Ray and the replicas again and finishes the job: every row exactly once, what had come
back never run again (checked at the engines, from the fake engine's admitted log), the
restart said in the summary. The restarts are bounded: past MAX_RAY_RESTARTS the job stops
with exit 4, resumable. The driver is this process: its Ray processes are its children, told
apart from any other Ray on the machine. About 40 s each, most of it starting Ray."""

from __future__ import annotations

import threading
import time

import psutil
import ray

from batchrun.cluster import replicas
from batchrun.errors import EXIT_INTERRUPTED, EXIT_OK
from batchrun.job.summary_lines import outcome_lines
from tests.cluster.test_replicas import admitted, fake_engine, journaled_ids, replicated, run
from tests.helpers import read_output

ROWS = 120


def dashboard_agent() -> psutil.Process | None:
    """The agent of the Ray instance this process started, if it runs."""
    for p in psutil.Process().children(recursive=True):
        try:
            if p.name() == "ray::DashboardAgent" and p.is_running():
                return p
        except psutil.NoSuchProcess:
            continue
    return None


def kill_agents(cfg, after_rows: list[int], snapshots: list[set[str]]) -> threading.Thread:
    """A thread that, for each count in `after_rows`, waits until that many rows are journaled
    and this process's Ray has a dashboard agent it has not killed yet, notes the journaled
    rows (a set appended to `snapshots`), and SIGKILLs the agent."""

    def kill() -> None:
        deadline = time.monotonic() + 240
        killed: set[int] = set()
        for rows in after_rows:
            while time.monotonic() < deadline:
                agent = dashboard_agent()
                if agent is not None and agent.pid not in killed and \
                        len(journaled_ids(cfg)) >= rows:
                    break
                time.sleep(0.02)
            snapshots.append(journaled_ids(cfg))
            agent.kill()
            killed.add(agent.pid)

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


def test_losing_the_node_of_its_own_ray_restarts_ray_and_finishes_the_job(tmp_path,
                                                                          monkeypatch):
    assert not ray.is_initialized()  # the job starts its own Ray
    log = tmp_path / "admitted.txt"
    fake_engine(monkeypatch, log, step_delay_s=0.03, max_num_seqs=4)
    cfg = replicated(tmp_path, ROWS)
    snapshots: list[set[str]] = []
    killer = kill_agents(cfg, after_rows=[30], snapshots=snapshots)
    outcome = run(cfg)
    killer.join()

    assert outcome.exit_code == EXIT_OK, outcome.message
    ids = [f"r{i}" for i in range(ROWS)]
    assert [r["id"] for r in read_output(cfg)] == ids
    assert outcome.summary["ray_restarts"] == 1
    assert "Ray restarted 1 time(s)" in "\n".join(outcome_lines(outcome.summary))
    per_replica = outcome.summary["replicas"]
    assert [r["replica"] for r in per_replica] == [0, 1, 2, 3]
    assert all(r["status"].startswith("lost: ") for r in per_replica[:2])
    assert [r["status"] for r in per_replica[2:]] == ["ok", "ok"]
    assert per_replica[0]["node_id"] != per_replica[2]["node_id"]  # a new node
    assert sum(r["rows"] for r in per_replica[2:]) > 0
    assert sum(r["rows"] for r in per_replica) == ROWS
    # At the engines: every row ran, and none that had come back before the kill ran again.
    counts = admitted(log)
    assert set(counts) == set(ids)
    run_twice = {i for i, n in counts.items() if n > 1}
    [returned_before_kill] = snapshots
    assert len(returned_before_kill) >= 30 and not run_twice & returned_before_kill
    assert max(counts.values()) == 2


def test_its_own_ray_is_restarted_a_bounded_number_of_times_then_the_job_stops(
        tmp_path, monkeypatch):
    monkeypatch.setattr(replicas, "MAX_RAY_RESTARTS", 1)
    log = tmp_path / "admitted.txt"
    fake_engine(monkeypatch, log, step_delay_s=0.03, max_num_seqs=4)
    cfg = replicated(tmp_path, ROWS)
    snapshots: list[set[str]] = []
    killer = kill_agents(cfg, after_rows=[20, 50], snapshots=snapshots)
    outcome = run(cfg)
    killer.join()

    assert outcome.exit_code == EXIT_INTERRUPTED
    assert outcome.summary["status"] == "engine_failed"
    assert "every engine replica is gone" in outcome.message
    assert "Ray restarted 1 time(s), the most allowed" in outcome.message
    assert "--resume" in outcome.message
    assert outcome.summary["ray_restarts"] == 1
    per_replica = outcome.summary["replicas"]
    assert [r["status"][:5] for r in per_replica] == ["lost:"] * 4
    # The second Ray's replicas ran rows before they were lost too, none that had come back.
    first, second = snapshots
    assert len(second) > len(first) and sum(r["rows"] for r in per_replica[2:]) > 0
    assert not {i for i, n in admitted(log).items() if n > 1} & first
