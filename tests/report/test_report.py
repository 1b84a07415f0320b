"""The job's HTML report and its source, the per-step trace: written by every run (fake
engine here), kept in the checkpoint across a resume, rebuilt by `batchrun report`, drawn
for a plan by `batchrun plan --report`. The browser tests (test_report_browser.py) open
real runs' reports in Chromium."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from batchrun.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE
from batchrun.execute.prefix_figures import largest_prefixes
from batchrun.io.output.trace import read_saved_trace
from batchrun.plan.groups import RunGroup
from tests.helpers import shared_prefix_rows, write_jsonl
from tests.reliability.harness import batchrun, cli

MAX_REPORT_BYTES = 5_000_000


def run_fake(tmp_path: Path, *extra: str, rows: int = 60) -> Path:
    path = write_jsonl(tmp_path / "in.jsonl", shared_prefix_rows(rows, groups=3))
    out = tmp_path / "out.parquet"
    result = cli("run", path, "-o", out, "--engine", "fake", "--max-tokens", "16", *extra)
    assert result.exit_code == EXIT_OK, result.stderr
    return out


def sibling(out: Path, suffix: str) -> Path:
    return out.with_name(out.name + suffix)


def test_every_run_writes_its_trace_and_a_self_contained_report(tmp_path: Path) -> None:
    out = run_fake(tmp_path)
    summary = json.loads(sibling(out, ".summary.json").read_text())
    trace = read_saved_trace(out)
    # Beside the output, and not taken for data by a glob over the folder's Parquet files.
    assert [p.name for p in out.parent.glob("*.parquet")] == [out.name]
    # One record per engine step, whose tokens add up to the job's.
    assert trace.num_rows == summary["batch"]["steps"] > 0
    assert sum(trace["completion_tokens"].to_pylist()) == summary["tokens"]["completion"]
    assert sum(trace["prompt_tokens"].to_pylist()) == summary["tokens"]["computed_prompt"]
    assert all(0 <= kv <= 1 for kv in trace["kv_usage"].to_pylist())
    assert {s["stage"] for s in summary["stage_spans"]} >= {"read", "plan", "run", "write"}
    assert summary["prefixes"] and summary["host"]["cpu_cores"]
    page = sibling(out, ".report.html").read_text()
    assert page.count('class="plotly-graph-div"') >= 6
    assert "cdn" not in page.lower().split("<body>")[1]  # nothing loaded from the network
    assert len(page.encode()) < MAX_REPORT_BYTES


def test_an_embedding_job_gets_its_report_too(tmp_path: Path) -> None:
    # Its rows have no finish reason and no completion: the report draws what there is.
    out = run_fake(tmp_path, "--task", "embed")
    page = sibling(out, ".report.html").read_text()
    assert page.count('class="plotly-graph-div"') >= 3


def test_no_report_writes_none(tmp_path: Path) -> None:
    out = run_fake(tmp_path, "--no-report")
    assert sibling(out, ".summary.json").exists()
    assert not sibling(out, ".report.html").exists()


def test_the_trace_of_a_resumed_job_covers_every_run(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", shared_prefix_rows(80, groups=3))
    out = tmp_path / "out.parquet"
    args = ("run", path, "-o", out, "--engine", "fake", "--max-tokens", "16")
    first = batchrun(*args, fake_engine={"die_after_steps": 12})
    assert first.returncode == EXIT_INTERRUPTED, first.stderr
    # The stopped run's report draws the steps it ran, from the checkpoint.
    assert sibling(out, ".report.html").exists()
    second = batchrun(*args, "--resume")
    assert second.returncode == EXIT_OK, second.stderr
    trace = read_saved_trace(out)
    runs = trace["run"].to_numpy()
    assert (runs == 0).sum() == 12 and (runs == 1).sum() > 0
    spans = json.loads(sibling(out, ".summary.json").read_text())["stage_spans"]
    assert {s["run"] for s in spans} == {0, 1}


def test_batchrun_report_rebuilds_it_from_the_summary_and_trace(tmp_path: Path) -> None:
    out = run_fake(tmp_path)
    report = sibling(out, ".report.html")
    report.unlink()
    result = cli("report", out)
    assert result.exit_code == EXIT_OK, result.stderr
    assert report.read_text().count('class="plotly-graph-div"') >= 6
    missing = cli("report", tmp_path / "nothing.parquet")
    assert missing.exit_code == EXIT_USAGE
    assert "no summary at" in missing.stderr


def test_plan_report_draws_the_plan_before_any_engine_starts(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", shared_prefix_rows(30, groups=3))
    result = cli("plan", path, "--engine", "fake", "--report", tmp_path / "plan.html")
    assert result.exit_code == EXIT_OK, result.stderr
    page = (tmp_path / "plan.html").read_text()
    assert "block ideal (planned)" in page and 'class="plotly-graph-div"' in page


def group(members: int, prefix_len: int, prefix_id: int, parent_id: int = -1) -> RunGroup:
    return RunGroup(np.arange(members), prefix_len, prefix_len // 4, np.ones(members, int),
                    prefix_id=prefix_id, parent_id=parent_id)


def test_largest_prefixes_size_a_parent_by_what_its_subtree_saves() -> None:
    # Prefix 0 (100 tokens) is extended by prefix 1 (150 tokens): prefix 0's 100 tokens are
    # shared by all 2 + 3 + 4 requests, prefix 1's further 50 by its 3 + 4 (two cuts).
    groups = [group(2, 100, 0), group(3, 150, 1, parent_id=0), group(4, 150, 1, parent_id=0),
              group(5, 0, -1)]
    by_id = {p["id"]: p for p in largest_prefixes(groups)}
    assert by_id[1] == {"id": 1, "parent": 0, "tokens": 150, "requests": 7, "saved": 6 * 50}
    assert by_id[0] == {"id": 0, "parent": -1, "tokens": 100, "requests": 9,
                        "saved": 8 * 100 + 6 * 50}
    assert [p["id"] for p in largest_prefixes(groups, limit=1)] == [0]


def test_a_run_with_estimate_shows_the_estimate_beside_what_happened(tmp_path: Path) -> None:
    out = run_fake(tmp_path, "--estimate", rows=30)
    summary = json.loads(sibling(out, ".summary.json").read_text())
    assert summary["estimate"]["measured"]["engine_steps"] == summary["batch"]["steps"]
    assert "plan --estimate (simulated) beside what happened" in \
        sibling(out, ".report.html").read_text()
