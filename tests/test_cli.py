"""The command line's own contract: a bug is one line and exit code 1, in every command."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchrun.errors import EXIT_INTERNAL
from tests.helpers import write_jsonl
from tests.reliability.harness import cli


def broken(*_: object, **__: object) -> None:
    raise RuntimeError("a bug")


@pytest.mark.parametrize("command, where", [
    ("run", "batchrun.runner.run_job"),
    ("plan", "batchrun.runner.describe_plan"),
    ("validate", "batchrun.prepare.load_tokenizer"),
])
def test_a_bug_is_one_line_and_exit_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      command: str, where: str) -> None:
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hi"}])
    monkeypatch.setattr(where, broken)
    result = cli(command, tmp_path / "in.jsonl", "-o", tmp_path / "out.parquet",
                 "--engine", "fake")
    assert result.exit_code == EXIT_INTERNAL
    assert result.stderr.strip() == ("batchrun: error: internal error: RuntimeError: a bug "
                                     "(re-run with -v for details; please report it)")
