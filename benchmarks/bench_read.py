"""Reading and tokenizing at scale, timed as a user meets it: `batchrun validate` on a text
JSONL file (~700 bytes a row, 2,000 shared system texts) and on a pre-tokenized Parquet file
(~600 tokens a row, list<int32>, 64k-row row groups), wall time and peak RSS from
/usr/bin/time -v, this checkout and another one (--before) side by side. Then, in a fresh
process per file, rows/s per stage through the Python functions in one loop: reading
(open_request_stream, or read_request_set where a checkout has no stream) and tokenizing
(tokenize_requests) with the default model's tokenizer.

    python benchmarks/bench_read.py --rows 1000000 --before /tmp/batchrun-main
    python benchmarks/bench_read.py --rows 200000 --only parquet

The other checkout: e.g. `mkdir /tmp/batchrun-main && git archive main batchrun |
tar -x -C /tmp/batchrun-main`. Files are generated once into /tmp/batchrun_bench/ (1M rows:
0.7 GB of JSONL, 1.1 GB of Parquet; the Parquet job is bench_plan_scale.py's).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CACHE = Path("/tmp/batchrun_bench")


def input_file(kind: str, rows: int) -> Path:
    sys.path.insert(0, str(HERE))
    if kind == "text":
        from synthetic import write_scale_jsonl

        path = CACHE / f"read_text_{rows}.jsonl"
        if not path.exists():
            write_scale_jsonl(path, rows)
        return path
    from bench_plan_scale import job_path, make_job

    path = job_path(rows, 0)
    if not path.exists():
        make_job(rows, 0, path)
    return path


def _time_v(command: list[str], tree: Path) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (GiB) and stdout of a command run in `tree`."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(["/usr/bin/time", "-v", *command], cwd=tree, env=env,
                          capture_output=True, text=True)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", done.stderr)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    if wall is None or rss is None or done.returncode not in (0, 3):
        raise RuntimeError(f"{command} in {tree} failed ({done.returncode}): "
                           f"{done.stderr[-2000:]}")
    seconds = 0.0
    for part in wall.group(1).split(":"):
        seconds = seconds * 60 + float(part)
    return seconds, int(rss.group(1)) / 2**20, done.stdout


def validate(path: Path, tree: Path) -> dict:
    wall, rss, out = _time_v([sys.executable, "-m", "batchrun", "validate", str(path), "--json"],
                             tree)
    report = json.loads(out)
    return {"validate_s": wall, "validate_rss_gib": rss,
            "report": {k: report[k] for k in ("rows", "ok", "errors", "prompt_tokens")}}


def stages(path: Path, tree: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run([sys.executable, __file__, "--stages", str(path)], cwd=tree, env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def measure_stages(path: Path) -> dict:
    """The child process: read and tokenize `path` batch by batch (or at once), each stage
    timed on its own."""
    from batchrun.ingest.tokenize import HFTokenizer, tokenize_requests
    from batchrun.io.input import readers
    from batchrun.model import model_context_length, resolve_model

    model_dir = resolve_model("default")
    tokenizer, max_model_len = HFTokenizer(model_dir), model_context_length(model_dir)
    if path.suffix == ".jsonl":
        tokenizer.encode(["load the tokenizer before the clock starts"])
    def whole_file() -> Iterator[Any]:  # a checkout from before the stream: one batch
        yield readers.read_request_set(path)

    if hasattr(readers, "open_request_stream"):
        batches = iter(readers.open_request_stream(path))
    else:
        batches = whole_file()
    read_s = tokenize_s = 0.0
    rows = tokens = 0
    while True:
        t0 = time.perf_counter()
        batch = next(batches, None)
        t1 = time.perf_counter()
        if batch is None:
            break
        tokenized = tokenize_requests(batch.requests, tokenizer, max_model_len=max_model_len)
        t2 = time.perf_counter()
        read_s, tokenize_s = read_s + t1 - t0, tokenize_s + t2 - t1
        rows += batch.requests.num_rows
        tokens += int(tokenized.offsets[-1])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"rows": rows, "tokens": tokens, "read_s": read_s, "tokenize_s": tokenize_s,
            "stages_rss_gib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--only", choices=("text", "parquet"))
    parser.add_argument("--before", type=Path, help="another checkout to compare with")
    parser.add_argument("--stages", type=Path, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.stages:
        print(json.dumps(measure_stages(args.stages)))
        return
    trees = {"after": HERE.parent, **({"before": args.before.resolve()} if args.before else {})}
    results = []
    for kind in [args.only] if args.only else ["text", "parquet"]:
        path = input_file(kind, args.rows)
        for name, tree in trees.items():
            load = os.getloadavg()[0]
            r = {"input": kind, "tree": name, "load": load, **validate(path, tree),
                 **stages(path, tree)}
            print(json.dumps(r), file=sys.stderr)
            results.append(r)
    print("| input | rows | checkout | validate s | validate peak RSS GiB | read rows/s "
          "| tokenize rows/s | stages peak RSS GiB | load |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['input']} | {r['rows']:,} | {r['tree']} | {r['validate_s']:.1f} | "
              f"{r['validate_rss_gib']:.2f} | {r['rows'] / r['read_s']:,.0f} | "
              f"{r['rows'] / r['tokenize_s']:,.0f} | {r['stages_rss_gib']:.2f} | "
              f"{r['load']:.1f} |")
    for after, before in zip(results[::2], results[1::2], strict=False):
        if after["input"] == before["input"]:
            time_ratio = before["validate_s"] / after["validate_s"]
            rss_ratio = before["validate_rss_gib"] / after["validate_rss_gib"]
            print(f"{after['input']}: validate time before/after {time_ratio:.2f}x, peak RSS "
                  f"before/after {rss_ratio:.2f}x; same report: "
                  f"{after['report'] == before['report']}")


if __name__ == "__main__":
    main()
