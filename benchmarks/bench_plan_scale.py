"""Planner scale: read a pre-tokenized Parquet job, build its global prefix tree, plan it.

    python benchmarks/bench_plan_scale.py                      # 100k and 1M requests
    python benchmarks/bench_plan_scale.py --sizes 10000,100000 --block-size 32

The job looks like a RAG / classification batch: every prompt starts with the same 4-token
chat header, then one of 1,000 system prompts (40-200 tokens), then a document (200-640
tokens) shared by 2-50 requests, then a short unique question (10-110 tokens): about 600
tokens a prompt. max_tokens is set per system prompt (8 to 512). Rows are shuffled. Files
are generated once and cached under /tmp/batchrun_bench/ (the 1M file is ~1.1 GB and takes a
few minutes to write).

Each size runs in a fresh subprocess, so peak RSS (ru_maxrss) belongs to that size alone.
Timed: reading the Parquet file into flat values/offsets buffers (pyarrow; the list column's
values are taken without a copy and placed once into one preallocated buffer),
PrefixTree.build, and plan_schedule. Target: 1M requests in <= 20 s and
<= 6 GB on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from batchrun.plan import PrefixTree, plan_schedule  # noqa: E402

CACHE = Path("/tmp/batchrun_bench")
VOCAB = 32_000
ROW_GROUP = 65_536
SCHEMA = pa.schema([("prompt_token_ids", pa.list_(pa.int32())), ("max_tokens", pa.int64())])


def job_path(n: int, seed: int) -> Path:
    return CACHE / f"plan_scale_{n}_seed{seed}.parquet"


def make_job(n: int, seed: int, path: Path) -> None:
    """Write the synthetic job described in the module notes, one row group at a time."""
    rng = np.random.default_rng(seed)
    header = rng.integers(0, VOCAB, 4, dtype=np.int32)
    systems = 1000
    sys_len = rng.integers(40, 201, systems)
    share = rng.integers(2, 51, n // 2 + 1)  # requests per document
    docs = int(np.searchsorted(np.cumsum(share), n)) + 1
    share = share[:docs]
    share[-1] -= share.sum() - n
    doc_len = rng.integers(200, 641, docs)
    doc_system = rng.integers(0, systems, docs)
    decode_budget = rng.choice([8, 32, 128, 256, 512], systems)
    # One pool of shared text: system prompts, then documents.
    text_start = np.concatenate(([0], np.cumsum(np.concatenate((sys_len, doc_len)))))
    text = rng.integers(0, VOCAB, text_start[-1], dtype=np.int32)
    request_doc = np.repeat(np.arange(docs), share)
    rng.shuffle(request_doc)
    question_len = rng.integers(10, 111, n)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with pq.ParquetWriter(tmp, SCHEMA) as writer:
        for lo in range(0, n, ROW_GROUP):
            hi = min(n, lo + ROW_GROUP)
            doc = request_doc[lo:hi]
            system = doc_system[doc]
            # Each request: header, system prompt, document, question, as four segments.
            seg_len = np.stack([np.full(hi - lo, 4), sys_len[system], doc_len[doc],
                                question_len[lo:hi]], axis=1).ravel()
            seg_src = np.stack([np.full(hi - lo, -1), text_start[system],
                                text_start[systems + doc], np.full(hi - lo, -2)], axis=1).ravel()
            step = np.arange(seg_len.sum()) - np.repeat(np.cumsum(seg_len) - seg_len, seg_len)
            src = np.repeat(seg_src, seg_len)
            tokens = text[np.maximum(src, 0) + step]
            tokens[src == -1] = np.tile(header, hi - lo)
            unique = src == -2
            tokens[unique] = rng.integers(0, VOCAB, int(unique.sum()), dtype=np.int32)
            lengths = seg_len.reshape(-1, 4).sum(axis=1)
            offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int32)
            prompts = pa.ListArray.from_arrays(pa.array(offsets), pa.array(tokens))
            writer.write_table(pa.table(
                {"prompt_token_ids": prompts, "max_tokens": decode_budget[system]}, schema=SCHEMA))
    tmp.rename(path)


def read_tokens(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """values (int32), offsets (int64, n + 1) and max_tokens of a pre-tokenized Parquet file.

    Row groups are decoded in parallel (pyarrow releases the GIL), each in small batches
    whose flat list values go straight to their place in one buffer sized from the file's
    metadata: the job is never held twice, and the decoder's buffers stay small and reused
    (decoding a whole row group at once costs about 1.5x the CPU, mostly in page faults).
    """
    meta = pq.ParquetFile(path).metadata
    column = meta.schema.to_arrow_schema().get_field_index("prompt_token_ids")
    value_counts = [meta.row_group(i).column(column).num_values for i in range(meta.num_row_groups)]
    row_counts = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    value_at = np.concatenate(([0], np.cumsum(value_counts)))
    row_at = np.concatenate(([0], np.cumsum(row_counts)))
    values = np.empty(int(value_at[-1]), dtype=np.int32)
    offsets = np.empty(int(row_at[-1]) + 1, dtype=np.int64)
    max_tokens = np.empty(int(row_at[-1]), dtype=np.int64)

    def read(i: int) -> int:
        v, r = int(value_at[i]), int(row_at[i])
        batches = pq.ParquetFile(path).iter_batches(
            batch_size=8192, row_groups=[i], columns=["prompt_token_ids", "max_tokens"],
            use_threads=False)
        for batch in batches:
            prompts = batch.column("prompt_token_ids")
            flat = prompts.flatten().to_numpy()  # no copy
            values[v: v + len(flat)] = flat
            starts = prompts.offsets.to_numpy()[:-1]
            offsets[r: r + len(batch)] = starts - starts[0] + v
            max_tokens[r: r + len(batch)] = batch.column("max_tokens").to_numpy()
            v, r = v + len(flat), r + len(batch)
        return v - int(value_at[i])

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        found = list(pool.map(read, range(meta.num_row_groups)))
    # num_values also counts a placeholder for each null or empty list.
    if found != value_counts:
        raise ValueError(f"{path}: null or empty prompts; this benchmark expects none")
    offsets[-1] = len(values)
    return values, offsets, max_tokens


def measure(path: Path, block_size: int, kv_capacity_tokens: int) -> dict:
    """One timed run: read, build the tree, plan."""
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    values, offsets, max_tokens = read_tokens(path)
    t1 = time.perf_counter()
    tree = PrefixTree.build(values, offsets)
    t2 = time.perf_counter()
    plan = plan_schedule(values, offsets, max_tokens, block_size=block_size,
                         kv_capacity_tokens=kv_capacity_tokens, tree=tree)
    t3 = time.perf_counter()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "requests": len(max_tokens),
        "read_s": t1 - t0,
        "tree_s": t2 - t1,
        "plan_s": t3 - t2,
        "total_s": t3 - t0,
        "cpu_s": usage.ru_utime + usage.ru_stime,  # all threads; wall above is what counts
        "peak_rss_gib": usage.ru_maxrss / 2**20,
        "load_before": load,  # other work on the machine skews wall times
        "stats": plan.stats.to_dict(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000", help="comma-separated request counts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--kv-capacity-tokens", type=int, default=500_000)
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.block_size, args.kv_capacity_tokens)))
        return

    results = []
    for n in (int(s) for s in args.sizes.split(",")):
        path = job_path(n, args.seed)
        if not path.exists():
            t = time.perf_counter()
            make_job(n, args.seed, path)
            print(f"generated {path} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        child = subprocess.run(
            [sys.executable, __file__, "--measure", str(path), "--block-size",
             str(args.block_size), "--kv-capacity-tokens", str(args.kv_capacity_tokens)],
            check=True, capture_output=True, text=True)
        results.append(json.loads(child.stdout))

    print("| requests | prompt tokens | read s | tree s | plan s | total s | CPU s "
          "| peak RSS GiB | groups | prefill saving | load |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        s = r["stats"]
        print(f"| {r['requests']:,} | {s['prompt_tokens']:,} | {r['read_s']:.2f} | "
              f"{r['tree_s']:.2f} | {r['plan_s']:.2f} | {r['total_s']:.2f} | {r['cpu_s']:.1f} | "
              f"{r['peak_rss_gib']:.2f} | {s['groups']:,} | {s['expected_prefill_saving']:.1%} | "
              f"{r['load_before']:.1f} |")
    for a, b in zip(results, results[1:], strict=False):
        grow = math.log(b["total_s"] / a["total_s"]) / math.log(b["requests"] / a["requests"])
        print(f"time grows as n^{grow:.2f} from {a['requests']:,} to {b['requests']:,} requests")


if __name__ == "__main__":
    main()
