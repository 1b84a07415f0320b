"""batchrun against plain vLLM, whole commands side by side: what a user runs, timed.

Three contenders per job, each a fresh process that starts its own engine (start-up counted
in all three), same model and engine settings, same KV cache:
  batchrun   `batchrun run JOB -o OUT --kv-cache-memory KV --enforce-eager` (the CLI, its
             defaults but one: eager like the baselines, which a job asking for over 13k new
             tokens in all, as `tasks` does, would otherwise change to compiled)
  file       benchmarks/plain_vllm.py --order file: every row to LLM.generate in file order
  sorted     benchmarks/plain_vllm.py --order sorted: rows sorted by prompt token ids first
Each round runs them B F S S F B (the machine is shared and its speed drifts; mirrored order
cancels a linear drift). The ratio is the BETTER baseline's wall time over batchrun's, per
round. Also shown: prompt tokens computed (not served from the prefix cache), the mean
running batch over the last 10% of each run (the tail), duplicates served, shared prefixes
batchrun found light and deferred (`light`), peak RSS of each process, and the seconds each
command spent outside generating (`out-b`: batchrun's wall time less its run stage; `out-s`:
the sorted baseline's less LLM.generate; start-up, reading, tokenizing, writing).

    python benchmarks/bench_e2e.py                          # the default job list
    python benchmarks/bench_e2e.py --jobs mixed --kv 256MiB,1GiB --rounds 2
    python benchmarks/bench_e2e.py --large-kv 1GiB   # and batchrun alone at a large cache
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from synthetic import write_job  # noqa: E402

BATCHRUN = [sys.executable, "-m", "batchrun"]
PLAIN = [sys.executable, str(HERE / "plain_vllm.py")]
DEFAULT_JOBS = "mixed,reports,tasks,duplicates,prefix,fewshot,rag,multiturn,unshared"


def timed(cmd: list[str]) -> tuple[float, int, str]:
    """Wall seconds, peak RSS (MiB) and stdout of one process."""
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=env)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) not in (0, 3):
        raise SystemExit(f"failed ({status}): {' '.join(cmd)}")
    return wall, usage.ru_maxrss // 1024, out


def run_batchrun(job: Path, out: Path, kv: str) -> dict:
    wall, rss, stdout = timed([*BATCHRUN, "run", str(job), "-o", str(out), "--kv-cache-memory",
                               kv, "--enforce-eager", "--overwrite", "--json", "--log-lines"])
    s = json.loads(stdout)
    return {"wall": wall, "rss": rss, "computed": s["tokens"]["computed_prompt"],
            "completion": s["tokens"]["completion"], "tail": s["batch"]["tail_batch"],
            "deferred": s["batch"]["deferred_light_prefixes"],
            "ideal": s["plan"].get("block_ideal_computed_tokens"),
            "duplicates": s["duplicate_rows"], "kv_tokens": s["plan"].get("kv_capacity_tokens"),
            "outside": wall - s["stages"]["run"]["seconds"]}


def run_plain(job: Path, out: Path, kv: str, order: str, max_model_len: int) -> dict:
    wall, rss, stdout = timed([*PLAIN, str(job), str(out), "--order", order, "--kv-cache-memory",
                               kv, "--max-model-len", str(max_model_len)])
    s = json.loads(stdout.strip().splitlines()[-1])
    return {"wall": wall, "rss": rss, "computed": s["computed_prompt"],
            "completion": s["completion"], "tail": s["tail_batch"],
            "outside": wall - s["generate_s"]}


def max_model_len_for(job: Path, kv: str) -> int:
    """The context batchrun gives the job: the plain runs get the same."""
    out = subprocess.run([*BATCHRUN, "plan", str(job), "--kv-cache-memory", kv, "--json"],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(HERE.parent)}).stdout
    return json.loads(out)["engine_sizing"]["max_model_len"]


def bench_job(name: str, kv: str, rounds: int, tmp: Path, large_kv: str | None = None) -> dict:
    """B F S S F B per round at `kv`; with `large_kv`, batchrun also runs at that cache at
    both ends of each round (B+ ... B+), to show what KV pressure costs it."""
    job = write_job(name, tmp, fmt="parquet" if name == "prefix" else "jsonl")
    context = max_model_len_for(job, kv)
    runs: dict[str, list[dict]] = {"batchrun": [], "file": [], "sorted": [], "large": []}
    order = ("batchrun", "file", "sorted", "sorted", "file", "batchrun")
    if large_kv:
        order = ("large", *order, "large")
    ratios = []
    for _ in range(rounds):
        walls: dict[str, float] = {k: 0.0 for k in runs}
        for who in order:
            out = tmp / f"{name}-{who}.parquet"
            if who in ("batchrun", "large"):
                run = run_batchrun(job, out, large_kv if who == "large" else kv)
            else:
                run = run_plain(job, out, kv, who, context)
            runs[who].append(run)
            walls[who] += run["wall"]
        ratios.append(min(walls["file"], walls["sorted"]) / walls["batchrun"])
    return {"job": name, "kv": kv, "large_kv": large_kv, "runs": runs, "ratios": ratios}


def report(result: dict) -> str:
    runs = result["runs"]
    med = {k: statistics.median(r["wall"] for r in v) if v else 0.0 for k, v in runs.items()}
    b, f, s = (runs[k][0] for k in ("batchrun", "file", "sorted"))
    r = result["ratios"]
    return (f"{result['job']:<11} {result['kv']:>6} {med['batchrun']:>8.1f} {med['file']:>7.1f} "
            f"{med['sorted']:>7.1f} {statistics.mean(r):>6.2f}x {min(r):.2f}-{max(r):.2f} "
            f"{b['computed']:>8} {f['computed']:>7} {s['computed']:>7} {b['ideal'] or 0:>7} "
            f"{b['tail']:>6.1f} {f['tail']:>6.1f} {s['tail']:>6.1f} {b['duplicates']:>4} "
            f"{b['deferred']:>5} {max(x['rss'] for x in runs['batchrun']):>6} "
            f"{max(x['rss'] for x in runs['sorted']):>6} {med['large']:>7.1f} "
            f"{runs['large'][0]['tail'] if runs['large'] else 0:>6.1f} "
            f"{statistics.median(x['outside'] for x in runs['batchrun']):>6.1f} "
            f"{statistics.median(x['outside'] for x in runs['sorted']):>6.1f}")


HEADER = (f"{'job':<11} {'kv':>6} {'batchrun':>8} {'file':>7} {'sorted':>7} {'ratio':>7} "
          f"{'spread':>9} {'computed':>8} {'file':>7} {'sorted':>7} {'ideal':>7} "
          f"{'tail':>6} {'file':>6} {'sorted':>6} {'dups':>4} {'light':>5} {'rss':>6} {'rss-s':>6} "
          f"{'b@large':>7} {'tail':>6} {'out-b':>6} {'out-s':>6}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", default=DEFAULT_JOBS)
    ap.add_argument("--kv", default="256MiB", help="KV cache sizes, comma-separated")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--large-kv", help="also run batchrun alone at this KV cache (e.g. 1GiB)")
    ap.add_argument("--json-out", type=Path, help="also write every run's figures here")
    args = ap.parse_args()
    results = []
    print("wall seconds (median of each contender's runs); ratio = better baseline / batchrun "
          "per round (mean, spread); computed = prompt tokens not from the prefix cache; "
          "tail = mean running batch over the last 10% of the run; rss in MiB; out = seconds "
          "outside generating\n" + HEADER,
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.jobs.split(","):
            for kv in args.kv.split(","):
                result = bench_job(name, kv, args.rounds, Path(tmp), args.large_kv)
                results.append(result)
                print(report(result), flush=True)
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
