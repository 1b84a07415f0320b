"""How fast `--engine sim` runs short requests, through the CLI, and where its time goes.

Writes N pre-tokenized rows (96 tokens: one of 50 shared 64-token prefixes and 32 tokens of
their own) to a Parquet file and runs

    batchrun run IN -o OUT --engine sim --max-tokens 8 --json

timing the whole command. Prints rows/s of the whole command and of its run stage, the
summary's seconds per stage, and (--breakdown, in this process, through the Python API with
timers around vLLM's entry points) the share of the run stage spent in vLLM's scheduler.
Issue 25's target: >= 5,000 rows/s of such requests.

    python benchmarks/bench_sim_speed.py --rows 20000 --breakdown
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]


def write_rows(path: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    prefixes = rng.integers(3, 40_000, (50, 64))
    tokens = np.concatenate([prefixes[np.arange(n) % 50], rng.integers(3, 40_000, (n, 32))],
                            axis=1).astype(np.int32)
    offsets = pa.array(np.arange(0, (n + 1) * 96, 96, dtype=np.int32))
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(n)],
                             "prompt_token_ids": pa.ListArray.from_arrays(
                                 offsets, pa.array(tokens.ravel()))}), path)


def cli_run(source: Path, out: Path) -> tuple[float, dict]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "VLLM_LOGGING_LEVEL": "WARNING"}
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "batchrun", "run", str(source), "-o", str(out),
                           "--engine", "sim", "--max-tokens", "8", "--overwrite", "--json"],
                          capture_output=True, text=True, env=env, check=True)
    return time.perf_counter() - t, json.loads(done.stdout)


def breakdown(source: Path, out: Path) -> dict[str, float]:
    """Seconds in vLLM's scheduler entry points during one in-process run, and the run stage."""
    sys.path.insert(0, str(REPO))
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.request import Request

    from batchrun.api import build_config
    from batchrun.job.run import run_job

    spent: collections.Counter[str] = collections.Counter()

    def timed(cls: type, name: str, key: str) -> None:
        inner = getattr(cls, name)

        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                spent[key] += time.perf_counter() - t

        setattr(cls, name, wrapper)

    timed(Scheduler, "schedule", "vllm schedule()")
    timed(Scheduler, "update_from_output", "vllm update_from_output()")
    timed(Request, "__init__", "vllm Request() and its block hashes")
    cfg = build_config(source, out, max_tokens=8)
    summary = run_job(cfg, engine_kind="sim", interactive=False, handle_signals=False,
                      overwrite=True).summary
    return {"run stage": summary["stages"]["run"]["seconds"], **spent}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--breakdown", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-sim-") as tmp:
        source, out = Path(tmp) / "in.parquet", Path(tmp) / "out.parquet"
        write_rows(source, args.rows)
        wall, summary = cli_run(source, out)
        stages = {k: v["seconds"] for k, v in summary["stages"].items()}
        print(f"{args.rows:,} rows, max_tokens 8, {summary['batch']['steps']:,} engine steps")
        start = summary["wall_time_s"] - sum(stages.values())
        print(f"whole command: {wall:.1f}s, {args.rows / wall:,.0f} rows/s: stages "
              f"{sum(stages.values()):.1f}s, engine start (vLLM import and config) {start:.1f}s,"
              f" Python and batchrun start {wall - summary['wall_time_s']:.1f}s")
        print(f"run stage: {stages['run']:.2f}s, {args.rows / stages['run']:,.0f} rows/s")
        print("stages (s):", stages)
        if args.breakdown:
            seconds = breakdown(source, out)
            run = seconds.pop("run stage")
            print(f"in-process run stage {run:.2f}s (timers add a little), of which:")
            for key, s in seconds.items():
                print(f"  {key:38s} {s:6.2f}s  {s / run:5.1%}")


if __name__ == "__main__":
    main()
