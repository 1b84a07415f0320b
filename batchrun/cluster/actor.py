"""One engine replica, the Ray actor the driver (cluster/replicas.py) hands pieces of prefix
shards to: its engine started with the job's sized settings (engine.factory.start_engine),
each piece prepared and run as a shard (execute.shard.run_shard), its results streamed back
as they finish."""

from __future__ import annotations

import contextlib
import queue
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import pyarrow as pa

from ..config import EngineKind, JobConfig
from ..engine.attention.selection import AttentionChoice
from ..engine.base import Engine
from ..engine.factory import start_engine
from ..engine.lora import on_this_node
from ..engine.sizing import EngineSizing
from ..errors import UsageError
from ..execute.shard import ShardRun, run_shard
from ..execute.stop import StopFlag
from ..ingest.prepare import prepare_shard

# Result tables a replica may have sent that the driver has not read yet: bounds the
# driver's memory when replicas finish rows faster than it journals them.
UNREAD_RESULTS = 8


@dataclass(frozen=True)
class ReplicaJob:
    """What every replica knows about the job: how to start its engine and prepare pieces."""

    config: JobConfig
    engine_kind: str
    sizing: EngineSizing  # the job's, sized by the driver from its first shard
    new_tokens: int  # this replica's share of the job's max_tokens (eager or compiled)
    input_format: str
    max_model_len: int
    attention: AttentionChoice | None = None  # the backend the job asks vLLM for


@dataclass(frozen=True)
class PieceDone:
    """A replica's last message for a piece: what running it produced beyond its results
    (its ShardRun), and how long its engine worked on it."""

    shard_run: ShardRun
    busy_s: float


class ReplicaActor:
    """One engine replica (a Ray actor: see `actor_class`). Its engine lives on one thread
    of its own, from start to close: the actor's methods run on Ray's threads, and a piece's
    results must stream out while the engine still runs it."""

    def __init__(self, job: ReplicaJob) -> None:
        self._job = job
        self._stop = StopFlag()
        self._engine_thread = ThreadPoolExecutor(1, thread_name_prefix="batchrun-engine")
        self._engine: Engine | None = None
        self._starting = self._engine_thread.submit(_start_engine, job)

    def ready(self) -> dict[str, Any]:
        """Wait for the engine to start; where it runs: its node's address, and its Ray
        node's id (Ray nodes on one machine share the address). A failure names the node."""
        node = _node_address()
        try:
            self._engine = self._starting.result()
        except UsageError as e:  # the model is not there, settings vLLM refuses
            raise type(e)(f"on node {node}: {e}") from None
        return {"node": node, "node_id": _node_id(), "engine": self._engine.info.name}

    def run(self, piece: pa.Table, grace_s: float) -> Iterator[pa.Table | PieceDone]:
        """Run one piece (REQUEST_SCHEMA rows of a shard); yield its results as they finish,
        then a PieceDone."""
        results: queue.Queue[pa.Table] = queue.Queue(maxsize=UNREAD_RESULTS)
        running = self._engine_thread.submit(self._run, piece, results.put, grace_s)
        yield from _drain(results, running)
        yield running.result()

    def _run(self, piece: pa.Table, on_results: Callable[[pa.Table], None],
             grace_s: float) -> PieceDone:
        job = self._job
        t0 = time.monotonic()
        prepared = prepare_shard(job.config, piece, job.input_format, job.max_model_len)
        shard_run = run_shard(prepared, self._engine, on_results, stop=self._stop,
                              grace_s=grace_s)
        return PieceDone(shard_run, time.monotonic() - t0)

    def stop(self) -> None:
        """Stop admitting requests; those in flight finish (the job is stopping)."""
        self._stop.request()

    def close(self) -> None:
        if self._engine is not None:
            self._engine_thread.submit(self._engine.close).result()
        self._engine_thread.shutdown()


def _start_engine(job: ReplicaJob) -> Engine:
    if job.engine_kind != EngineKind.FAKE:
        from ..model import resolve_model

        # The driver found the model on its own node; this node must see it too. Asked
        # first, so that a missing model is a ModelError, not an engine failure.
        resolve_model(job.config.model_name)
    sizing = replace(job.sizing, lora=on_this_node(job.config, job.sizing.lora))
    return start_engine(job.engine_kind, job.config, sizing, new_tokens=job.new_tokens,
                        attention=lambda: job.attention)


def _drain(results: queue.Queue[pa.Table], running: Future) -> Iterator[pa.Table]:
    """The tables `running` puts in `results`, batched as they come, until it is done (its
    exception, if any, is the caller's to raise: after every result it had finished)."""
    while True:
        try:
            batch = [results.get(timeout=0.05)]
        except queue.Empty:
            if running.done() and results.empty():
                return
            continue
        with contextlib.suppress(queue.Empty):
            while len(batch) < 64:
                batch.append(results.get_nowait())
        yield pa.concat_tables(batch)


def _node_address() -> str:
    import ray

    return ray.util.get_node_ip_address()


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def actor_class(ray: Any) -> Any:
    # Ray is optional: the class is made remote only when replicas are asked for. The
    # "control" group lets `stop` in while `run` streams a piece.
    return ray.remote(concurrency_groups={"control": 1})(ReplicaActor)
