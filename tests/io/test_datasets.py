"""An input that is a folder or a glob of Parquet/JSONL files: one job, rows numbered across
the files in sorted path order, one output in the files' combined row order."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchrun.config import ColumnMap, JobConfig
from batchrun.engine.fake import FakeEngine
from batchrun.errors import EXIT_OK, InputError
from batchrun.io.datasets import input_fingerprint
from batchrun.io.input.readers import read_request_set
from batchrun.io.storage import Location
from batchrun.job.run import run_job
from tests.helpers import write_jsonl


def three_parquet_files(folder: Path) -> list[str]:
    folder.mkdir(exist_ok=True)
    prompts = []
    # Written out of order on purpose: the order is the sorted paths', not the writes'.
    for name, n in (("part-2.parquet", 4), ("part-0.parquet", 3), ("part-1.parquet", 5)):
        rows = [f"{name} prompt {i}" for i in range(n)]
        pq.write_table(pa.table({"prompt": rows, "topic": [name] * n}), folder / name)
    for name in ("part-0.parquet", "part-1.parquet", "part-2.parquet"):
        prompts += pq.read_table(folder / name)["prompt"].to_pylist()
    (folder / "_SUCCESS").write_text("")  # Spark's marker, and hidden files: not data
    (folder / ".part-0.parquet.crc").write_bytes(b"\x00")
    (folder / "README.txt").write_text("not data")
    return prompts


def run_fake(cfg: JobConfig) -> int:
    return run_job(cfg, engine_kind="fake", engine=FakeEngine(), interactive=False,
                   handle_signals=False).exit_code


def test_a_folder_of_three_parquet_files_gives_one_output_in_combined_order(
        tmp_path: Path) -> None:
    prompts = three_parquet_files(tmp_path / "data")
    cfg = JobConfig(input=tmp_path / "data", output=tmp_path / "out.parquet",
                    columns=ColumnMap(passthrough=("topic", "source_file")))
    assert run_fake(cfg) == EXIT_OK
    out = pq.read_table(cfg.output)
    assert out["row"].to_pylist() == list(range(12))
    assert out["id"].to_pylist() == [str(i) for i in range(12)]
    assert out["topic"].to_pylist() == ["part-0.parquet"] * 3 + ["part-1.parquet"] * 5 + \
        ["part-2.parquet"] * 4
    assert out["source_file"].to_pylist() == [str(tmp_path / "data" / t)
                                              for t in out["topic"].to_pylist()]
    assert out.column_names[-2:] == ["topic", "source_file"]
    # The same rows as one file give the same texts (the fake engine's text is a function of
    # the prompt), so nothing was reordered or mixed up.
    write_jsonl(tmp_path / "all.jsonl", [{"prompt": p} for p in prompts])
    single = JobConfig(input=tmp_path / "all.jsonl", output=tmp_path / "single.parquet")
    assert run_fake(single) == EXIT_OK
    assert pq.read_table(single.output)["text"].to_pylist() == out["text"].to_pylist()


def test_a_glob_mixing_jsonl_and_parquet_numbers_rows_across_files(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", [{"id": "x", "prompt": "one"}, "not json",
                                       {"prompt": "three", "n": 1}])
    pq.write_table(pa.table({"prompt": ["four", "five"], "n": ["a", "b"]}), tmp_path / "b.parquet")
    write_jsonl(tmp_path / "c.jsonl", [{"id": "x", "prompt": "dup"}])
    (tmp_path / "skip.txt").write_text("{}")
    got = read_request_set(str(tmp_path / "[ab]*.*"), ColumnMap(passthrough=("n",)))
    assert got.input_format == "jsonl+parquet"
    assert got.table["row"].to_pylist() == [0, 1, 2, 3, 4]
    assert got.table["id"].to_pylist() == ["x", "1", "2", "3", "4"]
    assert got.table["error"][1].as_py().startswith("row 1: not valid JSON")
    assert got.passthrough["n"].to_pylist() == [None, None, "1", "a", "b"]  # types differ: text
    # Ids are unique across the whole dataset, as in one file.
    everything = read_request_set(str(tmp_path / "*.*json*"))
    assert everything.table["row"].to_pylist() == [0, 1, 2, 3]
    assert everything.table["error"][3].as_py().startswith("row 3: duplicate id \"x\"")


def test_dataset_problems_name_the_folder_and_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    with pytest.raises(InputError, match="is a directory; point the input at one file"):
        read_request_set(folder)
    (folder / "sub").mkdir()
    write_jsonl(folder / "sub" / "a.jsonl", [{"prompt": "a"}])
    (folder / "b.jsonl").write_bytes(b"")  # an empty part file holds no rows
    assert read_request_set(folder).table.num_rows == 1
    (folder / "c.json").write_text(json.dumps([{"prompt": "x"}]))
    with pytest.raises(InputError, match=r"data: is a directory, read as a dataset; .*c.json: "
                                         "this is a JSON array"):
        read_request_set(folder)
    with pytest.raises(InputError, match="matches no files"):
        read_request_set(str(tmp_path / "*.parquet"))


def test_the_fingerprint_of_a_dataset_changes_with_any_file(tmp_path: Path) -> None:
    three_parquet_files(tmp_path / "data")
    before = input_fingerprint(Location.of(tmp_path / "data"))
    assert [Path(f["path"]).name for f in before["files"]] == [
        "part-0.parquet", "part-1.parquet", "part-2.parquet"]
    pq.write_table(pa.table({"prompt": ["new"]}), tmp_path / "data" / "part-3.parquet")
    assert input_fingerprint(Location.of(tmp_path / "data")) != before
