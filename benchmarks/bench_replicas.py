"""Engine replicas: batchrun's prefix shards against Ray Data's contiguous blocks, and a
simulated fleet of 8 to 64 replicas.

Part 1, real engines (vLLM on this machine, SmolLM2, every process its own engines):
the `fewshot` and `rag` jobs of synthetic.py run
  (a) `batchrun run JOB --replicas 2`: prefix shards pulled by 2 Ray replicas;
  (b) Ray Data's way: the file cut into 2 contiguous blocks of rows, each run by its own
      engine at the same time (two `batchrun run BLOCK` processes: each block still gets
      batchrun's plan, the most (b) can get; what it cannot get is a prefix seen by one
      replica only);
  (1) `batchrun run JOB`: one engine.
Each prints its summed computed prompt tokens over the single-engine block ideal (`batchrun
plan`'s block_ideal_computed_tokens) and its wall time, side by side.

Part 2, a simulated fleet: a 1M-row pre-tokenized job whose rows pick one of 20,000 system
prompts with Zipf popularity (s = 1.1: the most popular prompt holds ~14% of the rows),
max_tokens 8-128, through `batchrun plan JOB --estimate --replicas N` for N = 1, 8, 16, 64:
the job read and sharded as a run would, then replicas that are sim engines (vLLM's own
scheduler and KV cache, no model: batchrun/cluster/sim_fleet.py) pulling pieces from
batchrun's own shard queue (batchrun/cluster/queue.py, the code the Ray driver runs) on a
simulated clock. Reported: the simulated run stage (the busiest replica's seconds, by the
sim's cost profile), the busiest replica over the mean (target at 64: <= 1.10), computed
prompt tokens over the job's block ideal (<= 1.05), vLLM's engine steps summed over
replicas, and for comparison Ray Data's contiguous blocks' computed tokens over the ideal
(a count from the prefix tree, not a simulation).

    python benchmarks/bench_replicas.py                  # both parts
    python benchmarks/bench_replicas.py --part fleet --fleet-rows 100000 --fleet 1,8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from synthetic import write_job  # noqa: E402

from batchrun.plan.prefix_tree import PrefixTree  # noqa: E402

BATCHRUN = [sys.executable, "-m", "batchrun"]
BLOCK = 32  # vLLM's block on CPU (batchrun's default there)


# ---- part 1: real engines ------------------------------------------------------------------

def run_cli(args: list[str]) -> tuple[float, dict]:
    """Wall seconds and the --json summary of one `batchrun` command."""
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    t0 = time.perf_counter()
    proc = subprocess.run([*BATCHRUN, *args], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode not in (0, 3):
        raise SystemExit(f"failed ({proc.returncode}): batchrun {' '.join(args)}\n"
                         f"{proc.stderr[-2000:]}")
    return wall, json.loads(proc.stdout)


def block_ideal(job: Path, kv: str) -> int:
    _, plan = run_cli(["plan", str(job), "--kv-cache-memory", kv, "--json"])
    return plan["block_ideal_computed_tokens"]


def contiguous_blocks(job: Path, n: int) -> list[Path]:
    """The job's lines cut into n contiguous blocks, as Ray Data reads a file."""
    lines = job.read_text().splitlines(keepends=True)
    size = -(-len(lines) // n)
    paths = []
    for i in range(n):
        path = job.with_name(f"{job.stem}.block{i}.jsonl")
        path.write_text("".join(lines[i * size:(i + 1) * size]))
        paths.append(path)
    return paths


def run_job(job: Path, out: Path, kv: str, *extra: str) -> tuple[float, dict]:
    return run_cli(["run", str(job), "-o", str(out), "--kv-cache-memory", kv, "--overwrite",
                    "--json", "--log-lines", *extra])


def ray_data_way(job: Path, tmp: Path, kv: str, replicas: int) -> tuple[float, int]:
    blocks = contiguous_blocks(job, replicas)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(replicas) as pool:
        runs = list(pool.map(lambda b: run_job(b, tmp / f"{b.stem}.parquet", kv), blocks))
    return time.perf_counter() - t0, sum(s["tokens"]["computed_prompt"] for _, s in runs)


def real_engines(jobs: list[str], kv: str, replicas: int) -> None:
    print(f"part 1: {replicas} replicas on this machine, vLLM, KV cache {kv} each")
    print(f"{'job':<9} {'ideal':>7} | {'(a) shards':>18} | {'(b) blocks':>18} | "
          f"{'(1) one engine':>18}")
    with tempfile.TemporaryDirectory(prefix="bench-replicas-") as d:
        tmp = Path(d)
        for name in jobs:
            job = write_job(name, tmp)
            ideal = block_ideal(job, kv)
            wall_a, a = run_job(job, tmp / "a.parquet", kv, "--replicas", str(replicas))
            wall_b, computed_b = ray_data_way(job, tmp, kv, replicas)
            wall_1, one = run_job(job, tmp / "one.parquet", kv)
            cells = [(a["tokens"]["computed_prompt"], wall_a), (computed_b, wall_b),
                     (one["tokens"]["computed_prompt"], wall_1)]
            print(f"{name:<9} {ideal:>7,} | " + " | ".join(
                f"{c / ideal:5.3f}x {c:>6,} {w:4.0f}s" for c, w in cells))
            for r in a.get("replicas", ()):
                print(f"    (a) replica {r['replica']}: rows {r['rows']}, computed "
                      f"{r['computed_prompt_tokens']:,}, busy {r['busy_s']:.1f}s")


# ---- part 2: a simulated fleet -------------------------------------------------------------

@dataclass(frozen=True)
class ZipfJob:
    """The simulated job: each row one of `prompts` system prompts (32-256 tokens), picked
    with Zipf popularity, then 16-64 tokens of its own; max_tokens 8-128. Rows shuffled."""

    rows: int = 1_000_000
    prompts: int = 20_000
    zipf_s: float = 1.1
    seed: int = 0
    batch_rows: int = 65_536

    def batches(self) -> Iterator[pa.Table]:
        rng = np.random.default_rng(self.seed)
        weights = 1.0 / np.arange(1, self.prompts + 1) ** self.zipf_s
        heads = [_system_prompt(p) for p in range(self.prompts)]
        for first in range(0, self.rows, self.batch_rows):
            n = min(self.batch_rows, self.rows - first)
            family = rng.choice(self.prompts, size=n, p=weights / weights.sum())
            yield _rows(rng, [heads[f] for f in family], first)

    def write_parquet(self, path: Path) -> Path:
        """The job as a user's pre-tokenized input: id, prompt_token_ids, max_tokens."""
        with pq.ParquetWriter(path, INPUT_SCHEMA) as writer:
            for batch in self.batches():
                writer.write_table(batch)
        return path


INPUT_SCHEMA = pa.schema([("id", pa.string()), ("prompt_token_ids", pa.list_(pa.int32())),
                          ("max_tokens", pa.int64())])


def _system_prompt(prompt_id: int) -> np.ndarray:
    rng = np.random.default_rng([7, prompt_id])
    return rng.integers(100, 40_000, int(rng.integers(32, 257)), dtype=np.int32)


def _rows(rng: np.random.Generator, heads: list[np.ndarray], first_row: int) -> pa.Table:
    """Rows first_row..: each row's system prompt, then its own tokens."""
    n = len(heads)
    own = [rng.integers(100, 40_000, int(k), dtype=np.int32) for k in rng.integers(16, 65, n)]
    values = np.concatenate([t for pair in zip(heads, own, strict=True) for t in pair])
    lengths = np.array([len(h) + len(o) for h, o in zip(heads, own, strict=True)])
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int32)
    rows = np.arange(first_row, first_row + n)
    return pa.table({"id": pa.array(rows.astype(str)),
                     "prompt_token_ids": pa.ListArray.from_arrays(pa.array(offsets),
                                                                  pa.array(values)),
                     "max_tokens": pa.array(rng.integers(8, 129, n))}, schema=INPUT_SCHEMA)


