"""`batchrun plan --estimate`: the job run through the sim engine as `batchrun run` would run
it, so its predicted engine steps and computed prompt tokens are what a sim run of the same
job counts (and, with the same lengths, what vLLM computes: tests/engine/test_sim_engine.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batchrun.errors import EXIT_OK
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


def family_job(path: Path, families: int = 4, rows_each: int = 24) -> Path:
    """`families` distinct 320-token prefixes (ten blocks each), rows shuffled across them."""
    rows = [{"id": f"f{f}-{i}", "prompt_token_ids": [1000 * (f + 1) + k for k in range(320)]
             + [7, i, f], "max_tokens": 4} for i in range(rows_each) for f in range(families)]
    return write_jsonl(path, rows)


def test_a_fleet_estimate_runs_every_row_once_and_each_prefix_family_about_once(
        tmp_path: Path) -> None:
    # 4 families on 2 replicas: the shard queue hands out whole families while pieces are
    # large (cut where no block is shared), then cuts the last ones smaller to even out the
    # tail, each such cut computing its family's 320-token prefix once more. Contiguous
    # blocks of rows (Ray Data's way) would compute every prefix on both replicas.
    job = family_job(tmp_path / "in.jsonl")
    planned = cli("plan", job, "--estimate", "--replicas", "2", "--json",
                  "--kv-cache-memory", "64MiB")
    assert planned.exit_code == EXIT_OK, planned.stderr
    estimate = json.loads(planned.stdout)["estimate"]
    fleet = estimate["replicas"]
    per_replica = fleet["per_replica"]
    assert fleet["count"] == len(per_replica) == 2
    assert sum(r["rows"] for r in per_replica) == estimate["rows"] == 96
    assert all(r["rows"] > 0 for r in per_replica)
    assert sum(r["computed_prompt_tokens"] for r in per_replica) == estimate["computed_prompt"]
    ideal, every_prefix_everywhere = 4 * 320 + 96 * 3, 2 * 4 * 320 + 96 * 3
    assert ideal <= estimate["computed_prompt"] <= ideal + 2 * 320 < every_prefix_everywhere
    # The run stage is the busiest replica's simulated time, and the mean is below it.
    assert estimate["run_seconds"] == fleet["busiest_s"] == max(r["busy_s"] for r in per_replica)
    assert fleet["mean_s"] == pytest.approx(sum(r["busy_s"] for r in per_replica) / 2, abs=1e-2)
    assert 1.0 <= fleet["busiest_over_mean"] < 1.5


def test_a_fleet_estimate_is_shorter_than_one_engine_for_the_same_work(tmp_path: Path) -> None:
    job = family_job(tmp_path / "in.jsonl", families=8, rows_each=16)
    one, four = (json.loads(cli("plan", job, "--estimate", "--json", "--kv-cache-memory",
                                "64MiB", *extra).stdout)["estimate"]
                 for extra in ((), ("--replicas", "4")))
    assert one["computed_prompt"] == 8 * 320 + 128 * 3  # each prefix once
    assert one["computed_prompt"] <= four["computed_prompt"] < 4 * 8 * 320 + 128 * 3
    assert four["completion"] == one["completion"]
    assert four["run_seconds"] < one["run_seconds"] / 2


def test_a_run_with_estimate_reports_the_prediction_beside_what_it_measured(
        tmp_path: Path) -> None:
    # On the sim engine the run is the simulation the estimate ran: the counts match exactly.
    job = shared_prefix_job(tmp_path / "in.jsonl", 24)
    ran = cli("run", job, "-o", tmp_path / "out.parquet", "--engine", "sim", "--estimate",
              "--kv-cache-memory", "64MiB", "--json", "--log-lines")
    assert ran.exit_code == EXIT_OK, ran.stderr
    estimate = json.loads(ran.stdout)["estimate"]
    measured = estimate["measured"]
    assert measured["engine_steps"] == estimate["engine_steps"] > 0
    assert measured["computed_prompt"] == estimate["computed_prompt"] == 320 + 24 * 3
    assert measured["run_seconds"] > 0 and estimate["run_seconds"] > 0
    line = next(x for x in ran.stderr.splitlines() if x.startswith("estimate"))
    how = "ASSUMED" if estimate["profile"]["assumed"] else "calibrated"  # a cached calibration
    assert "run stage" in line and "measured" in line and f"{how} cost profile" in line


def test_a_finished_job_is_not_estimated_again(tmp_path: Path, monkeypatch) -> None:
    job = shared_prefix_job(tmp_path / "in.jsonl", 8)
    args = ("run", job, "-o", tmp_path / "out.parquet", "--engine", "fake", "--json")
    assert cli(*args).exit_code == EXIT_OK
    from batchrun.job import estimate

    def no_simulation(cfg):
        raise AssertionError("a finished job's estimate was simulated")

    monkeypatch.setattr(estimate, "estimate_run", no_simulation)
    again = cli(*args, "--estimate")
    assert again.exit_code == EXIT_OK, again.stderr
    assert json.loads(again.stdout)["status"] == "already_done"
