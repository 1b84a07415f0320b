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

Part 2, a simulated fleet: a 1M-row job whose rows pick one of 20,000 system prompts with
Zipf popularity (s = 1.1: the most popular prompt holds ~14% of the rows), cut into prefix
shards by batchrun's own shard builder (batchrun/ingest/shards.py) in a 4 GiB budget. The replicas
are a cost model, not engines: a piece costs its block-ideal computed prompt tokens times
the prefill time per token plus its max_tokens times the decode time per token, both
measured on this machine's vLLM (or given: --prefill-us/--decode-us).
What runs is batchrun's own shard queue (batchrun/cluster/queue.py: largest first, pulled
as replicas free up, share-sized pieces cut at the cheapest place), the code the Ray
driver runs. Reported for 8, 16 and 64 replicas: the busiest replica's time over the mean,
and computed prompt tokens over the job's block ideal (targets at 64: <= 1.10 and <= 1.05).

    python benchmarks/bench_replicas.py                  # both parts
    python benchmarks/bench_replicas.py --part fleet --prefill-us 150 --decode-us 900
"""

from __future__ import annotations

import argparse
import heapq
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from synthetic import write_job  # noqa: E402

from batchrun.cluster.queue import PrefixOrder, PrefixOrders, ShardQueue  # noqa: E402
from batchrun.config import parse_size  # noqa: E402
from batchrun.ingest.shards import Shard, ShardBuilder  # noqa: E402
from batchrun.io.schema import REQUEST_SCHEMA  # noqa: E402
from batchrun.plan.prefix_tree import PrefixTree  # noqa: E402
from batchrun.plan.prefixes import boundary_reuse  # noqa: E402

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
    batch_rows: int = 65_536  # rows per batch handed to the shard builder, as a reader does

    def batches(self) -> Iterator[pa.Table]:
        rng = np.random.default_rng(self.seed)
        weights = 1.0 / np.arange(1, self.prompts + 1) ** self.zipf_s
        heads = [_system_prompt(p) for p in range(self.prompts)]
        for first in range(0, self.rows, self.batch_rows):
            n = min(self.batch_rows, self.rows - first)
            family = rng.choice(self.prompts, size=n, p=weights / weights.sum())
            yield _rows(rng, [heads[f] for f in family], first)


def _system_prompt(prompt_id: int) -> np.ndarray:
    rng = np.random.default_rng([7, prompt_id])
    return rng.integers(100, 50_000, int(rng.integers(32, 257)), dtype=np.int32)


def _rows(rng: np.random.Generator, heads: list[np.ndarray], first_row: int) -> pa.Table:
    """REQUEST_SCHEMA rows first_row.. (what the tokenize stage hands the shard builder):
    each row's system prompt, then its own tokens."""
    n = len(heads)
    own = [rng.integers(100, 50_000, int(k), dtype=np.int32) for k in rng.integers(16, 65, n)]
    values = np.concatenate([t for pair in zip(heads, own, strict=True) for t in pair])
    lengths = np.array([len(h) + len(o) for h, o in zip(heads, own, strict=True)])
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int32)
    rows = np.arange(first_row, first_row + n)
    columns = {name: pa.nulls(n, field.type)
               for name, field in zip(REQUEST_SCHEMA.names, REQUEST_SCHEMA, strict=True)}
    columns.update(row=pa.array(rows), id=pa.array(rows.astype(str)),
                   prompt_token_ids=pa.ListArray.from_arrays(pa.array(offsets),
                                                             pa.array(values)),
                   max_tokens=pa.array(rng.integers(8, 129, n)))
    return pa.table(columns, schema=REQUEST_SCHEMA)


