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
    python benchmarks/bench_planner_e2e.py --attention default,prefix,auto --no-enforce-eager

`--attention` takes several modes: each runs every job on its own engine (vLLM picks the
attention backend when an engine starts). `auto` asks the runner which backend each job's
plan calls for (`job.engine_setup.choose_job_attention`, before any engine starts, as `batchrun run`
does) and runs the job on an engine started with that choice. With more than one mode, a last
table compares batchrun's wall time across them.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
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
    from dataclasses import replace

    from batchrun.ingest.prepare import prepare_job, request_factory

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
    from batchrun.job.run import run_job

    t0 = time.perf_counter()
    outcome = run_job(cfg, engine=engine, interactive=False, handle_signals=False,
                      overwrite=True)
    wall = time.perf_counter() - t0
    s = outcome.summary
    return {"wall": wall, "computed": s["tokens"]["computed_prompt"],
            "prompt": s["tokens"]["prompt"], "completion": s["tokens"]["completion"],
            "ideal": s["plan"]["block_ideal_computed_tokens"],
            "distinct": s["plan"]["distinct_prompt_tokens"], "attention": s.get("attention", {})}


def start_engine(options, attention=None):
    from batchrun.engine.vllm_engine import VllmEngine
    from batchrun.model import default_model_dir

    engine = VllmEngine(default_model_dir(), options, enforce_eager=options.enforce_eager,
                        attention=attention)
    print(f"engine: {engine.info.settings}  KV capacity {engine.info.kv_capacity_tokens} "
          f"tokens; attention: {engine.attention.reason}", flush=True)
    return engine


def engines_for(mode: str, options, cfgs: dict):
    """(job name, engine) in job order; ``auto`` starts one engine per choice the jobs make
    (at most two: batchrun's backend or vLLM's), each closed when no later job needs it."""
    from batchrun.ingest.prepare import prepare_job
    from batchrun.job.engine_setup import choose_job_attention

    if mode != "auto":
        engine = start_engine(options)
        for name in cfgs:
            yield name, engine
        engine.close()
        return
    choices = {name: choose_job_attention(prepare_job(cfg)) for name, cfg in cfgs.items()}
    for key in dict.fromkeys((c.vllm_backend, c.engine_mode) for c in choices.values()):
        names = [n for n, c in choices.items() if (c.vllm_backend, c.engine_mode) == key]
        engine = start_engine(options, choices[names[0]])
        for name in names:
            print(f"{name}: {choices[name].reason}", flush=True)
            yield name, engine
        engine.close()


def run_mode(mode: str, args, cfgs: dict, jobs: dict) -> dict:
    """Plain vLLM vs batchrun on every job, on the engine(s) of attention ``mode``."""
    from dataclasses import replace

    options = EngineOptions(kv_cache_memory=parse_size(args.kv_cache_memory),
                            max_model_len=4096, enforce_eager=args.enforce_eager,
                            attention=mode)
    cfgs = {name: replace(cfg, engine=options) for name, cfg in cfgs.items()}
    header = (f"{'job':<15} {'rows':>5} {'prompt':>8} {'ideal':>7} {'plain':>7} {'sorted':>7} "
              f"{'batchrun':>8} {'br/ideal':>8} {'plain/ideal':>11} {'speedup':>7} "
              f"{'spread':>11} {'attention ran':<16} {'prefix share':>12}")
    results = {}
    print(f"\n== --attention {mode}")
    for name, engine in engines_for(mode, options, cfgs):
        cfg = cfgs[name]
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
            # Against the better of the two baselines.
            ratios.append(min(walls["plain"], walls["sorted"]) / walls["ours"])
        plain, best, ours = (dict(r[0], wall=sum(x["wall"] for x in r) / len(r))
                             for r in (runs["plain"], runs["sorted"], runs["ours"]))
        sorted_computed = best["computed"]
        best = min(plain, best, key=lambda r: r["wall"])
        results[name] = (best, ours)
        attention = ours["attention"]
        print(header if len(results) == 1 else "", end="\n" if len(results) == 1 else "")
        print(f"{name:<15} {jobs[name]:>5} {ours['prompt']:>8} {ours['ideal']:>7} "
              f"{plain['computed']:>7} {sorted_computed:>7} {ours['computed']:>8} "
              f"{ours['computed'] / ours['ideal']:>8.3f} "
              f"{plain['computed'] / ours['ideal']:>11.3f} "
              f"{best['wall'] / ours['wall']:>6.2f}x "
              f"{min(ratios):>6.2f}-{max(ratios):.2f} "
              f"{attention.get('backend', '-'):<16} {attention.get('prefix_share', 0):>12.2f}",
              flush=True)
    return results


def compare_modes(modes: list[str], results: dict) -> None:
    """batchrun's wall time per mode, and each against plain vLLM on vLLM's own attention."""
    if len(modes) < 2:
        return
    base = "default" if "default" in modes else modes[0]
    print(f"\nbatchrun wall time (s) by --attention; x = {base}'s time / this time; "
          f"vs plain = plain vLLM ({base}) / this")
    print(f"{'job':<15} " + " ".join(f"{m:>22}" for m in modes))
    for name in results[base]:
        plain = results[base][name][0]["wall"]
        cells = []
        for m in modes:
            ours = results[m][name][1]["wall"]
            cells.append(f"{ours:7.2f} {results[base][name][1]['wall'] / ours:5.2f}x "
                         f"{plain / ours:5.2f}x")
        print(f"{name:<15} " + " ".join(f"{c:>22}" for c in cells))


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
    ap.add_argument("--attention", default="default",
                    help="comma-separated attention modes (default, prefix, auto); each runs "
                         "every job on its own engine")
    ap.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True,
                    help="eager vLLM (default; fast start on CPU); --no-enforce-eager "
                         "compiles, with CUDA graphs on a GPU")
    args = ap.parse_args()
    modes = args.attention.split(",")

    from batchrun.ingest.prepare import prepare_job

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        cfgs, jobs = {}, {}
        for name in args.jobs.split(","):
            path = write_job(name, Path(tmp), seed=args.seed)
            cfgs[name] = JobConfig(input=path, output=Path(tmp) / f"{name}.parquet")
            jobs[name] = prepare_job(cfgs[name]).rows
        for mode in modes:
            results[mode] = run_mode(mode, args, cfgs, jobs)
    print("\nspeedup = the better of plain (file order) and sorted wall time / batchrun wall "
          "time (same engine, same rows, one run); "
          "spread = the lowest and highest speedup of one round; "
          "computed = prompt tokens not served from the prefix cache; ideal = block-granular "
          "ideal (each request reuses its longest shared prefix, rounded down to the block); "
          "attention ran = the backend whose attention calls batchrun's run counted (vllm: "
          "batchrun's ran none)")
    compare_modes(modes, results)


if __name__ == "__main__":
    main()
