"""Replicas simulated: `--engine sim --replicas N` (and `plan --estimate --replicas N`) run a
fleet of N sim engines (engine/sim.py: vLLM's own scheduler, no model) in this process, on a
simulated clock, instead of N Ray actors.

What is real here is what decides a fleet's balance and its computed tokens: the driver's
shard queue (cluster/queue.py: largest first, share-sized pieces cut where the fewest KV
blocks are shared), each replica's engine keeping its prefix cache from piece to piece, and
every piece prepared and run by the code a Ray replica runs (ingest.prepare.prepare_shard,
execute.shard.run_shard). What is simulated is time: a piece takes the seconds its engine's
cost profile (engine/sim_cost.py) gives what vLLM's scheduler scheduled for it, and each
replica pulls its next piece when its clock says it is free. Results stream back as a piece
runs, so the queue's share counts a running piece's rows as shrinking linearly over its time.

Each replica is priced as if it had the whole device: true of a GPU fleet (a GPU each), not
of replicas side by side on one CPU machine, which share its cores.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pyarrow as pa

from ..config import EngineKind, JobConfig
from ..engine.factory import start_engine
from ..engine.sim import SimEngine
from ..engine.sim_cost import CostProfile, SimCounts, SimulatedRun
from ..engine.sizing import EngineSizing
from ..execute.shard import ShardRun, run_shard
from ..execute.stop import StopFlag
from ..ingest.prepare import prepare_shard
from ..ingest.stream import ShardedJob
from .actor import ReplicaJob
from .queue import PrefixOrders, ShardQueue, ShardRef
from .replicas import ReplicaStats, replica_job


@dataclass
class _Piece:
    """A piece running on the simulated clock: its rows return linearly from start to end."""

    start: float
    end: float
    rows: int

    def rows_left(self, now: float) -> float:
        if self.end <= self.start:
            return 0.0
        return self.rows * max(0.0, self.end - now) / (self.end - self.start)


@dataclass
class FleetClock:
    """Which replica is free when, and the rows of the pieces still running."""

    free_at: list[tuple[float, int]]  # heap of (time, replica)
    running: list[_Piece] = field(default_factory=list)

    @classmethod
    def start(cls, replicas: int) -> FleetClock:
        return cls([(0.0, r) for r in range(replicas)])

    def next_free(self) -> tuple[float, int] | None:
        return heapq.heappop(self.free_at) if self.free_at else None

    def in_flight_rows(self, now: float) -> int:
        self.running = [p for p in self.running if p.end > now]
        return int(sum(p.rows_left(now) for p in self.running))

    def busy(self, replica: int, now: float, seconds: float, rows: int) -> None:
        self.running.append(_Piece(now, now + seconds, rows))
        heapq.heappush(self.free_at, (now + seconds, replica))


def start_simulated_replicas(config: JobConfig, sizing: EngineSizing,
                             sharded: ShardedJob) -> SimulatedReplicas:
    """The job's `config.cluster.replicas` replicas as sim engines, each sized as a Ray
    replica of the job would be (replicas.replica_sizing)."""
    return SimulatedReplicas(replica_job(config, EngineKind.SIM, sizing, sharded),
                             config.cluster.replicas)


class SimulatedReplicas:
    """A job's handle on its simulated replicas, used as cluster.replicas.EngineReplicas is:
    started with the job's sizing, run on the job's shards, closed."""

    def __init__(self, job: ReplicaJob, replicas: int) -> None:
        self.job = job
        first = start_engine(EngineKind.SIM, job.config, job.sizing, new_tokens=job.new_tokens)
        assert isinstance(first, SimEngine)
        # The others share the first's vLLM configuration (building one takes a second or
        # more) and each have a scheduler and KV cache of their own.
        self.engines: list[SimEngine] = [first, *(first.twin() for _ in range(replicas - 1))]
        self.stats_by_replica = [ReplicaStats(r, node="simulated") for r in range(replicas)]
        self.block_size = first.info.block_size
        self.first_piece_at: float | None = None  # time.monotonic() when a replica got one

    @property
    def stats(self) -> list[ReplicaStats]:
        return self.stats_by_replica

    @property
    def profile(self) -> CostProfile:
        return self.engines[0].profile

    def describe(self) -> str:
        return f"{len(self.engines)} simulated replicas ({self.engines[0].info.name})"

    def run(self, shards: Sequence[ShardRef], on_results: Callable[[pa.Table], None],
            stop: StopFlag, grace_s: float) -> list[ShardRun]:
        """Run every shard on the simulated fleet (see the module notes); `on_results` gets
        each result table once. Returns the ShardRun of every piece in the job's token
        order, as EngineReplicas.run does."""
        queue = ShardQueue(shards, len(self.engines), PrefixOrders(self.block_size))
        clock = FleetClock.start(len(self.engines))
        runs: list[tuple[tuple[int, int], ShardRun]] = []
        while (free := clock.next_free()) is not None and not stop.requested:
            now, replica = free
            work = queue.take(clock.in_flight_rows(now))
            if work is None:
                continue  # nothing left for this replica: it stays idle
            table = work.table(queue.orders)
            if not table.num_rows:
                heapq.heappush(clock.free_at, free)
                continue
            if self.first_piece_at is None:
                self.first_piece_at = time.monotonic()
            seconds, shard_run = self._run_piece(replica, table, on_results, stop, grace_s)
            runs.append((work.token_order, shard_run))
            clock.busy(replica, now, seconds, table.num_rows)
            # Simulated seconds from the fleet's start (the report labels them so).
            self.stats_by_replica[replica].spans.append(
                [round(now, 3), round(now + seconds, 3), table.num_rows])
        return [run for _, run in sorted(runs, key=lambda r: r[0])]

    def _run_piece(self, replica: int, table: pa.Table,
                   on_results: Callable[[pa.Table], None], stop: StopFlag,
                   grace_s: float) -> tuple[float, ShardRun]:
        """Run one piece on a replica's engine, as a Ray replica runs it; its simulated
        seconds."""
        engine, stats = self.engines[replica], self.stats_by_replica[replica]
        job = self.job

        def count(results: pa.Table) -> None:
            on_results(results)
            stats.count(results)

        before = engine.counts()
        prepared = prepare_shard(job.config, table, job.input_format, job.max_model_len)
        shard_run = run_shard(prepared, engine, count, stop=stop, grace_s=grace_s)
        seconds = self.profile.seconds(engine.counts().minus(before))
        stats.busy_s += seconds
        stats.pieces += 1
        return seconds, shard_run

    def simulated(self) -> dict[str, object]:
        """The summary's `simulated` section for a fleet: counts summed over replicas, and
        the run stage's seconds, which are the busiest replica's (replicas pull work until
        none is left, so none idles before its last piece ends)."""
        counts = SimCounts()
        for engine in self.engines:
            counts = counts.plus(engine.counts())
        busy = [s.busy_s for s in self.stats_by_replica]
        mean = sum(busy) / len(busy)
        return {**SimulatedRun(counts, self.profile).to_dict(),
                "seconds": round(max(busy), 3),
                "replicas": {"count": len(busy), "busiest_s": round(max(busy), 3),
                             "mean_s": round(mean, 3),
                             "busiest_over_mean": round(max(busy) / mean, 4) if mean else None}}

    def close(self) -> None:
        for engine in self.engines:
            engine.close()
