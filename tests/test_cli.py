"""The command line's own contract: a bug is one line and exit code 1, in every command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batchrun.errors import EXIT_INTERNAL, EXIT_USAGE
from tests.helpers import write_jsonl
from tests.reliability.harness import admitted, cli


def broken(*_: object, **__: object) -> None:
    raise RuntimeError("a bug")


@pytest.mark.parametrize("command, where", [
    ("run", "batchrun.job.run.run_job"),
    ("plan", "batchrun.job.commands.describe_plan"),
    ("validate", "batchrun.job.commands.load_tokenizer"),
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


def test_the_summary_says_when_a_prefix_found_brief_ran_after_the_rest(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The fake engine answers in 1-24 tokens: under a max_tokens of 200, brief. Two shared
    # heads, more rows each than fit the fake engine's cache at once (64 blocks of 4 tokens,
    # each row's own tokens 3 blocks).
    log = tmp_path / "admitted.txt"
    monkeypatch.setenv("BATCHRUN_FAKE_ENGINE", json.dumps({"kv_capacity_tokens": 256,
                                                           "admitted_log": str(log)}))
    heads = [list(range(100, 112)), list(range(200, 212))]  # 3 blocks of 4 tokens each
    write_jsonl(tmp_path / "in.jsonl", [
        {"prompt_token_ids": heads[i % 2] + [1000 * k + i for k in range(1, 13)]}
        for i in range(120)])
    result = cli("run", tmp_path / "in.jsonl", "-o", tmp_path / "out.parquet", "--engine",
                 "fake", "--max-tokens", "200")
    assert result.exit_code == 0, result.stderr
    assert "rows: 120  succeeded: 120  failed: 0" in result.stderr
    assert "order: 1 shared prefix(es) found to answer briefly; the rest of their rows ran " \
        "after work that may decode longer" in result.stderr
    # What the engine was given, in order, by head (rows have no id: the id is the row
    # number, and row i is under head i % 2). The head the plan started first was found brief
    # and the rest of its rows ran after the other head's: the job ends with a stretch of
    # its rows, all after the last row of the other head.
    order = [int(rid) % 2 for rid in admitted(log)]
    assert sorted(order) == sorted(i % 2 for i in range(120))
    brief = order[0]
    last_other = max(k for k, head in enumerate(order) if head != brief)
    tail = order[last_other + 1:]
    assert tail and set(tail) == {brief}


@pytest.mark.parametrize("replicas", [(), ("--replicas", "2")], ids=["one-engine", "replicas"])
def test_attention_the_platform_lacks_is_a_usage_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, replicas: tuple[str, ...]) -> None:
    """--attention prefix where batchrun has no shared-prefix attention: exit 2 and one line
    naming the setting and the fix, before any engine (or Ray) starts, on one engine and on
    replicas alike."""
    from batchrun.engine import vllm_engine

    monkeypatch.setattr(vllm_engine, "platform_name", lambda: "rocm")
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hi"}])
    result = cli("run", tmp_path / "in.jsonl", "-o", tmp_path / "out.parquet",
                 "--attention", "prefix", *replicas)
    assert (result.exit_code, result.stderr) == (EXIT_USAGE, (
        "batchrun: error: --attention prefix: no shared-prefix attention for rocm; use auto "
        "or default\n"))
    assert not (tmp_path / "out.parquet.partial").exists()
