"""Ray for one job's replicas: the connection a caller already made (tests, notebooks), the
cluster at --ray-address (joined, left at the end), or a local instance of the job's own
(started, shut down at the end). Only the last is batchrun's to restart: when its node goes
down (its raylet, or the agent whose death takes the raylet with it), every replica goes with
it, and a fresh instance on this machine is the way on. A cluster batchrun joined is someone
else's: there the job goes on with the nodes that are left."""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

from ..config import ClusterOptions
from ..errors import ConfigError


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError("--replicas and --ray-address run engines on Ray, which is not "
                          "installed: pip install 'batchrun[ray]' (on every node of the "
                          "cluster)") from None
    return ray


class RaySession:
    """Ray, connected for one job: `ray` is the module, `own_instance` whether batchrun
    started the instance itself (no --ray-address, no connection made before it)."""

    def __init__(self, cluster: ClusterOptions) -> None:
        self.ray = import_ray()
        self._cluster = cluster
        self._connected_here = not self.ray.is_initialized()
        if self._connected_here:
            self._connect()

    @property
    def own_instance(self) -> bool:
        return self._connected_here and self._cluster.ray_address is None

    def restart(self) -> None:
        """Shut the job's own instance down (what is left of it) and start a fresh one."""
        if not self.own_instance:
            raise RuntimeError("only a Ray instance batchrun started may be restarted")
        self.ray.shutdown()
        self._connect()

    def close(self) -> None:
        if self._connected_here:
            self.ray.shutdown()

    def _connect(self) -> None:
        ray, cluster = self.ray, self._cluster
        on_main = threading.current_thread() is threading.main_thread()
        # ray.init installs handlers of its own; batchrun's (drain, then save) must stay.
        handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)} \
            if on_main else {}
        options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                   "logging_level": logging.WARNING}
        try:
            if cluster.ray_address is None:  # a Ray of its own, even where `ray start` ran
                ray.init(address="local", num_cpus=len(os.sched_getaffinity(0)), **options)
            else:
                ray.init(address=cluster.ray_address, **options)
        except ConnectionError as e:
            raise ConfigError(f"cannot join the Ray cluster at {cluster.ray_address!r} ({e}); "
                              "start it first (`ray start --head` on the head node) or fix "
                              "--ray-address") from None
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
