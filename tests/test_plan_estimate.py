"""`batchrun plan --estimate`: the job run through the sim engine as `batchrun run` would run
it, so its predicted engine steps and computed prompt tokens are what a sim run of the same
job counts (and, with the same lengths, what vLLM computes: tests/engine/test_sim_engine.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from batchrun.errors import EXIT_OK, EXIT_USAGE
from tests.helpers import write_jsonl
from tests.reliability.harness import cli

SYSTEM = list(range(100, 420))  # a 320-token shared prefix: ten 32-token blocks


def shared_prefix_job(path: Path, rows: int = 48) -> Path:
    return write_jsonl(path, [{"id": f"r{i}", "prompt_token_ids": SYSTEM + [7, i % 50, i],
                               "max_tokens": 4 + i % 5} for i in range(rows)])


def test_the_estimate_is_what_a_sim_run_of_the_job_counts(tmp_path: Path) -> None:
    job = shared_prefix_job(tmp_path / "in.jsonl")
    planned = cli("plan", job, "--estimate", "--json", "--kv-cache-memory", "64MiB")
    assert planned.exit_code == EXIT_OK, planned.stderr
    estimate = json.loads(planned.stdout)["estimate"]
    ran = cli("run", job, "-o", tmp_path / "out.parquet", "--engine", "sim",
              "--kv-cache-memory", "64MiB", "--json", "--log-lines")
    assert ran.exit_code == EXIT_OK, ran.stderr
    summary = json.loads(ran.stdout)
    assert estimate["engine_steps"] == summary["batch"]["steps"] > 0
    assert estimate["computed_prompt"] == summary["tokens"]["computed_prompt"]
    # The shared prefix is computed once: its ten blocks, then each row's own three tokens.
    assert estimate["computed_prompt"] == 320 + 48 * 3
    assert estimate["run_seconds"] == summary["simulated"]["seconds"] > 0
    assert estimate["label"].startswith("simulated") and estimate["profile"]["source"]
    # The estimate wrote nothing beside the job, and the plan is still there.
    assert json.loads(planned.stdout)["requests"] == 48
    assert sorted(p.name for p in tmp_path.iterdir() if "out.parquet" not in p.name) == [
        "in.jsonl"]
    assert pq.read_table(tmp_path / "out.parquet").num_rows == 48


def test_the_estimate_says_it_is_simulated_in_the_plain_output(tmp_path: Path) -> None:
    planned = cli("plan", shared_prefix_job(tmp_path / "in.jsonl", 8), "--estimate",
                  "--kv-cache-memory", "64MiB")
    assert planned.exit_code == EXIT_OK, planned.stderr
    line = planned.stdout.splitlines()[-1]
    assert line.startswith("estimate (simulated: vLLM's scheduler") and "engine steps" in line


def test_replicas_are_not_estimated_yet(tmp_path: Path) -> None:
    shared_prefix_job(tmp_path / "in.jsonl", 4)
    job = tmp_path / "job.toml"
    job.write_text('input = "in.jsonl"\noutput = "out.parquet"\n[cluster]\nreplicas = 2\n')
    planned = cli("plan", job, "--estimate", "--kv-cache-memory", "64MiB")
    assert planned.exit_code == EXIT_USAGE
    assert "does not simulate replicas yet" in planned.stderr
