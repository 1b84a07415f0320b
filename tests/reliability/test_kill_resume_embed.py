"""kill -9 in the middle of an embedding job (`--task embed`), then `--resume`: every row's
vector exactly once in the output, and no row finished before the kill embedded again. Runs
are real CLI processes, as cron starts them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from batchrun.engine.fake import FAKE_EMBEDDING_DIM, fake_embedding
from batchrun.errors import EXIT_OK
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


def test_a_killed_embedding_job_resumes_with_every_row_exactly_once(tmp_path: Path) -> None:
    ids = write_rows(tmp_path / "in.jsonl", 120)
    out = tmp_path / "out.parquet"
    args = ("run", tmp_path / "in.jsonl", "-o", out, "--engine", "fake", "--task", "embed",
            "--resume")
    hold = tmp_path / "hold"  # once rows are journaled, the run stays in flight until killed
    hold.touch()
    first = start_batchrun(*args, fake_engine={
        "max_num_seqs": 8, "step_delay_s": 0.02, "hold_while_exists": str(hold),
        "admitted_log": str(tmp_path / "admitted-0.txt")})
    wait_for_rows(out, first, at_least=1)
    assert kill9(first), "the run ended before the kill"
    TALLY.kills += 1
    journaled = journaled_rows(out)
    assert 0 < len(journaled) < len(ids) and len(journaled) == len(set(journaled))
    assert len(admitted(tmp_path / "admitted-0.txt")) < len(ids)  # killed mid-job

    log = tmp_path / "admitted-1.txt"
    done = batchrun(*args, fake_engine={"admitted_log": str(log)})
    assert done.returncode == EXIT_OK, done.stderr
    table = check_output(out, ids)
    check_nothing_finished_ran_again(log, journaled)
    # The resume embedded exactly the rows the killed run had not journaled.
    assert sorted(admitted(log)) == sorted(set(ids) - {ids[r] for r in journaled})
    # Each row's vector is its own text's, whichever run embedded it.
    prompts = [json.loads(line)["prompt"]
               for line in (tmp_path / "in.jsonl").read_text().splitlines()]
    for row in table.to_pylist():
        want = fake_embedding(np.frombuffer(prompts[row["row"]].encode(), np.uint8)
                              .astype(np.int32), FAKE_EMBEDDING_DIM)
        np.testing.assert_allclose(row["embedding"], want, rtol=1e-6)
