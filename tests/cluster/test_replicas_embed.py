"""An embedding job (`--task embed`) on two Ray replicas of the fake engine: the job is shared
out, every line comes back once with the vectors one engine gives it, lines of several
inputs included."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace

import pyarrow.parquet as pq

from batchrun.config import ClusterOptions, JobConfig
from batchrun.errors import EXIT_OK
from batchrun.job.run import run_job
from tests.helpers import write_jsonl

COMPARED = ["row", "id", "embedding", "embeddings", "prompt_tokens", "error"]


def lines(n: int) -> list[dict]:
    """OpenAI /v1/embeddings lines: every third one holds several texts; some repeat."""
    out = []
    for i in range(n):
        texts = [f"text {i % 40} about topic {i % 7}", f"second text {i}", "shared text"]
        body = {"model": "m", "input": texts[:2 + i % 2] if i % 3 == 0 else texts[0]}
        out.append({"custom_id": f"l{i}", "method": "POST", "url": "/v1/embeddings",
                    "body": body})
    return out


def test_two_replicas_embed_every_line_once_as_one_engine_does(tmp_path, monkeypatch,
                                                               local_ray):
    log = tmp_path / "admitted.txt"
    monkeypatch.setenv("BATCHRUN_FAKE_ENGINE", json.dumps({"admitted_log": str(log)}))
    cfg = JobConfig(input=write_jsonl(tmp_path / "in.jsonl", lines(90)),
                    output=tmp_path / "out.parquet", task="embed",
                    cluster=ClusterOptions(replicas=2))
    outcome = run_job(cfg, engine_kind="fake", interactive=False, handle_signals=False)
    assert outcome.exit_code == EXIT_OK
    replicas = outcome.summary["replicas"]
    assert [r["status"] for r in replicas] == ["ok", "ok"] and all(r["rows"] for r in replicas)
    # No request reached an engine twice (a line's second input has an id of its own).
    assert set(Counter(log.read_text().splitlines()).values()) == {1}
    replicated = pq.read_table(cfg.output).select(COMPARED)
    assert replicated["id"].to_pylist() == [f"l{i}" for i in range(90)]
    assert replicated["embeddings"].null_count == 60  # the 30 lines of several inputs
    single = replace(cfg, output=tmp_path / "single.parquet", cluster=ClusterOptions())
    assert run_job(single, engine_kind="fake", interactive=False,
                   handle_signals=False).exit_code == EXIT_OK
    assert replicated.equals(pq.read_table(single.output).select(COMPARED))