def zipf_shards(job: ZipfJob, spill_dir: Path, memory_budget: int) -> list[Shard]:
    """The job cut into prefix shards by batchrun's own shard builder, with the run's
    default memory budget shares (runner: run and shard bytes = budget / 8)."""
    builder = ShardBuilder(spill_dir, run_bytes=memory_budget // 8,
                           shard_bytes=memory_budget // 8)
    for batch in job.batches():
        builder.add(batch)
    return builder.finish()


def job_block_ideal(shards: list[Shard]) -> int:
    """The whole job's block ideal: its shards' ideals less what each boundary shares
    (shards are consecutive ranges of the token order: batchrun/ingest/shards.py)."""
    total, last = 0, None
    for shard in shards:
        order = PrefixOrder.of(shard.load(), BLOCK)
        prompts = order.table["prompt_token_ids"]
        first = np.asarray(prompts[int(order.order[0])].values)
        total += computed_tokens(order.table)
        total -= boundary_reuse(last, first, BLOCK)[1]
        last = np.asarray(prompts[int(order.order[-1])].values)
    return total


def computed_tokens(table: pa.Table) -> int:
    """The block-ideal computed prompt tokens of a piece (what one engine computes: vLLM
    did exactly this on the planned `prefix` job, benchmarks/README.md)."""
    tokens = table["prompt_token_ids"]
    lengths = tokens.combine_chunks().value_lengths().to_numpy().astype(np.int64)
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    values = tokens.combine_chunks().flatten().to_numpy()
    return PrefixTree.build(values, offsets).block_ideal_computed_tokens(BLOCK)


@dataclass
class Fleet:
    busy_s: np.ndarray
    computed: int
    pieces: int
    pieces_cut: int


def simulate(shards: list[Shard], replicas: int, prefill_s: float, decode_s: float) -> Fleet:
    """Replicas pull work from batchrun's ShardQueue whenever they are free; a piece takes
    the cost model's time. In-flight rows (the queue's share needs them) shrink linearly
    while a piece runs, as its results stream back."""
    queue = ShardQueue(shards, replicas, PrefixOrders(BLOCK))
    free = [(0.0, r) for r in range(replicas)]
    running: list[tuple[float, float, int]] = []  # (start, end, rows)
    busy = np.zeros(replicas)
    computed = pieces = 0
    while free:
        now, r = heapq.heappop(free)
        running = [p for p in running if p[1] > now]
        in_flight = sum(n * (end - now) / (end - start) for start, end, n in running)
        work = queue.take(int(in_flight))
        if work is None:
            continue  # nothing left for this replica: it stays idle
        table = work.table(queue.orders)
        cost = computed_tokens(table)
        seconds = cost * prefill_s + int(np.sum(table["max_tokens"].to_numpy())) * decode_s
        computed, pieces = computed + cost, pieces + 1
        busy[r] += seconds
        running.append((now, now + seconds, table.num_rows))
        heapq.heappush(free, (now + seconds, r))
    return Fleet(busy, computed, pieces, queue.pieces_cut)


def measure_costs() -> tuple[float, float]:
    """Seconds per prefilled prompt token and per decoded token on this machine's vLLM
    (SmolLM2, fp32, eager, one engine): 32 distinct 480-token prompts with max_tokens 1,
    then 64 short prompts with max_tokens 64 (decoding at a batch of 64)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from batchrun.config import EngineOptions
    from batchrun.engine.base import GenerationRequest
    from batchrun.engine.vllm_engine import VllmEngine
    from batchrun.model import default_model_dir

    engine = VllmEngine(default_model_dir(), EngineOptions(
        kv_cache_memory=512 << 20, max_model_len=1024), enforce_eager=True)
    rng = np.random.default_rng(1)

    def timed(prompts: list[list[int]], max_tokens: int) -> float:
        for i, p in enumerate(prompts):
            engine.add(GenerationRequest(f"{max_tokens}-{i}", p, max_tokens))
        t0 = time.perf_counter()
        while engine.num_unfinished():
            engine.step()
        return time.perf_counter() - t0

    try:
        timed([rng.integers(100, 40_000, 64).tolist()], 4)  # warm-up
        prefill = timed([rng.integers(100, 40_000, 480).tolist() for _ in range(32)], 1)
        decode = timed([rng.integers(100, 40_000, 8).tolist() for _ in range(64)], 64)
    finally:
        engine.close()
    return prefill / (32 * 480), decode / (64 * 64)


def simulated_fleet(sizes: list[int], prefill_s: float, decode_s: float,
                    memory_budget: int) -> None:
    job = ZipfJob()
    weights = 1.0 / np.arange(1, job.prompts + 1) ** job.zipf_s
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as spill:
        t0 = time.perf_counter()
        shards = zipf_shards(job, Path(spill), memory_budget)
        print(f"part 2: simulated fleet, {job.rows:,} rows, {job.prompts:,} system prompts "
              f"(Zipf s={job.zipf_s}: the most popular in {weights[0] / weights.sum():.1%} of "
              f"rows), {len(shards)} prefix shards ({memory_budget / 2**30:.0f} GiB budget, "
              f"built in {time.perf_counter() - t0:.0f} s); cost model: prefill "
              f"{prefill_s * 1e6:.1f} us/token, decode {decode_s * 1e6:.1f} us/token")
        ideal = job_block_ideal(shards)
        print(f"block ideal (one engine, the whole job): {ideal:,} computed prompt tokens")
        print(f"{'replicas':>8} {'busiest/mean':>12} {'computed/ideal':>14} {'pieces':>7} "
              f"{'cut':>5} {'makespan':>10} | {'blocks: computed/ideal':>22}")
        for n in sizes:
            t0 = time.perf_counter()
            fleet = simulate(shards, n, prefill_s, decode_s)
            blocks = contiguous_blocks_computed(job, n)
            print(f"{n:>8} {fleet.busy_s.max() / fleet.busy_s.mean():>12.3f} "
                  f"{fleet.computed / ideal:>14.4f} {fleet.pieces:>7} {fleet.pieces_cut:>5} "
                  f"{fleet.busy_s.max():>9.0f}s | {blocks / ideal:>22.3f}   (simulated in "
                  f"{time.perf_counter() - t0:.0f} s)")


def contiguous_blocks_computed(job: ZipfJob, replicas: int) -> int:
    """Ray Data's way for comparison: the rows in input order cut into `replicas` contiguous
    blocks, each block's block ideal (one engine per block, planned as well as batchrun
    plans a shard)."""
    size = -(-job.rows // replicas)
    total, block = 0, []
    for batch in job.batches():
        while batch.num_rows:
            take = min(batch.num_rows, size - sum(t.num_rows for t in block))
            block.append(batch.slice(0, take))
            batch = batch.slice(take)
            if sum(t.num_rows for t in block) == size:
                total += computed_tokens(pa.concat_tables(block))
                block = []
    return total + (computed_tokens(pa.concat_tables(block)) if block else 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("all", "real", "fleet"), default="all")
    parser.add_argument("--jobs", default="fewshot,rag")
    parser.add_argument("--kv", default="256MiB")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--fleet", default="8,16,64")
    parser.add_argument("--memory-budget", default="4GiB", help="the simulated run's budget")
    parser.add_argument("--prefill-us", type=float, help="skip measuring: us per prompt token")
    parser.add_argument("--decode-us", type=float, help="skip measuring: us per decoded token")
    args = parser.parse_args()
    if args.part in ("all", "real"):
        real_engines(args.jobs.split(","), args.kv, args.replicas)
    if args.part in ("all", "fleet"):
        if args.prefill_us and args.decode_us:
            prefill_s, decode_s = args.prefill_us / 1e6, args.decode_us / 1e6
        else:
            prefill_s, decode_s = measure_costs()
        simulated_fleet([int(n) for n in args.fleet.split(",")], prefill_s, decode_s,
                        parse_size(args.memory_budget))


if __name__ == "__main__":
    main()
