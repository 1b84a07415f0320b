"""Constrained vs unconstrained: the classification example with its `choices`, and the same
rows free, side by side in one run on one engine.

The example job (jobs/classify.toml: reviews -> POSITIVE / NEGATIVE / MIXED, top_logprobs 2)
is run as it is, and again without `choices`, everything else equal. The free run gets
max_tokens 4, the tokens a label takes (3, and the end of sequence), so both runs decode about
as many tokens per row and the difference is the constraint's own cost (xgrammar's token mask
each step, applied to the logits), not a different amount of text. The rows are the example's
40 reviews, copied `--copies` times with a distinct review number each (prompts differ, the
system prompt is shared as in the example).

Before the A-B-B-A rounds (and an untimed warm-up run of each) it times single requests on
the fresh engine, straight through its add/step interface: the first constrained request pays
for setting up vLLM's grammar backend (xgrammar's view of the 49k-token vocabulary) and
compiling its grammar; a new choice list or schema pays for its compile only; vLLM's xgrammar
caches compiled grammars by their text, so rows repeating a constraint reuse them.

    python benchmarks/bench_structured.py                 # 5 copies (200 rows), 2 rounds
    python benchmarks/bench_structured.py --copies 10 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from batchrun.job_file import load_job_file, with_overrides  # noqa: E402

LABEL_TOKENS = 4  # "POS" "IT" "IVE" <|im_end|>: what a label takes with SmolLM2's tokenizer


def write_rows(path: Path, copies: int) -> int:
    rows = [json.loads(line) for line in (REPO / "examples" / "reviews.jsonl").open()]
    with open(path, "w") as f:
        for k in range(copies):
            for row in rows:
                messages = [dict(m) for m in row["messages"]]
                messages[-1]["content"] = f"Review #{k + 1}-{row['id']}: " + \
                    messages[-1]["content"].removeprefix("Review: ")
                f.write(json.dumps({**row, "id": f"{row['id']}-{k}", "messages": messages})
                        + "\n")
    return len(rows) * copies


def timed(engine, cfg) -> dict:
    from batchrun.job.run import run_job

    engine.reset_prefix_cache()
    t0 = time.perf_counter()
    outcome = run_job(cfg, engine=engine, interactive=False, handle_signals=False,
                      overwrite=True)
    wall = time.perf_counter() - t0
    s = outcome.summary
    assert outcome.exit_code == 0, s
    return {"wall": wall, "rows": s["rows"], "completion": s["tokens"]["completion"],
            "prompt": s["tokens"]["prompt"], "cached": s["tokens"]["cached"],
            "backends": s["structured_outputs"].get("backends", {})}


def one_time_costs(engine) -> None:
    """Latency of single requests (one review) through the engine: free, then constrained."""
    from batchrun.engine.base import GenerationRequest
    from batchrun.ingest.tokenize import HFTokenizer
    from batchrun.model import default_model_dir
    from batchrun.structured import CHOICE, JSON_SCHEMA, Constraint

    tokenizer = HFTokenizer(default_model_dir())
    row = json.loads((REPO / "examples" / "reviews.jsonl").open().readline())
    prompt = tokenizer.encode_rendered([tokenizer.render_chat(row["messages"])])[0]
    ticket = (REPO / "jobs" / "schemas" / "ticket.json").read_text()
    counter = iter(range(10**6))

    def latency(constraint: Constraint | None, max_tokens: int) -> float:
        engine.reset_prefix_cache()
        t0 = time.perf_counter()
        engine.add(GenerationRequest(f"one-{next(counter)}", prompt, max_tokens,
                                     constraint=constraint))
        while engine.num_unfinished():
            engine.step()
        return time.perf_counter() - t0

    labels = Constraint(CHOICE, json.dumps(["POSITIVE", "NEGATIVE", "MIXED"]))
    latency(None, LABEL_TOKENS)  # the engine's first request warms it up
    print("single request, seconds: free {:.3f}; first constrained {:.3f} (grammar backend "
          "set-up + compile); same choices again {:.3f}; new choices {:.3f}; a JSON schema "
          "(jobs/schemas/ticket.json, 64 tokens) first {:.3f}, again {:.3f}; free again {:.3f}"
          .format(latency(None, LABEL_TOKENS), latency(labels, 9), latency(labels, 9),
                  latency(Constraint(CHOICE, json.dumps(["GOOD", "BAD", "BOTH"])), 9),
                  latency(Constraint(JSON_SCHEMA, ticket), 64),
                  latency(Constraint(JSON_SCHEMA, ticket), 64), latency(None, LABEL_TOKENS)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=5, help="copies of the 40 example rows")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of A-B-B-A")
    args = ap.parse_args()

    from batchrun.engine.vllm_engine import VllmEngine
    from batchrun.model import default_model_dir

    example = load_job_file(REPO / "jobs" / "classify.toml")
    engine = VllmEngine(default_model_dir(), example.engine, enforce_eager=True)
    print(f"engine: {engine.info.settings}")
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        n = write_rows(tmp / "reviews.jsonl", args.copies)
        constrained = replace(example, input=tmp / "reviews.jsonl",
                              output=tmp / "constrained.parquet")
        free = with_overrides(constrained, **{
            "output": tmp / "free.parquet", "sampling.choices": (),
            "sampling.max_tokens": LABEL_TOKENS})

        one_time_costs(engine)
        for cfg in (free, constrained):  # warm-up: the first batch of this size is slower
            timed(engine, cfg)

        runs: dict[str, list[dict]] = {"constrained": [], "free": []}
        ratios = []
        for _ in range(args.rounds):
            walls = {"constrained": 0.0, "free": 0.0}
            for name in ("free", "constrained", "constrained", "free"):
                run = timed(engine, constrained if name == "constrained" else free)
                runs[name].append(run)
                walls[name] += run["wall"]
            ratios.append(walls["free"] / walls["constrained"])
    engine.close()

    print(f"\n{n} rows, {args.rounds} round(s) of A-B-B-A (free, constrained, constrained, "
          "free)")
    print(f"{'run':<12} {'wall s':>7} {'rows/s':>7} {'gen tok/s':>9} {'tok/row':>7} "
          f"{'cached':>7}  backends")
    mean = {}
    for name, rs in runs.items():
        wall = sum(r["wall"] for r in rs) / len(rs)
        completion = rs[0]["completion"]
        mean[name] = wall
        print(f"{name:<12} {wall:>7.2f} {n / wall:>7.2f} {completion / wall:>9.1f} "
              f"{completion / n:>7.2f} {rs[0]['cached'] / rs[0]['prompt']:>7.1%}  "
              f"{rs[0]['backends'] or '-'}")
    c, f = runs["constrained"][0]["completion"], runs["free"][0]["completion"]
    print(f"\nconstrained / free throughput: rows/s {mean['free'] / mean['constrained']:.2f}x, "
          f"generated tokens/s {(c / mean['constrained']) / (f / mean['free']):.2f}x; "
          f"per-round rows/s ratio {min(ratios):.2f}-{max(ratios):.2f}")


if __name__ == "__main__":
    main()
