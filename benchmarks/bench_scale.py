"""Any size in bounded memory: the commands a user runs, timed on jobs of 1M to 10M rows.

    python benchmarks/bench_scale.py run --rows 1000000            # text JSONL, fake engine
    python benchmarks/bench_scale.py run --rows 1000000,3000000,10000000
    python benchmarks/bench_scale.py plan --rows 1000000           # pre-tokenized Parquet
    python benchmarks/bench_scale.py ideal --rows 200000           # one system prompt shared
    python benchmarks/bench_scale.py ideal --rows 200000 --memory-budget 32GiB  # one shard
    python benchmarks/bench_scale.py run --rows 2000000 --early-start both   # side by side
    python benchmarks/bench_scale.py resume --rows 10000000    # killed twice, then resumed

run:   a text JSONL job (~700 bytes a row, 2,000 shared system prompts, rows shuffled) through
       `batchrun run JOB -o OUT --engine fake --json`. The fake engine (no model, a
       block-granular prefix cache, a few tokens of output a row) stands in for vLLM so that
       batchrun's own stages are what is measured. Reported: wall, peak RSS of the batchrun
       process (GNU time), rows/s per stage (from the summary), shards, spilled bytes (on
       disk) against the input file's, and a check that the output holds every row once, in
       input order.
plan:  a pre-tokenized Parquet job (~600 tokens a row, list<int32>, row groups of 65,536; the
       generator of bench_plan_scale.py) through `batchrun plan JOB --json --engine fake`;
       distinct_prompt_tokens checked against the in-memory tree of the same file when the
       file is small enough to build it here (--check).
ideal: one system prompt shared by every row and ~2,000 second-level prefixes below it, run
       with a memory budget small enough to cut it into shards: computed prompt tokens
       against the block-granular ideal of the whole job. By default on `--engine sim`
       (vLLM's own scheduler and prefix cache, no model, a --kv KV cache): what vLLM would
       compute; `--engine fake` for the fake engine's figure.
resume: the `run` job SIGKILLed twice, once while it is still being read (sharded and run
       early; after --kill-read of the rows have run) and once after the read has ended
       (after --kill-run of them), each time resumed with --resume; then run to the end.
       Reported per attempt: the rows its journals gained, results journalled twice (a
       request that ran again after its result was saved: must be 0), wall; at the end every
       row once, in input order.
Targets (issue 13): peak RSS <= 4 GiB at every size, flat as rows grow; 10M rows <= 60 min;
plan of 1M x ~600 tokens <= 15 s and <= 2 GiB; computed <= 1.05x the ideal.
Files are generated once under /tmp/batchrun_bench/.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench_plan_scale import make_job as make_tokenized_job  # noqa: E402

CACHE = Path("/tmp/batchrun_bench")
BATCHRUN = [sys.executable, "-m", "batchrun"]
# A 4M-token block-32 prefix cache and 4,096 sequences a step: the engine is never the limit.
FAKE_ENGINE = {"block_size": 32, "kv_capacity_tokens": 4_000_000, "max_num_seqs": 4096,
               "max_model_len": 4096}
WORDS = np.array("the of and to in is was for on that with as by at from his an were are which "
                 "this be or has had not but what all when can one there their about would "
                 "been who more will some into could than them time only new these may".split())


def text_job(rows: int, systems: int = 2000, seed: int = 0) -> Path:
    """~700-byte rows: one of `systems` system prompts (~420 bytes) and a question."""
    path = CACHE / f"scale_text_{rows}_s{systems}.jsonl"
    if path.exists():
        return path
    rng = np.random.default_rng(seed)
    system_text = [f"System {k}: " + " ".join(rng.choice(WORDS, 80)) for k in range(systems)]
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for lo in range(0, rows, 100_000):
            n = min(100_000, rows - lo)
            pick = rng.integers(0, systems, n)
            words = rng.choice(WORDS, (n, 45))
            f.writelines(json.dumps({"id": f"q{lo + i}", "prompt": system_text[pick[i]]
                                     + " Question: " + " ".join(words[i]),
                                     "max_tokens": 4}) + "\n" for i in range(n))
    tmp.rename(path)
    return path


def shared_system_job(rows: int, seed: int = 0) -> Path:
    """One system prompt (~1,000 bytes) before every row, then one of 2,000 documents
    (~300 bytes), then a question."""
    path = CACHE / f"scale_one_system_{rows}.jsonl"
    if path.exists():
        return path
    rng = np.random.default_rng(seed)
    system = "You are the one system prompt. " + " ".join(rng.choice(WORDS, 180))
    docs = [f" Document {k}: " + " ".join(rng.choice(WORDS, 60)) for k in range(2000)]
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        pick = rng.integers(0, len(docs), rows)
        for i in range(rows):
            f.write(json.dumps({"id": f"q{i}", "prompt": system + docs[pick[i]] + " Question "
                                + " ".join(rng.choice(WORDS, 8)), "max_tokens": 4}) + "\n")
    return path


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int, str]:
    """Wall seconds, peak RSS (bytes, GNU time) and stdout of one command."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as t:
        t0 = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-v", "-o", t.name, *cmd], capture_output=True,
                              text=True, env={**os.environ, "PYTHONPATH": str(HERE.parent),
                                              **(env or {})})
        wall = time.perf_counter() - t0
        report = t.read()
    if proc.returncode not in (0, 3):
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", report).group(1)) * 1024
    return wall, rss, proc.stdout


