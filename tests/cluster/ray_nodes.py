"""Real Ray nodes on this machine, for tests: a head and more nodes, each started with
`ray start` (its own temp folder, CPUs, resources and environment), as an operator starts a
cluster. Each node's `ray start` runs in a process session of its own, which every process
of that node (its raylet, agents, workers) inherits: so a test finds a node's processes among
any other Ray on the machine, kills one node's raylet, and stops the whole cluster by killing
its sessions. Never `ray stop`: it stops every Ray instance on the machine, others' too."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import psutil

RAY = str(Path(sys.executable).with_name("ray"))
START_TIMEOUT_S = 180  # `ray start` takes 10-25 s on 2 busy cores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def session_processes(session: int) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == session:
                found.append(p)
        except (ProcessLookupError, PermissionError):
            continue
    return found


@dataclass
class RayNode:
    session: int  # the process session of the node's processes
    temp_dir: Path

    def processes(self) -> list[psutil.Process]:
        return session_processes(self.session)

    def raylet(self) -> psutil.Process:
        [raylet] = [p for p in self.processes() if p.name() == "raylet"]
        return raylet

    @property
    def node_id(self) -> str:
        """Its Ray node id, as the raylet was told it."""
        [arg] = [a for a in self.raylet().cmdline() if a.startswith("--node_id=")]
        return arg.removeprefix("--node_id=")

    def kill(self) -> None:
        for p in self.processes():
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                continue
        psutil.wait_procs(self.processes(), timeout=10)


class LocalRayCluster:
    """A Ray cluster of `ray start` nodes on this machine. `address` is the head's GCS
    address: a driver joins with RAY_ADDRESS set to it and `--ray-address auto`."""

    def __init__(self) -> None:
        # Short: Ray's socket paths under it must fit a Unix socket name (107 bytes).
        self.root = Path(tempfile.mkdtemp(prefix="brray-", dir="/tmp"))
        self.nodes: list[RayNode] = []
        self.address: str | None = None

    def start_node(self, cpus: int, resources: dict[str, float],
                   env: dict[str, str] | None = None) -> RayNode:
        """The head first, then nodes that join it; `env` adds to this process's environment
        for the node's processes (its workers inherit it)."""
        temp_dir = self.root / f"node{len(self.nodes)}"
        args = [RAY, "start", f"--num-cpus={cpus}", f"--resources={json.dumps(resources)}",
                f"--temp-dir={temp_dir}", "--object-store-memory=100000000",
                "--disable-usage-stats", f"--dashboard-agent-listen-port={free_port()}"]
        if self.address is None:
            args += ["--head", "--port=0", "--include-dashboard=false",
                     f"--ray-client-server-port={free_port()}",
                     f"--dashboard-port={free_port()}"]
        else:
            args += [f"--address={self.address}"]
        node_env = {**os.environ, **self.driver_env(), **(env or {})}
        starting = subprocess.Popen(args, env=node_env, start_new_session=True,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
        node = RayNode(starting.pid, temp_dir)
        self.nodes.append(node)  # before it is up: a failed start is still stopped
        out, _ = starting.communicate(timeout=START_TIMEOUT_S)
        if starting.returncode != 0:
            raise RuntimeError(f"ray start failed:\n{out}")
        if self.address is None:
            self.address = (temp_dir / "ray_current_cluster").read_text().strip()
        return node

    def driver_env(self) -> dict[str, str]:
        """The environment of a driver joining with `--ray-address auto`, and of the nodes:
        token authentication off (`ray start --head` would turn it on, and a process that
        started a Ray of its own keeps it on, in RAY_AUTH_MODE)."""
        env = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
        return env if self.address is None else {**env, "RAY_ADDRESS": self.address}

    def shutdown(self) -> None:
        for node in self.nodes:
            node.kill()
        shutil.rmtree(self.root, ignore_errors=True)
