"""batchrun's own memory on a job several times its --memory-budget: the README's promise
("stays within --memory-budget at any job size"), measured as the peak RSS of a real CLI
process on the fake engine (its memory is not batchrun's, and it keeps it tiny here).

The job: 192,000 pre-tokenized rows of 500 tokens in Parquet, 366 MiB of token ids, 5.7x a
64 MiB budget. Rows repeat 500 distinct prompts, so the fake engine runs 500 requests and
batchrun's own stages (read, shard, plan, dedupe, journal, write) do the rest: ~10 s on an
idle 2-core machine, both runs and writing the job included. What batchrun holds is the
run's peak RSS less that of the same command on a 100-row job (the interpreter, pyarrow,
numpy, polars: the same in both), measured by the kernel for the whole process (wait4's
ru_maxrss), the final write included. With --no-early-start: every run sorted and spilled
through the global plan (early start, which runs its first rows while the rest is read, is
measured at scale by benchmarks/bench_scale.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchrun.errors import EXIT_OK
from tests.reliability.harness import REPO, cli_env

BUDGET = 64 << 20
ROWS, TOKENS, DISTINCT = 192_000, 500, 500


def write_job(path: Path, rows: int) -> int:
    """`rows` rows of TOKENS token ids, cycling through DISTINCT prompts that share their
    first half; row groups of 8,192 rows. Returns the bytes of the token ids."""
    rng = np.random.default_rng(0)
    prompts = rng.integers(1, 30_000, (DISTINCT, TOKENS), dtype=np.int32)
    prompts[:, :TOKENS // 2] = prompts[0, :TOKENS // 2]
    values = prompts[np.arange(rows) % DISTINCT].ravel()
    offsets = np.arange(0, values.size + 1, TOKENS, dtype=np.int32)
    tokens = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
    pq.write_table(pa.table({"prompt_token_ids": tokens}), path, row_group_size=8192)
    return values.nbytes


@dataclass
class Run:
    returncode: int
    peak_rss: int  # bytes
    summary: dict


# Runs a command and writes its peak RSS (KiB) to a file. Linux keeps a process's ru_maxrss
# across exec, so a child forked from this test process (hundreds of MiB after writing the
# job) would report at least that: the command is started from this small process instead.
PEAK_OF = """
import os, sys
pid = os.posix_spawn(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{os.waitstatus_to_exitcode(status)} {usage.ru_maxrss}")
"""


def run_measured(tmp_path: Path, name: str, job: Path) -> Run:
    """`batchrun run JOB` on the fake engine, its peak RSS as the kernel counted it."""
    out, peak = tmp_path / name / "out.parquet", tmp_path / f"{name}.peak"
    with open(tmp_path / f"{name}.out", "w") as stdout, \
            open(tmp_path / f"{name}.err", "w") as stderr:
        subprocess.run(
            [sys.executable, "-c", PEAK_OF, str(peak), sys.executable, "-m", "batchrun", "run",
             str(job), "-o", str(out), "--engine", "fake", "--max-tokens", "1",
             "--memory-budget", str(BUDGET), "--no-early-start", "--json"],
            cwd=REPO, env=cli_env({"max_num_seqs": 256}), stdout=stdout, stderr=stderr,
            check=True, timeout=600)
    returncode, max_rss_kib = map(int, peak.read_text().split())
    assert returncode == EXIT_OK, (tmp_path / f"{name}.err").read_text()[-2000:]
    summary = json.loads((tmp_path / f"{name}.out").read_text())
    return Run(returncode, max_rss_kib * 1024, summary)


@dataclass
class Measured:
    token_bytes: int  # of the whole job's token ids
    held: int  # the big run's peak RSS less the small run's
    big: Run


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> Measured:
    tmp_path = tmp_path_factory.mktemp("memory")
    write_job(tmp_path / "small.parquet", 100)
    token_bytes = write_job(tmp_path / "big.parquet", ROWS)
    small = run_measured(tmp_path, "small", tmp_path / "small.parquet")
    big = run_measured(tmp_path, "big", tmp_path / "big.parquet")
    assert big.summary["rows"] == big.summary["succeeded"] == ROWS
    assert big.summary["duplicate_rows"] == ROWS - DISTINCT
    return Measured(token_bytes, big.peak_rss - small.peak_rss, big)


def test_a_job_several_times_its_budget_is_never_held_whole(measured: Measured) -> None:
    assert measured.token_bytes >= 3 * BUDGET
    # At its peak batchrun held less than the job's token ids alone: the job was never in
    # memory whole. Measured: ~175 MiB held for 366 MiB of tokens; with the budget ignored
    # (the whole job in memory, one shard) 985 MiB.
    assert measured.held < measured.token_bytes, \
        f"held {measured.held >> 20} MiB at the peak, the job's tokens are " \
        f"{measured.token_bytes >> 20} MiB"
    # It was cut into prefix shards (at most 1/16 of the budget each) and spilled whole:
    # each 8,192-row batch read is over a run's 1/16 of the budget, so every one is spilled.
    # (Its spilled bytes are no measure of that: spill.py stores runs compressed.)
    shards = measured.big.summary["shards"]
    assert shards["count"] >= 16 and shards["spilled_rows"] == ROWS


@pytest.mark.xfail(strict=True, reason=(
    "not so today: batchrun's peak on this job is ~160-180 MiB above a 100-row run's at "
    "budgets of 16, 32 and 64 MiB alike (measured). It comes while reading and sharding: "
    "input is read in batches of a fixed number of rows (65,536 JSONL rows, 8,192 Parquet "
    "rows), and each batch is sorted into a run, whatever the budget. The README's promise "
    "holds only for budgets above that (the default 4 GiB)."))
def test_batchrun_holds_no_more_than_its_memory_budget(measured: Measured) -> None:
    assert measured.held <= BUDGET, \
        f"held {measured.held >> 20} MiB at the peak, budget {BUDGET >> 20} MiB"