def check_output(path: Path, rows: int) -> bool:
    """Every row once, in input order."""
    at = 0
    for batch in pq.ParquetFile(path).iter_batches(columns=["row"], batch_size=1 << 20):
        row = batch.column(0).to_numpy()
        if not np.array_equal(row, np.arange(at, at + len(row))):
            return False
        at += len(row)
    return at == rows


def bench_run(rows: int, budget: str | None, early: str = "on") -> dict:
    job = text_job(rows)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        out = Path(tmp) / "out.parquet"
        cmd = [*BATCHRUN, "run", str(job), "-o", str(out), "--engine", "fake", "--json",
               "--log-lines", f"--{'' if early == 'on' else 'no-'}early-start"] + (
                   ["--memory-budget", budget] if budget else [])
        wall, rss, stdout = timed(cmd, {"BATCHRUN_FAKE_ENGINE": json.dumps(FAKE_ENGINE)})
        s = json.loads(stdout)
        ok = check_output(out, rows)
    stages = {k: v["rows_per_s"] for k, v in s["stages"].items()}
    spilled, input_bytes = s["shards"]["spilled_bytes"], job.stat().st_size
    return {"bench": "run", "rows": rows, "early_start": early,
            "time_to_first_step_s": s["time_to_first_step_s"],
            "early_runs": s["early_start"]["runs"], "early_rows": s["early_start"]["rows"],
            "computed_prompt_tokens": s["tokens"]["computed_prompt"],
            "wall_s": round(wall, 1), "peak_rss_gib":
            round(rss / 2**30, 2), "shards": s["shards"]["count"],
            "spilled_bytes": spilled, "spilled_rows": s["shards"].get("spilled_rows"),
            "input_bytes": input_bytes, "spilled_vs_input": round(spilled / input_bytes, 3),
            "rows_per_s": round(rows / wall), "stage_rows_per_s": stages,
            "load_avg": os.getloadavg()[0],
            "every_row_once_in_order": ok, "status": s["status"]}


def journal_rows(out: Path) -> tuple[int, int]:
    """Rows in the checkpoint's journals, with and without repeats."""
    from batchrun.io.output.checkpoint import journal_batches

    rows = [b.column(0).to_numpy() for b in journal_batches(
        sorted(out.with_name(out.name + ".partial").glob("journal-*.arrows")))]
    every = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    return len(every), len(np.unique(every))


