"""Hostile inputs through the CLI, as a user or a broken upstream job would feed them: each is
either error rows (exit 3) or one clear job-level message (exit 2); never a traceback, never a
hang, never exit 1. `validate` gives the same verdict without running anything.

`batchrun run` runs as cron runs it, a process of its own; `validate` runs in-process (typer's
CliRunner: same command, no second interpreter start per case)."""

from __future__ import annotations

import gzip
import json
import random
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import Result

from batchrun.errors import EXIT_ROW_ERRORS, EXIT_USAGE
from batchrun.io.output.checkpoint import partial_dir_for
from tests.reliability.harness import batchrun, cli

GOOD = json.dumps({"prompt": "a fine row"})


def lines(*rows: object) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n"
                    for r in rows)


def parquet(table: pa.Table, cut: bool = False) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        pq.write_table(table, path)
        if cut:
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])
    return write


def toml(body: str) -> str:
    return 'input = "rows.jsonl"\noutput = "toml-out.parquet"\n' + body


@dataclass(frozen=True)
class Case:
    name: str
    content: bytes | str | Callable[[Path], None] | None  # None: the path does not exist
    exit_code: int
    rows: int | None = None  # output rows expected with exit 3
    says: str = ""  # with exit 2: words the one-line message must hold


CASES = [
    Case("empty.jsonl", b"", EXIT_USAGE, says="is empty"),
    Case("random.bin", random.Random(7).randbytes(20_000), EXIT_USAGE, says="JSON object"),
    Case("invalid-utf8.jsonl", b'{"prompt": "caf\xe9"}\n' + GOOD.encode() + b"\n",
         EXIT_ROW_ERRORS, rows=2),
    Case("truncated.jsonl", GOOD.encode() + b'\n{"prompt": "cut sh', EXIT_ROW_ERRORS, rows=2),
    Case("array.json", json.dumps([{"prompt": "a"}, {"prompt": "b"}]).encode(), EXIT_USAGE,
         says="JSON array"),
    Case("huge-line.jsonl", lines({"prompt": "x" * (9 << 20)}, {"prompt": "ok"}),
         EXIT_ROW_ERRORS, rows=2),
    Case("wrong-types.jsonl", lines({"prompt": 5}, {"prompt": ["a"]}, {"prompt": "ok",
         "max_tokens": "ten"}, {"prompt": "ok", "temperature": -1}, {"prompt": "ok", "stop": 5},
         {"id": {"a": 1}, "prompt": "x"}, 5, "text", [], {"prompt": "ok"}),
         EXIT_ROW_ERRORS, rows=10),
    Case("nulls.jsonl", lines(None, {"prompt": None}, {"id": None, "prompt": "ok"}),
         EXIT_ROW_ERRORS, rows=3),
    Case("duplicate-ids.jsonl", lines(*({"id": "same", "prompt": f"p{i}"} for i in range(3))),
         EXIT_ROW_ERRORS, rows=3),
    Case("openai-bad-body.jsonl", lines({"custom_id": "a", "method": "GET", "url": "/v1/x",
                                         "body": {"messages": "hi"}}), EXIT_ROW_ERRORS, rows=1),
    Case("compressed.jsonl", gzip.compress(lines({"prompt": "a"})), EXIT_USAGE,
         says="decompress"),
    Case("no-prompt.parquet", parquet(pa.table({"text": ["a", "b"]})), EXIT_USAGE,
         says="none of the columns"),
    Case("cut.parquet", parquet(pa.table({"prompt": ["a"] * 1000}), cut=True), EXIT_USAGE,
         says="cut short or corrupt"),
    Case("a-folder", lambda path: path.mkdir(), EXIT_USAGE, says="is a directory"),
    Case("missing.jsonl", None, EXIT_USAGE, says="does not exist"),
    Case("not-toml.toml", "input = [unclosed\n", EXIT_USAGE, says="not valid TOML"),
    Case("unknown-key.toml", toml("colour = 1\n"), EXIT_USAGE, says="unknown key"),
    Case("missing-input.toml", 'input = "nope.jsonl"\noutput = "o.parquet"\n', EXIT_USAGE,
         says="no such file"),
    Case("folder-input.toml", 'input = "."\noutput = "o.parquet"\n', EXIT_USAGE,
         says="is a directory"),
]
# Values of the wrong type in a job file (they were TypeErrors: exit 1, a traceback).
TYPE_CASES = [
    Case("string-max-tokens.toml", toml('[sampling]\nmax_tokens = "ten"\n'), EXIT_USAGE,
         says="`max_tokens` must be int"),
    Case("table-is-a-number.toml", toml("sampling = 3\n"), EXIT_USAGE,
         says="must be a table of keys"),
]


@dataclass(frozen=True)
class Verdicts:
    run: subprocess.CompletedProcess[str]
    validate: Result
    output: Path


@pytest.fixture(scope="module")
def verdicts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Verdicts]:
    """Every case through `batchrun run` (four processes at a time) and `batchrun validate`."""
    folder = tmp_path_factory.mktemp("hostile")
    (folder / "rows.jsonl").write_text(GOOD + "\n")

    def write(case: Case) -> Path:
        path = folder / case.name
        if callable(case.content):
            case.content(path)
        elif isinstance(case.content, bytes):
            path.write_bytes(case.content)
        elif isinstance(case.content, str):
            path.write_text(case.content)
        return path

    cases = CASES + TYPE_CASES
    paths = [write(case) for case in cases]
    outputs = [folder / f"{case.name}.out.parquet" for case in cases]
    with ThreadPoolExecutor(4) as pool:
        runs = list(pool.map(lambda p, o: batchrun("run", p, "-o", o, "--engine", "fake",
                                                   timeout=120), paths, outputs))
    return {case.name: Verdicts(run, cli("validate", path, "--engine", "fake"), output)
            for case, path, run, output in zip(cases, paths, runs, outputs, strict=True)}


def check(case: Case, v: Verdicts) -> None:
    assert "Traceback" not in v.run.stderr, v.run.stderr
    assert v.run.returncode == case.exit_code, v.run.stderr
    assert v.validate.exit_code == case.exit_code, v.validate.stderr
    if case.exit_code == EXIT_USAGE:
        message = v.run.stderr.strip()
        assert message.startswith("batchrun: error: ") and "\n" not in message
        assert case.says in message
        assert v.validate.stderr.strip() == message
        assert not v.output.exists() and not partial_dir_for(v.output).exists()
    else:
        table = pq.read_table(v.output)
        assert table["row"].to_pylist() == list(range(case.rows))  # one row per input row
        assert all((r["text"] is None) != (r["error"] is None) for r in table.to_pylist())


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input(case: Case, verdicts: dict[str, Verdicts]) -> None:
    check(case, verdicts[case.name])


@pytest.mark.parametrize("case", TYPE_CASES, ids=[c.name for c in TYPE_CASES])
def test_job_file_value_of_the_wrong_type(case: Case, verdicts: dict[str, Verdicts]) -> None:
    check(case, verdicts[case.name])
