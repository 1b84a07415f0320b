"""Inputs, outputs and job files in object storage, against a real local S3 endpoint (moto's
server mode on 127.0.0.1, started by the `s3` fixture; never AWS). Runs are CLI processes with
the fake engine, as cron or Airflow would start them."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyarrow import fs

from batchrun.errors import EXIT_OK, EXIT_USAGE
from batchrun.io import storage
from batchrun.job.paths import default_work_dir
from batchrun.model import cache_root
from tests.helpers import write_jsonl
from tests.reliability.harness import (
    TALLY,
    admitted,
    batchrun,
    check_nothing_finished_ran_again,
    check_output,
    journaled_rows,
    kill9,
    start_batchrun,
    wait_for_rows,
    write_rows,
)

SLOW = {"step_delay_s": 0.02, "max_num_seqs": 16}
MODELS = cache_root() / "models"  # the converted default model, outside the tests' cache


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The default work dir of a remote output is under the cache: keep it in this test.
    monkeypatch.setenv("BATCHRUN_CACHE_DIR", str(tmp_path / "cache"))


def put(filesystem: fs.FileSystem, uri: str, local: Path) -> None:
    fs.copy_files(str(local), uri.removeprefix("s3://"), destination_filesystem=filesystem)


def get_table(filesystem: fs.FileSystem, uri: str) -> pa.Table:
    with filesystem.open_input_file(uri.removeprefix("s3://")) as f:
        return pq.read_table(f)


def key_exists(filesystem: fs.FileSystem, uri: str) -> bool:
    return filesystem.get_file_info(uri.removeprefix("s3://")).type != fs.FileType.NotFound


def test_s3_input_and_output_give_the_rows_of_a_local_run(s3, tmp_path: Path) -> None:
    bucket, filesystem = s3
    ids = write_rows(tmp_path / "in.jsonl", 60)
    put(filesystem, f"{bucket}/in.jsonl", tmp_path / "in.jsonl")
    local = batchrun("run", tmp_path / "in.jsonl", "-o", tmp_path / "local.parquet",
                     "--engine", "fake", "--max-tokens", "8")
    remote = batchrun("run", f"{bucket}/in.jsonl", "-o", f"{bucket}/out.parquet",
                      "--engine", "fake", "--max-tokens", "8", "--json")
    assert local.returncode == EXIT_OK and remote.returncode == EXIT_OK, remote.stderr
    assert f"wrote {bucket}/out.parquet" in remote.stderr
    got = get_table(filesystem, f"{bucket}/out.parquet")
    assert got.to_pylist() == pq.read_table(tmp_path / "local.parquet").to_pylist()
    assert got["id"].to_pylist() == ids
    summary = json.loads(remote.stdout)
    assert summary["input"] == f"{bucket}/in.jsonl" and summary["output"] == f"{bucket}/out.parquet"
    # The staged file and the checkpoint are gone from the work dir; its summary stays.
    work = default_work_dir(f"{bucket}/out.parquet")
    # No checkpoint left; the summary, the engine's log, the report and its trace stay in the
    # work dir.
    assert sorted(p.name for p in work.iterdir()) == [
        "out.parquet.log", "out.parquet.report.html", "out.parquet.summary.json",
        "out.parquet.trace.arrow"]
    again = batchrun("run", f"{bucket}/in.jsonl", "-o", f"{bucket}/out.parquet",
                     "--engine", "fake", "--max-tokens", "8")
    assert again.returncode == EXIT_OK and "already exists" in again.stderr


def test_a_job_file_in_s3_resolves_relative_paths_against_its_folder(s3, tmp_path: Path) -> None:
    bucket, filesystem = s3
    ids = write_rows(tmp_path / "in.jsonl", 12)
    put(filesystem, f"{bucket}/data/in.jsonl", tmp_path / "in.jsonl")
    (tmp_path / "job.toml").write_text('input = "../data/in.jsonl"\noutput = "../out/r.parquet"\n'
                                       "[sampling]\nmax_tokens = 4\n")
    put(filesystem, f"{bucket}/jobs/job.toml", tmp_path / "job.toml")
    done = batchrun("run", f"{bucket}/jobs/job.toml", "--engine", "fake",
                    "--work-dir", tmp_path / "work")
    assert done.returncode == EXIT_OK, done.stderr
    assert get_table(filesystem, f"{bucket}/out/r.parquet")["id"].to_pylist() == ids


def test_s3_dataset_glob_and_missing_objects(s3, tmp_path: Path) -> None:
    bucket, filesystem = s3
    for day, n in (("2026-01-02", 3), ("2026-01-01", 2)):
        pq.write_table(pa.table({"prompt": [f"{day} q{i}" for i in range(n)]}),
                       tmp_path / f"{day}.parquet")
        put(filesystem, f"{bucket}/in/day={day}/part-0.parquet", tmp_path / f"{day}.parquet")
    put(filesystem, f"{bucket}/in/_SUCCESS", tmp_path / "2026-01-01.parquet")
    for source in (f"{bucket}/in", f"{bucket}/in/day=*/*.parquet"):
        done = batchrun("run", source, "-o", f"{bucket}/o.parquet", "--engine", "fake",
                        "--passthrough", "source_file", "--overwrite")
        assert done.returncode == EXIT_OK, done.stderr
        table = get_table(filesystem, f"{bucket}/o.parquet")
        assert table["row"].to_pylist() == list(range(5))
        assert table["source_file"].to_pylist() == (
            [f"{bucket}/in/day=2026-01-01/part-0.parquet"] * 2
            + [f"{bucket}/in/day=2026-01-02/part-0.parquet"] * 3)
    missing = batchrun("run", f"{bucket}/nope.jsonl", "-o", f"{bucket}/o2.parquet",
                       "--engine", "fake")
    assert missing.returncode == EXIT_USAGE and "does not exist" in missing.stderr
    no_match = batchrun("run", f"{bucket}/in/*.jsonl", "-o", f"{bucket}/o2.parquet",
                        "--engine", "fake")
    assert no_match.returncode == EXIT_USAGE and "matches no files" in no_match.stderr
    assert "Traceback" not in missing.stderr + no_match.stderr


def test_killed_and_resumed_s3_job_loses_nothing_and_uploads_only_the_whole_output(
        s3, tmp_path: Path) -> None:
    # An S3 PUT is atomic: S3 shows an object only once its upload completes, so polling the
    # key proves nothing about batchrun. What batchrun must do is keep the key empty while
    # the job runs and upload the output only once it is whole: checked at the kills.
    bucket, filesystem = s3
    ids = write_rows(tmp_path / "in.jsonl", 300)
    put(filesystem, f"{bucket}/in.jsonl", tmp_path / "in.jsonl")
    out = f"{bucket}/out.parquet"
    args = ("run", f"{bucket}/in.jsonl", "-o", out, "--engine", "fake", "--max-tokens", "12",
            "--resume", "--log-lines")
    staged = default_work_dir(out) / "out.parquet"  # the checkpoint's base, on local disk
    kills, saved = 0, []
    for at_least in (40, 120):
        log = tmp_path / f"admitted-{at_least}.txt"
        proc = start_batchrun(*args, fake_engine={**SLOW, "admitted_log": str(log)})
        wait_for_rows(staged, proc, at_least)
        seen_while_running = key_exists(filesystem, out)
        assert kill9(proc), "the run finished before the kill"
        kills += 1
        assert not seen_while_running and not key_exists(filesystem, out)
        check_nothing_finished_ran_again(log, saved)  # a resume runs only unfinished rows
        saved = journaled_rows(staged)
        assert len(saved) >= at_least and len(saved) == len(set(saved))
    # Killed as its first upload began: what it was about to upload is the whole output,
    # every row once in input order, and nothing is at the key yet.
    log = tmp_path / "admitted-last.txt"
    proc = start_batchrun(*args, fake_engine={"admitted_log": str(log)},
                          kill_at="batchrun.io.storage:upload")
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    kills += 1
    assert not key_exists(filesystem, out)
    check_output(staged, ids)
    check_nothing_finished_ran_again(log, saved)
    # The same command again uploads it, generating nothing: the key holds the whole output,
    # the staging is gone.
    log = tmp_path / "admitted-upload.txt"
    done = batchrun(*args, fake_engine={"admitted_log": str(log)})
    assert done.returncode == EXIT_OK, done.stderr
    assert admitted(log) == []
    local = tmp_path / "out.parquet"
    local.write_bytes(filesystem.open_input_file(out.removeprefix("s3://")).read())
    check_output(local, ids)
    assert not staged.exists() and not staged.with_name("out.parquet.partial").exists()
    TALLY.kills += kills


def test_kill_between_upload_and_cleanup_then_rerun_is_done(s3, tmp_path: Path) -> None:
    bucket, filesystem = s3
    ids = write_rows(tmp_path / "in.jsonl", 20)
    put(filesystem, f"{bucket}/in.jsonl", tmp_path / "in.jsonl")
    out = f"{bucket}/out.parquet"
    args = ("run", f"{bucket}/in.jsonl", "-o", out, "--engine", "fake", "--resume")
    proc = start_batchrun(*args, kill_at="batchrun.io.storage:upload after")
    proc.communicate(timeout=60)
    TALLY.kills += 1
    assert key_exists(filesystem, out)
    again = batchrun(*args)
    assert again.returncode == EXIT_OK and "already exists" in again.stderr
    work = default_work_dir(out)
    assert not (work / "out.parquet").exists() and not (work / "out.parquet.partial").exists()
    assert get_table(filesystem, out)["id"].to_pylist() == ids


def test_endpoint_comes_from_aws_endpoint_url(s3, monkeypatch: pytest.MonkeyPatch) -> None:
    bucket, filesystem = s3
    with filesystem.open_output_stream(f"{bucket.removeprefix('s3://')}/x.txt") as f:
        f.write(b"hello")
    storage._filesystem.cache_clear()
    assert storage.Location.of(f"{bucket}/x.txt").read_text() == "hello"
    assert os.environ["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")


def put_adapter(filesystem: fs.FileSystem, uri: str, local: Path, config: dict) -> None:
    """An adapter folder at `uri`: its adapter_config.json and (bytes the fake engine never
    reads) adapter_model.safetensors."""
    local.mkdir(parents=True, exist_ok=True)
    (local / "adapter_config.json").write_text(json.dumps(config))
    (local / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        put(filesystem, f"{uri}/{name}", local / name)


def test_adapters_given_as_uris_are_fetched_once_into_the_cache(s3, tmp_path: Path) -> None:
    bucket, filesystem = s3
    for name in ("support", "legal"):
        put_adapter(filesystem, f"{bucket}/adapters/{name}", tmp_path / name, {"r": 8})
    write_jsonl(tmp_path / "in.jsonl", [
        {"id": f"r{i}", "prompt": f"q{i}", **({"adapter": a} if a else {})}
        for i, a in enumerate([None, "support", "legal"] * 4)])
    args = ("run", tmp_path / "in.jsonl", "-o", tmp_path / "out.parquet", "--engine", "fake",
            "--overwrite", "--adapter", f"support={bucket}/adapters/support/",
            "--adapter", f"legal={bucket}/adapters/legal")
    first = batchrun(*args)
    assert first.returncode == EXIT_OK, first.stderr
    assert pq.read_table(tmp_path / "out.parquet")["adapter"].to_pylist() == \
        [None, "support", "legal"] * 4
    cache = tmp_path / "cache" / "adapters"  # BATCHRUN_CACHE_DIR/adapters
    copies = {p.name for p in cache.iterdir()}
    assert len(copies) == 2 and first.stderr.count("fetched (2 files") == 2
    assert all((cache / c / "adapter_config.json").read_text() == '{"r": 8}' for c in copies)
    # A rerun lists the URIs and downloads nothing.
    again = batchrun(*args)
    assert again.returncode == EXIT_OK, again.stderr
    assert "fetched (" not in again.stderr
    assert again.stderr.count("unchanged since fetched: its copy in") == 2
    assert {p.name for p in cache.iterdir()} == copies
    # An adapter changed in storage is fetched again, into a copy of its own.
    put_adapter(filesystem, f"{bucket}/adapters/support", tmp_path / "support",
                {"r": 8, "lora_alpha": 16})
    changed = batchrun(*args)
    assert changed.returncode == EXIT_OK, changed.stderr
    assert f"adapter 'support': {bucket}/adapters/support/ fetched" in changed.stderr
    assert f"adapter 'legal': {bucket}/adapters/legal unchanged" in changed.stderr
    assert len({p.name for p in cache.iterdir()} - copies) == 1


def test_an_adapter_uri_that_holds_no_adapter_is_a_one_line_error(s3, tmp_path: Path) -> None:
    bucket, filesystem = s3
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hi"}])
    put(filesystem, f"{bucket}/weights/adapter_model.safetensors", tmp_path / "in.jsonl")
    for uri, says in ((f"{bucket}/nothing/", "holds no files"),
                      (f"{bucket}/weights", "has no adapter_config.json")):
        failed = batchrun("run", tmp_path / "in.jsonl", "-o", tmp_path / "out.parquet",
                          "--engine", "fake", "--adapter", f"support={uri}")
        assert failed.returncode == EXIT_USAGE
        line = f"adapter 'support': {uri} {says}; name the URI of a PEFT LoRA folder"
        assert line in failed.stderr and "Traceback" not in failed.stderr
        assert len(failed.stderr.strip().splitlines()) == 1, failed.stderr


@pytest.mark.slow  # a real vLLM engine, in a CLI process (never in this one, beside moto)
def test_real_vllm_runs_adapters_fetched_from_s3(s3, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from batchrun.model import default_model_dir
    from tests.lora_adapters import write_random_adapter

    bucket, filesystem = s3
    MODELS.mkdir(parents=True, exist_ok=True)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "models").symlink_to(MODELS)  # not converted again
    flags = []
    for seed, name in enumerate(("support", "legal"), start=1):
        folder = write_random_adapter(tmp_path / name, default_model_dir(), seed=seed)
        for f in folder.iterdir():
            put(filesystem, f"{bucket}/adapters/{name}/{f.name}", f)
        flags += ["--adapter", f"{name}={bucket}/adapters/{name}/"]
    prompt = AutoTokenizer.from_pretrained(default_model_dir()).encode(
        "The capital of France is Paris. The capital of Germany is")
    write_jsonl(tmp_path / "in.jsonl", [
        {"id": name or "base", "prompt_token_ids": prompt, "max_tokens": 8,
         **({"adapter": name} if name else {})} for name in (None, "support", "legal")])
    run = batchrun("run", tmp_path / "in.jsonl", "-o", tmp_path / "out.parquet",
                   "--kv-cache-memory", "256MiB", "--enforce-eager", *flags, timeout=900)
    assert run.returncode == EXIT_OK, run.stderr[-3000:]
    texts = pq.read_table(tmp_path / "out.parquet")["text"].to_pylist()
    assert len(set(texts)) == 3  # the base model and each fetched adapter: three models


def test_a_replica_on_another_node_fetches_the_adapters_itself(s3, tmp_path: Path,
                                                               monkeypatch) -> None:
    """The driver's copies of adapters given as URIs are in its own cache; a Ray replica on
    another node (here: another cache folder) fetches its own before its engine starts."""
    from dataclasses import replace

    from batchrun.cluster import actor
    from batchrun.cluster.actor import ReplicaJob
    from batchrun.config import JobConfig
    from batchrun.engine.lora import LoraSettings
    from batchrun.engine.sizing import EngineSizing

    bucket, filesystem = s3
    put_adapter(filesystem, f"{bucket}/adapters/support", tmp_path / "support", {"r": 8})
    config = JobConfig(input=tmp_path / "in.jsonl", output=tmp_path / "out.parquet",
                       adapters={"support": f"{bucket}/adapters/support"})
    driver_copy = (("support", "/driver/cache/adapters/abc"),)
    sizing = EngineSizing(4, 2048, "", None, "", 0, 0,
                          lora=LoraSettings(driver_copy, 1, "", 8))
    node_cache = tmp_path / "other-node-cache"
    monkeypatch.setenv("BATCHRUN_CACHE_DIR", str(node_cache))
    started = []
    monkeypatch.setattr(actor, "start_engine", lambda kind, cfg, sizing, **_: started.append(
        sizing))
    actor._start_engine(ReplicaJob(config, "fake", sizing, 0, "jsonl", 2048))
    (name, folder), = started[0].lora.folders
    assert name == "support" and Path(folder).parent == node_cache / "adapters"
    assert json.loads((Path(folder) / "adapter_config.json").read_text()) == {"r": 8}
    assert replace(started[0], lora=None) == replace(sizing, lora=None)
