"""batchrun vs plain vLLM on synthetic jobs, side by side in one run on one engine.

Plain vLLM is what `LLM.generate(rows)` does: the file read and tokenized, every request
added in file order, prefix caching on, the engine's scheduler left to itself. batchrun is
`run_job` (prefix tree, plan, KV-sized window, one prefix computation per group). Both run
on the same started engine (same settings); the prefix cache is reset before each
contender. The KV cache is small on purpose (`--kv-cache-memory`, default 256MiB): real
jobs are far larger than the cache.

    python benchmarks/bench_planner_e2e.py                    # all jobs
    python benchmarks/bench_planner_e2e.py --jobs rag,unshared --kv-cache-memory 1GiB
    python benchmarks/bench_planner_e2e.py --jobs unshared --rounds 3   # parity needs rounds
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from synthetic import JOBS, write_job  # noqa: E402

from batchrun.config import EngineOptions, JobConfig, parse_size  # noqa: E402


def run_plain(engine, cfg, *, sort: bool = False) -> dict:
    """All requests in file order (or sorted by prompt token ids: a careful user's fix), as
    LLM.generate would add them. Reading the file and tokenizing it count, as they do for
    batchrun: LLM.generate tokenizes its prompts too."""
    from batchrun.runner import prepare_job, request_factory

    t0 = time.perf_counter()
    job = prepare_job(replace(cfg, plan=False))
    make = request_factory(job)
    order = range(len(job.tokens.positions))
    if sort:
        order = sorted(order, key=job.tokens.tokens)
    for i in order:
        engine.add(make(i))
    prompt = cached = completion = 0
    while engine.num_unfinished():
        for r in engine.step().finished:
            prompt, cached = prompt + r.prompt_tokens, cached + r.cached_tokens
            completion += r.completion_tokens
    wall = time.perf_counter() - t0
    return {"wall": wall, "computed": prompt - cached, "prompt": prompt, "completion": completion}


def run_batchrun(engine, cfg) -> dict:
    from batchrun.runner import run_job

    t0 = time.perf_counter()
    outcome = run_job(cfg, engine=engine, interactive=False, handle_signals=False,
                      overwrite=True)
    wall = time.perf_counter() - t0
    s = outcome.summary
    return {"wall": wall, "computed": s["tokens"]["computed_prompt"],
            "prompt": s["tokens"]["prompt"], "completion": s["tokens"]["completion"],
            "ideal": s["plan"]["block_ideal_computed_tokens"],
            "distinct": s["plan"]["distinct_prompt_tokens"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", default=",".join(JOBS))
    ap.add_argument("--kv-cache-memory", default="256MiB")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", action=argparse.BooleanOptionalAction, default=True,
                    help="run A-B-B-A and average (default) instead of A-B once")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat the A-B-B-A this many times; the spread column shows the "
                         "lowest and highest speedup of a single round")
    args = ap.parse_args()

    from batchrun.engine.vllm_engine import VllmEngine
    from batchrun.model import default_model_dir
    from batchrun.runner import prepare_job

    options = EngineOptions(kv_cache_memory=parse_size(args.kv_cache_memory),
                            max_model_len=4096, enforce_eager=True, attention="default")
    engine = VllmEngine(default_model_dir(), options, enforce_eager=True)
    print(f"engine: {engine.info.settings}  KV capacity {engine.info.kv_capacity_tokens} tokens")
    header = (f"{'job':<15} {'rows':>5} {'prompt':>8} {'ideal':>7} {'plain':>7} {'sorted':>7} "
              f"{'batchrun':>8} {'br/ideal':>8} {'plain/ideal':>11} {'speedup':>7} "
              f"{'spread':>11}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.jobs.split(","):
            path = write_job(name, Path(tmp), seed=args.seed)
            cfg = JobConfig(input=path, output=Path(tmp) / f"{name}.parquet", engine=options)
            job = prepare_job(cfg)
            # A-B-B-A: the machine is shared and its speed drifts; alternating cancels a drift.
            runs: dict[str, list[dict]] = {"plain": [], "sorted": [], "ours": []}
            ratios = []
            order = ("plain", "sorted", "ours", "ours", "sorted", "plain")
            for _ in range(args.rounds):
                walls = {"plain": 0.0, "sorted": 0.0, "ours": 0.0}
                for contender in order[:6 if args.repeat else 3]:
                    engine.reset_prefix_cache()
                    run = (run_batchrun(engine, cfg) if contender == "ours"
                           else run_plain(engine, cfg, sort=contender == "sorted"))
                    runs[contender].append(run)
                    walls[contender] += run["wall"]
                ratios.append(min(walls["plain"], walls["sorted"]) / walls["ours"])
            plain, best, ours = (dict(r[0], wall=sum(x["wall"] for x in r) / len(r))
                                 for r in (runs["plain"], runs["sorted"], runs["ours"]))
            if plain["wall"] < best["wall"]:
                best = plain
            rows.append((name, job.rows, plain, ours))
            print(header if len(rows) == 1 else "", end="\n" if len(rows) == 1 else "")
            print(f"{name:<15} {job.rows:>5} {ours['prompt']:>8} {ours['ideal']:>7} "
                  f"{plain['computed']:>7} {runs['sorted'][0]['computed']:>7} "
                  f"{ours['computed']:>8} {ours['computed'] / ours['ideal']:>8.3f} "
                  f"{plain['computed'] / ours['ideal']:>11.3f} "
                  f"{best['wall'] / ours['wall']:>6.2f}x "
                  f"{min(ratios):>6.2f}-{max(ratios):.2f}", flush=True)
    print("\nspeedup = the better of plain (file order) and sorted wall time / batchrun wall "
          "time (same engine, same rows, one run); "
          "spread = the lowest and highest speedup of one round; "
          "computed = prompt tokens not served from the prefix cache; ideal = block-granular "
          "ideal (each request reuses its longest shared prefix, rounded down to the block)")
    engine.close()


if __name__ == "__main__":
    main()