def block_ideal_computed(table: pa.Table) -> int:
    """The block-ideal computed prompt tokens of some rows: each distinct whole block of
    their prompt tree once (what one engine with room for everything computes)."""
    tokens = table["prompt_token_ids"].combine_chunks()
    lengths = tokens.value_lengths().to_numpy().astype(np.int64)
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    return PrefixTree.build(tokens.flatten().to_numpy(), offsets).block_ideal_computed_tokens(
        BLOCK)


def contiguous_blocks_computed(job: Path, replicas: int) -> int:
    """Ray Data's way for comparison: the rows in input order cut into `replicas` contiguous
    blocks, each block's block ideal (one engine per block, planned as well as batchrun
    plans a shard). A count from the prefix tree, not a simulation."""
    table = pq.read_table(job, columns=["prompt_token_ids"])
    size = -(-table.num_rows // replicas)
    return sum(block_ideal_computed(table.slice(i * size, size)) for i in range(replicas))


def simulated_fleet(rows: int, sizes: list[int], kv: str, sim_device: str | None) -> None:
    """`batchrun plan JOB --estimate --replicas N` for each fleet size, N = 1 first."""
    job = ZipfJob(rows=rows)
    weights = 1.0 / np.arange(1, job.prompts + 1) ** job.zipf_s
    device = ["--sim-device", sim_device] if sim_device else []
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as d:
        path = job.write_parquet(Path(d) / "zipf.parquet")
        print(f"part 2: simulated fleet (--engine sim: vLLM's scheduler, no model; seconds "
              f"from the sim's cost profile), {job.rows:,} rows, {job.prompts:,} system "
              f"prompts (Zipf s={job.zipf_s}: the most popular in "
              f"{weights[0] / weights.sum():.1%} of rows), KV cache {kv} per replica")
        ideal = block_ideal_computed(pq.read_table(path, columns=["prompt_token_ids"]))
        print(f"block ideal (one engine with room for everything): {ideal:,} computed prompt "
              "tokens")
        print(f"{'replicas':>8} {'run stage':>10} {'speedup':>8} {'busiest/mean':>12} "
              f"{'computed/ideal':>14} {'steps':>10} {'pieces':>7} {'command':>8} | "
              f"{'blocks: computed/ideal':>22}")
        one_engine = None
        for n in sizes:
            extra = ["--replicas", str(n)] if n > 1 else []
            wall, plan = run_cli(["plan", str(path), "--estimate", "--kv-cache-memory", kv,
                                  "--json", *device, *extra])
            e = plan["estimate"]
            fleet = e.get("replicas") or {"busiest_over_mean": 1.0, "per_replica": [
                {"pieces": plan["shards"]["count"]}]}
            one_engine = one_engine or (e["run_seconds"] if n == 1 else None)
            speedup = f"{one_engine / e['run_seconds']:.2f}x" if one_engine else "-"
            pieces = sum(r["pieces"] for r in fleet["per_replica"])
            blocks = contiguous_blocks_computed(path, n) / ideal if n > 1 else 1.0
            print(f"{n:>8} {e['run_seconds']:>9,.0f}s {speedup:>8} "
                  f"{fleet['busiest_over_mean']:>12.3f} {e['computed_prompt'] / ideal:>14.4f} "
                  f"{e['engine_steps']:>10,} {pieces:>7} {wall:>7.0f}s | {blocks:>22.3f}")
        print(f"cost profile: {e['profile']['source']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("all", "real", "fleet"), default="all")
    parser.add_argument("--jobs", default="fewshot,rag")
    parser.add_argument("--kv", default="256MiB", help="KV cache per engine (part 1)")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--fleet", default="1,8,16,64", help="fleet sizes (part 2)")
    parser.add_argument("--fleet-rows", type=int, default=1_000_000)
    parser.add_argument("--fleet-kv", default="1GiB", help="KV cache per replica (part 2)")
    parser.add_argument("--sim-device", help="price the fleet's steps for this device")
    args = parser.parse_args()
    if args.part in ("all", "real"):
        real_engines(args.jobs.split(","), args.kv, args.replicas)
    if args.part in ("all", "fleet"):
        simulated_fleet(args.fleet_rows, [int(n) for n in args.fleet.split(",")],
                        args.fleet_kv, args.sim_device)


if __name__ == "__main__":
    main()
