"""An embedding job (`--task embed`) reading from and writing to object storage, against a
real local S3 endpoint (moto's server mode, the `s3` fixture; never AWS): a CLI process with
the fake engine gives what the same job gives on local files."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batchrun.errors import EXIT_OK
from tests.helpers import write_jsonl
from tests.reliability.harness import batchrun
from tests.test_object_storage import get_table, put


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The default work dir of a remote output is under the cache: keep it in this test.
    monkeypatch.setenv("BATCHRUN_CACHE_DIR", str(tmp_path / "cache"))


def test_s3_embedding_job_gives_the_vectors_of_a_local_run(s3, tmp_path: Path) -> None:
    bucket, filesystem = s3
    lines = [{"custom_id": f"l{i}", "method": "POST", "url": "/v1/embeddings",
              "body": {"input": [f"text {i}", "shared"] if i % 4 == 0 else f"text {i % 9}"}}
             for i in range(40)]
    write_jsonl(tmp_path / "in.jsonl", lines)
    put(filesystem, f"{bucket}/in.jsonl", tmp_path / "in.jsonl")
    local = batchrun("run", tmp_path / "in.jsonl", "-o", tmp_path / "local.parquet",
                     "--engine", "fake", "--task", "embed",
                     "--openai-output", tmp_path / "local.jsonl")
    remote = batchrun("run", f"{bucket}/in.jsonl", "-o", f"{bucket}/out.parquet",
                      "--engine", "fake", "--task", "embed",
                      "--openai-output", f"{bucket}/out.jsonl")
    assert local.returncode == EXIT_OK, local.stderr
    assert remote.returncode == EXIT_OK, remote.stderr
    got = get_table(filesystem, f"{bucket}/out.parquet")
    assert got["id"].to_pylist() == [f"l{i}" for i in range(40)]
    assert got.to_pylist() == pq.read_table(tmp_path / "local.parquet").to_pylist()
    with filesystem.open_input_stream(f"{bucket}/out.jsonl".removeprefix("s3://")) as f:
        remote_lines = [json.loads(line) for line in f.read().decode().splitlines()]
    local_lines = [json.loads(line) for line in (tmp_path / "local.jsonl").read_text()
                   .splitlines()]
    # The same responses (each file's line ids are its own).
    assert [line["response"]["body"] for line in remote_lines] == \
        [line["response"]["body"] for line in local_lines]
    assert len(remote_lines[0]["response"]["body"]["data"]) == 2