def kill_when(cmd: list[str], env: dict[str, str], reading: bool, fraction: float,
              rows: int) -> float:
    """Run `cmd` and SIGKILL it at the first progress line past `fraction` of `rows` done,
    while the job is still being read (`reading`) or after its read has ended. Seconds run."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(HERE.parent), **env})
    for line in proc.stderr:
        done = re.match(r"batchrun: (\d+)(/\d+)? rows", line)
        if done and (done.group(2) is None) == reading and int(done.group(1)) >= fraction * rows:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    if proc.returncode != -signal.SIGKILL:
        raise SystemExit(f"the run ended ({proc.returncode}) before it was killed")
    return time.perf_counter() - t0


def bench_resume(rows: int, budget: str | None, kill_read: float, kill_run: float) -> dict:
    job = text_job(rows)
    env = {"BATCHRUN_FAKE_ENGINE": json.dumps(FAKE_ENGINE)}
    attempts = []
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        out = Path(tmp) / "out.parquet"
        cmd = [*BATCHRUN, "run", str(job), "-o", str(out), "--engine", "fake", "--json",
               "--log-lines", "--resume"] + (["--memory-budget", budget] if budget else [])
        before = 0
        for reading, fraction in ((True, kill_read), (False, kill_run)):
            wall = kill_when(cmd, env, reading, fraction, rows)
            journalled, unique = journal_rows(out)
            attempts.append({"killed": "while read" if reading else "after read",
                             "wall_s": round(wall, 1), "rows_gained": unique - before,
                             "journalled_twice": journalled - unique})
            before = unique
        wall, rss, stdout = timed(cmd, env)
        s = json.loads(stdout)
        attempts.append({"killed": None, "wall_s": round(wall, 1),
                         "rows_gained": rows - before, "peak_rss_gib": round(rss / 2**30, 2)})
        ok = check_output(out, rows)
    return {"bench": "resume", "rows": rows, "attempts": attempts,
            "total_wall_s": round(sum(a["wall_s"] for a in attempts), 1),
            "succeeded": s["succeeded"], "every_row_once_in_order": ok,
            "load_avg": os.getloadavg()[0], "status": s["status"]}


def bench_plan(rows: int, budget: str | None, check: bool) -> dict:
    job = CACHE / f"plan_scale_{rows}_seed0.parquet"
    if not job.exists():
        make_tokenized_job(rows, 0, job)
    cmd = [*BATCHRUN, "plan", str(job), "--json", "--engine", "fake"] + (
        ["--memory-budget", budget] if budget else [])
    wall, rss, stdout = timed(cmd)
    s = json.loads(stdout)
    out = {"bench": "plan", "rows": rows, "wall_s": round(wall, 1),
           "peak_rss_gib": round(rss / 2**30, 2), "shards": s["shards"]["count"],
           "distinct_prompt_tokens": s["distinct_prompt_tokens"]}
    if check:
        from bench_plan_scale import read_tokens

        from batchrun.plan import PrefixTree

        values, offsets, _ = read_tokens(job)
        out["distinct_exact"] = PrefixTree.build(values, offsets).distinct_tokens == \
            s["distinct_prompt_tokens"]
    return out


def bench_ideal(rows: int, budget: str, engine: str, kv: str, early: str = "on") -> dict:
    """engine "sim": vLLM's own scheduler and cache (no model) with a `kv` KV cache and the
    default model's tokenizer; "fake": the fake engine's 4M-token LRU and byte tokens."""
    job = shared_system_job(rows)
    engine_args = ["--kv-cache-memory", kv] if engine == "sim" else []
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        out = Path(tmp) / "out.parquet"
        wall, rss, stdout = timed(
            [*BATCHRUN, "run", str(job), "-o", str(out), "--engine", engine, "--json",
             "--log-lines", "--memory-budget", budget, *engine_args,
             f"--{'' if early == 'on' else 'no-'}early-start"],
            {"BATCHRUN_FAKE_ENGINE": json.dumps(FAKE_ENGINE)})
    s = json.loads(stdout)
    ideal = s["plan"]["block_ideal_computed_tokens"]
    return {"bench": "ideal", "engine": engine, "early_start": early,
            "early_runs": s["early_start"]["runs"],
            "time_to_first_step_s": s["time_to_first_step_s"],
            "kv": kv if engine == "sim" else "4M tokens",
            "rows": rows, "budget": budget, "shards": s["shards"]["count"],
            "computed": s["tokens"]["computed_prompt"], "block_ideal": ideal,
            "computed_vs_ideal": round(s["tokens"]["computed_prompt"] / ideal, 4),
            "steps": s.get("simulated", {}).get("steps"),
            "wall_s": round(wall, 1), "peak_rss_gib": round(rss / 2**30, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("run", "plan", "ideal", "resume"))
    ap.add_argument("--rows", default="1000000", help="comma-separated sizes")
    ap.add_argument("--memory-budget", default=None, help="batchrun's --memory-budget")
    ap.add_argument("--check", action="store_true", help="plan: compare with the in-memory tree")
    ap.add_argument("--engine", choices=("sim", "fake"), default="sim",
                    help="ideal: the engine (sim: vLLM's scheduler and cache, no model)")
    ap.add_argument("--kv", default="4GiB", help="ideal, sim: the KV cache")
    ap.add_argument("--early-start", choices=("on", "off", "both"), default="on",
                    help="run, ideal: batchrun's --early-start / --no-early-start; both: "
                         "off then on, side by side, with their ratios")
    ap.add_argument("--kill-read", type=float, default=0.1,
                    help="resume: the first kill, once this share of the rows has run "
                         "while the job is still read")
    ap.add_argument("--kill-run", type=float, default=0.6,
                    help="resume: the second kill, once this share has run after the read")
    args = ap.parse_args()
    modes = ("off", "on") if args.early_start == "both" else (args.early_start,)
    for rows in (int(r) for r in args.rows.split(",")):
        if args.what == "plan":
            print(json.dumps(bench_plan(rows, args.memory_budget, args.check)), flush=True)
            continue
        if args.what == "resume":
            print(json.dumps(bench_resume(rows, args.memory_budget, args.kill_read,
                                          args.kill_run)), flush=True)
            continue
        results = {}
        for mode in modes:
            results[mode] = bench_run(rows, args.memory_budget, mode) if args.what == "run" \
                else bench_ideal(rows, args.memory_budget or "256MiB", args.engine, args.kv, mode)
            print(json.dumps(results[mode]), flush=True)
        if len(results) == 2:
            on, off = results["on"], results["off"]
            print(json.dumps({"rows": rows, "on_vs_off": {
                key: round(on[key] / off[key], 4) for key in (
                    "time_to_first_step_s", "wall_s", "peak_rss_gib",
                    "computed_prompt_tokens" if args.what == "run" else "computed")
                if on.get(key) and off.get(key)}}), flush=True)


if __name__ == "__main__":
    main()
