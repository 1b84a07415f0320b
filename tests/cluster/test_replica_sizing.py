"""Replicas on one CPU machine split the memory one engine's job-sized KV cache may take."""

from __future__ import annotations

from pathlib import Path

from batchrun.cluster import replicas
from batchrun.cluster.replicas import replica_sizing
from batchrun.config import ClusterOptions, EngineOptions, JobConfig
from batchrun.engine.sizing import EngineSizing

GIB = 2**30
PER_TOKEN = 46_080  # SmolLM2, fp32


def config(**cluster) -> JobConfig:
    return JobConfig(input=Path("in.jsonl"), output=Path("out.parquet"),
                     cluster=ClusterOptions(**cluster))


def job_sized(kv: int) -> EngineSizing:
    return EngineSizing(32, 1024, "the job's longest request", kv, "the plan's peak window",
                        PER_TOKEN, 60_000)


def test_local_replicas_share_the_kv_memory_one_engine_may_take(monkeypatch):
    monkeypatch.setattr(replicas, "memory_available", lambda: 10 * GIB)
    one_engine = job_sized(3 * GIB)  # within 40% of 10 GiB: what one engine would get
    capped = replica_sizing(config(replicas=4), one_engine)
    assert 4 * capped.kv_cache_memory <= 0.4 * 10 * GIB
    assert capped.kv_cache_memory % (PER_TOKEN * 32) == 0  # whole KV blocks
    assert "4 replicas on this machine" in capped.kv_cache_reason
    # A small cache is left alone, and so is a user's, and a cluster's (each node has its own).
    assert replica_sizing(config(replicas=4), job_sized(GIB // 4)) == job_sized(GIB // 4)
    users = config(replicas=4)
    users = JobConfig(users.input, users.output, engine=EngineOptions(kv_cache_memory=3 * GIB),
                      cluster=users.cluster)
    assert replica_sizing(users, one_engine) == one_engine
    assert replica_sizing(config(replicas=4, ray_address="auto"), one_engine) == one_engine
