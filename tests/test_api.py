"""batchrun.run and batchrun.generate: the CLI's jobs from Python, exits as return values and
exceptions (never sys.exit), on the fake engine (no model)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import batchrun
from batchrun.config import JobConfig
from batchrun.engine.fake import FakeEngine
from batchrun.errors import ConfigError, InputError
from batchrun.io.schema import output_result_schema
from tests.helpers import write_jsonl
from tests.reliability.harness import batchrun as batchrun_cli
from tests.reliability.harness import write_rows

REPO = Path(__file__).resolve().parents[1]


def test_importing_batchrun_loads_no_engine_and_no_arrow() -> None:
    code = ("import sys, batchrun; heavy = [m for m in sys.modules if m.split('.')[0] in "
            "('vllm', 'torch', 'pyarrow', 'polars', 'numpy')]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_run_returns_a_summary_and_matches_the_cli(tmp_path: Path) -> None:
    ids = write_rows(tmp_path / "in.jsonl", 30)
    summary = batchrun.run(tmp_path / "in.jsonl", output=tmp_path / "api.parquet",
                           engine="fake", max_tokens=6, passthrough="id")
    assert isinstance(summary, batchrun.Summary)
    assert (summary.exit_code, summary.status, summary.rows, summary.succeeded) == \
        (0, "ok", 30, 30)
    assert summary.ok and summary["tokens"]["completion"] > 0
    assert summary.output == str(tmp_path / "api.parquet")
    cli = batchrun_cli("run", tmp_path / "in.jsonl", "-o", tmp_path / "cli.parquet",
                       "--engine", "fake", "--max-tokens", "6")
    assert cli.returncode == 0, cli.stderr
    api_rows = pq.read_table(tmp_path / "api.parquet").drop_columns(["id"])
    assert api_rows.to_pylist() == pq.read_table(tmp_path / "cli.parquet").drop_columns(
        ["id"]).to_pylist()
    assert pq.read_table(tmp_path / "api.parquet")["id"].to_pylist() == ids
    again = batchrun.run(tmp_path / "in.jsonl", output=tmp_path / "api.parquet", engine="fake")
    assert again.status == "already_done" and again.exit_code == 0


def test_run_raises_usage_errors_and_interruptions_with_their_exit_codes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="does not exist") as missing:
        batchrun.run(tmp_path / "nope.jsonl", output=tmp_path / "o.parquet")
    assert isinstance(missing.value, batchrun.UsageError) and missing.value.exit_code == 2
    (tmp_path / "bad.jsonl").write_bytes(b"")
    with pytest.raises(InputError, match="is empty") as empty:
        batchrun.run(tmp_path / "bad.jsonl", output=tmp_path / "o.parquet", engine="fake")
    assert empty.value.exit_code == 2
    with pytest.raises(ConfigError, match="unknown option 'max_tokenz'"):
        batchrun.run(tmp_path / "bad.jsonl", output=tmp_path / "o.parquet", max_tokenz=3)

    ids = write_rows(tmp_path / "in.jsonl", 40)
    out = tmp_path / "out.parquet"
    monkeypatch.setenv("BATCHRUN_FAKE_ENGINE", '{"die_after_steps": 3}')
    with pytest.raises(batchrun.JobInterrupted, match="re-run with --resume") as stopped:
        batchrun.run(tmp_path / "in.jsonl", output=out, engine="fake", max_tokens=8)
    assert stopped.value.exit_code == 4 and stopped.value.summary.status == "engine_failed"
    assert not out.exists()
    monkeypatch.delenv("BATCHRUN_FAKE_ENGINE")
    done = batchrun.run(tmp_path / "in.jsonl", output=out, engine="fake", max_tokens=8,
                        resume=True)
    assert done.exit_code == 0 and pq.read_table(out)["id"].to_pylist() == ids


def test_rows_that_fail_are_exit_code_3_not_an_exception(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "fine"}, {"prompt": 3}])
    summary = batchrun.run(tmp_path / "in.jsonl", output=tmp_path / "o.parquet", engine="fake")
    assert (summary.exit_code, summary.failed, summary.ok) == (3, 1, False)


def test_a_job_file_and_a_config_object(tmp_path: Path) -> None:
    write_rows(tmp_path / "in.jsonl", 5)
    (tmp_path / "job.toml").write_text('input = "in.jsonl"\noutput = "o.parquet"\n')
    assert batchrun.run(str(tmp_path / "job.toml"), engine="fake", max_tokens=2).rows == 5
    cfg = batchrun.build_config(tmp_path / "job.toml", output=tmp_path / "o2.parquet",
                                temperature=0.5, kv_cache_memory="1MiB",
                                **{"engine.max_num_seqs": 4})
    assert isinstance(cfg, JobConfig) and cfg.output.local_path == tmp_path / "o2.parquet"
    assert (cfg.sampling.temperature, cfg.engine.kv_cache_memory, cfg.engine.max_num_seqs) == \
        (0.5, 1 << 20, 4)
    assert batchrun.run(cfg, engine=FakeEngine()).rows == 5


@pytest.mark.parametrize("kind", ["polars", "pandas", "arrow"])
def test_generate_gives_the_parquet_columns_one_row_per_input_row_in_order(
        kind: str, tmp_path: Path) -> None:
    prompts = [f"Question {i % 3}: " + "shared words " * 5 + str(i) for i in range(9)]
    table = pa.table({"question": prompts, "max_tokens": [2, None, 5] * 3})
    if kind == "polars":
        import polars as pl

        frame = pl.from_arrow(table)
    elif kind == "pandas":
        pd = pytest.importorskip("pandas")
        frame = pd.DataFrame(table.to_pydict())
    else:
        frame = table
    got = batchrun.generate(frame, prompt="question", engine="fake", max_tokens=7)
    import polars as pl

    assert isinstance(got, pl.DataFrame)
    assert got.columns == output_result_schema(embeds=False).names
    assert got["row"].to_list() == list(range(9))
    assert all(n <= cap for n, cap in zip(got["completion_tokens"], [2, 7, 5] * 3, strict=True))
    # The same rows through the CLI: the same texts.
    write_jsonl(tmp_path / "in.jsonl", [{"question": p, "max_tokens": m} for p, m in
                                        zip(prompts, [2, None, 5] * 3, strict=True)])
    cli = batchrun_cli("run", tmp_path / "in.jsonl", "-o", tmp_path / "cli.parquet",
                       "--engine", "fake", "--max-tokens", "7", "--prompt-column", "question")
    assert cli.returncode == 0, cli.stderr
    assert got["text"].to_list() == pq.read_table(tmp_path / "cli.parquet")["text"].to_pylist()


def test_generate_rejects_what_it_cannot_take() -> None:
    with pytest.raises(batchrun.UsageError, match="polars, pandas or Arrow"):
        batchrun.generate([{"prompt": "x"}], engine="fake")
    import polars as pl

    with pytest.raises(batchrun.UsageError, match="use batchrun.run"):
        batchrun.generate(pl.DataFrame({"prompt": ["x"]}), engine="fake", output="o.parquet")
    bad = batchrun.generate(pl.DataFrame({"prompt": ["x", ""]}), engine="fake")
    assert bad["error"].to_list()[0] is None and "non-empty" in bad["error"].to_list()[1]


def test_work_dir_holds_the_checkpoint_of_a_local_output(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = write_rows(tmp_path / "in.jsonl", 40)
    out, work = tmp_path / "out" / "o.parquet", tmp_path / "work"
    monkeypatch.setenv("BATCHRUN_FAKE_ENGINE", '{"die_after_steps": 3}')
    with pytest.raises(batchrun.JobInterrupted):
        batchrun.run(tmp_path / "in.jsonl", output=out, work_dir=work, engine="fake",
                     max_tokens=8)
    assert (work / "o.parquet.partial").is_dir() and not out.with_name("o.parquet.partial")\
        .exists()
    monkeypatch.delenv("BATCHRUN_FAKE_ENGINE")
    done = batchrun.run(tmp_path / "in.jsonl", output=out, work_dir=work, engine="fake",
                        max_tokens=8, resume=True)
    assert done.ok and pq.read_table(out)["id"].to_pylist() == ids
    assert not (work / "o.parquet.partial").exists()
