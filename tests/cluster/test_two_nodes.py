"""The fleet across Ray nodes: a real two-node cluster on this machine (a head and a second
node, each started with `ray start` and one CPU, so one replica lands on each), joined by a
`batchrun run --replicas 2 --ray-address auto` process, with the deterministic fake engine.
The second node is killed mid-run (its raylet SIGKILLed): the job finishes, every row exactly
once, and what the lost node had not returned runs on the head. Each node's engine records
what it admitted in a log of its own (the node's environment names it), so exactly-once is
checked at the engines. About 50 s: 20 starting the nodes, 25 the job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from batchrun.config import JobConfig
from batchrun.errors import EXIT_OK
from tests.cluster.ray_nodes import LocalRayCluster, RayNode
from tests.cluster.test_replicas import admitted, journaled_ids
from tests.helpers import job, read_output, shared_prefix_rows, write_jsonl

ROWS = 160
JOB_TIMEOUT_S = 300


def node_engine(log: Path, step_delay_s: float) -> dict[str, str]:
    """A node's environment for its replicas' fake engines: a log of what they admitted,
    and the wall time of an engine step."""
    return {"BATCHRUN_FAKE_ENGINE": json.dumps(
        {"admitted_log": str(log), "step_delay_s": step_delay_s, "max_num_seqs": 4})}


@pytest.fixture
def two_nodes(tmp_path):
    """A head and a second node, one CPU each. The second node's engine is slow: its workers
    outlive a SIGKILLed raylet by a second or two (they notice it gone in their own time),
    and its piece must still be running when they die."""
    cluster = LocalRayCluster()
    try:
        cluster.start_node(1, {"head_node": 1}, node_engine(tmp_path / "head.txt", 0.05))
        cluster.start_node(1, {"second_node": 1}, node_engine(tmp_path / "second.txt", 0.1))
        yield cluster
    finally:
        cluster.shutdown()


def start_batchrun_on(cluster: LocalRayCluster, cfg: JobConfig) -> subprocess.Popen:
    """`batchrun run` of `cfg`'s input with 2 replicas on `cluster`, the summary as JSON on
    stdout. It passes no fake-engine options of its own: each node's environment has them."""
    env = {k: v for k, v in os.environ.items() if k != "BATCHRUN_FAKE_ENGINE"}
    return subprocess.Popen(
        [sys.executable, "-m", "batchrun", "run", str(cfg.input), "-o", str(cfg.output),
         "--max-tokens", "8", "--engine", "fake", "--replicas", "2", "--ray-address", "auto",
         "--json"], env={**env, **cluster.driver_env()}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)


def kill_raylet_mid_piece(cfg, node: RayNode, node_log: Path, after_admitted: int,
                          snapshot: set[str]) -> threading.Thread:
    """A thread that waits until `node`'s engine has admitted `after_admitted` requests and
    some of its results are journaled, notes the journaled rows (`snapshot`), then SIGKILLs
    the node's raylet (its workers and agents go with it: the workers within a second or
    so, still streaming results until then)."""
    raylet = node.raylet()

    def kill() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            there = admitted(node_log) if node_log.exists() else {}
            if len(there) >= after_admitted and set(there) & journaled_ids(cfg):
                break
            time.sleep(0.01)
        snapshot.update(journaled_ids(cfg))
        raylet.kill()

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


def test_a_node_killed_mid_run_loses_no_row_and_its_rows_rerun_on_the_other(
        tmp_path, two_nodes):
    head, second = two_nodes.nodes
    second_id = second.node_id
    # ROWS rows in two prefix families: each replica's first piece is 40 rows (half its fair
    # share, cluster/queue.py), 4 s or more on the second node.
    cfg = job(tmp_path, write_jsonl(tmp_path / "in.jsonl", shared_prefix_rows(ROWS, groups=2)))
    returned_before_kill: set[str] = set()
    killer = kill_raylet_mid_piece(cfg, second, tmp_path / "second.txt", after_admitted=8,
                                   snapshot=returned_before_kill)
    batchrun = start_batchrun_on(two_nodes, cfg)
    try:
        out, err = batchrun.communicate(timeout=JOB_TIMEOUT_S)
    finally:
        batchrun.kill()  # a run past its time (once it has exited, nothing happens)
    killer.join()

    assert batchrun.returncode == EXIT_OK, err
    summary = json.loads(out)
    ids = [f"r{i}" for i in range(ROWS)]
    assert [r["id"] for r in read_output(cfg)] == ids
    # One replica on each node: one address, told apart by the Ray node id.
    by_node = {r["node_id"]: r for r in summary["replicas"]}
    assert set(by_node) == {head.node_id, second_id}
    assert len({r["node"] for r in summary["replicas"]}) == 1
    assert "2 replicas (fake) on 2 Ray nodes at " in err
    lost, kept = by_node[second_id], by_node[head.node_id]
    assert f"node {second_id[:8]}): rows {lost['rows']}" in err  # its summary line
    assert lost["status"].startswith("lost: ") and kept["status"] == "ok"
    assert lost["rows"] > 0  # it streamed results back before it died
    assert lost["rows"] + kept["rows"] == ROWS
    assert summary["ray_restarts"] == 0  # a cluster batchrun joined is not its to restart
    # At the engines: each node admitted a row at most once; the rows the second node held
    # when it died (never returned) ran again on the head, and no row that had come back.
    on_head, on_second = admitted(tmp_path / "head.txt"), admitted(tmp_path / "second.txt")
    assert max(on_head.values()) == 1 and max(on_second.values()) == 1
    assert set(on_head) | set(on_second) == set(ids)
    rerun = set(on_head) & set(on_second)
    assert rerun and not rerun & returned_before_kill
    assert len(set(on_second) - rerun) == lost["rows"]  # what it returned ran nowhere else
