"""Many fine-tunes in one job: batchrun against plain vLLM with the same LoRARequests, whole
commands side by side.

The job: ROWS rows sharing one system prompt, spread evenly over three random rank-8 LoRA
adapters (made here, tests/lora_adapters.py) and the base model, in shuffled file order; each
prompt ends where the model continues. Contenders, each a fresh process with its own engine:
  batchrun   `batchrun run JOB -o OUT --adapter ... --kv-cache-memory KV --enforce-eager`
  file       benchmarks/plain_vllm.py --order file: LLM.generate, rows in file order
  sorted     benchmarks/plain_vllm.py --order sorted: rows sorted by (adapter, tokens)
at two settings of max_loras: the default (batchrun sizes it from the job; the baselines get
one slot per adapter, as a user who read the docs would set) and 1 for all. Run in the order
B F S S F B (a drifting machine). Prints wall times, the ratio of the better baseline's time
to batchrun's, and computed prompt tokens against the block ideal counted per adapter.

    python benchmarks/bench_lora.py --rows 600
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench_e2e import timed  # noqa: E402

BATCHRUN = [sys.executable, "-m", "batchrun"]
PLAIN = [sys.executable, str(HERE / "plain_vllm.py")]
ADAPTERS = ("support", "legal", "sales")
SYSTEM = ("You are the assistant of a company that sells garden tools. Answer in one short "
          "sentence, in a friendly tone, and never mention competitors. Our catalogue has "
          "spades, rakes, hoes, shears, wheelbarrows and hoses; delivery takes three days. ")


def write_job(folder: Path, rows: int, max_tokens: int) -> tuple[Path, dict[str, Path]]:
    from batchrun.model import default_model_dir
    from tests.lora_adapters import write_random_adapter

    model = default_model_dir()
    adapters = {name: write_random_adapter(folder / "adapters" / name, model, seed=k + 1)
                for k, name in enumerate(ADAPTERS)}
    rng = random.Random(0)
    items = ["spade", "rake", "hoe", "pair of shears", "wheelbarrow", "hose"]
    lines = []
    for i in range(rows):
        model_name = (None, *ADAPTERS)[i % 4]
        text = (f"{SYSTEM}Customer {i} asked about the {rng.choice(items)} they ordered on "
                f"day {rng.randint(1, 300)}. The answer to customer {i} is that")
        lines.append({"id": f"q{i}", "prompt": text, "max_tokens": max_tokens,
                      **({"adapter": model_name} if model_name else {})})
    rng.shuffle(lines)
    path = folder / "job.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path, adapters


def run_batchrun(job: Path, out: Path, adapters: dict[str, Path], kv: str,
                 max_loras: int | None) -> dict:
    flags = [a for name, folder in adapters.items() for a in ("--adapter", f"{name}={folder}")]
    wall, rss, stdout = timed([*BATCHRUN, "run", str(job), "-o", str(out), *flags,
                               "--kv-cache-memory", kv, "--enforce-eager", "--overwrite",
                               "--json", "--log-lines",
                               *(["--max-loras", str(max_loras)] if max_loras else [])])
    s = json.loads(stdout)
    return {"wall_s": wall, "rss_mib": rss, "computed": s["tokens"]["computed_prompt"],
            "ideal": s["plan"]["block_ideal_computed_tokens"],
            "ideal_per_adapter": {k: v["block_ideal_computed_tokens"]
                                  for k, v in s["plan"]["adapters"].items()}}


def run_plain(job: Path, out: Path, adapters: dict[str, Path], kv: str, order: str,
              max_loras: int | None, max_model_len: int) -> dict:
    flags = [a for name, folder in adapters.items() for a in ("--adapter", f"{name}={folder}")]
    wall, rss, stdout = timed([*PLAIN, str(job), str(out), "--order", order, *flags,
                               "--kv-cache-memory", kv, "--max-model-len", str(max_model_len),
                               *(["--max-loras", str(max_loras)] if max_loras else [])])
    s = json.loads(stdout.strip().splitlines()[-1])
    return {"wall_s": wall, "rss_mib": rss, "computed": s["computed_prompt"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=600)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--kv", default="256MiB")
    ap.add_argument("--max-loras", default="default,1", help="settings to run, e.g. default,1")
    ap.add_argument("--once", action="store_true", help="B F S only, not B F S S F B")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
        folder = Path(tmp)
        job, adapters = write_job(folder, args.rows, args.max_tokens)
        for setting in args.max_loras.split(","):
            slots = None if setting == "default" else int(setting)
            plain_slots = slots or len(adapters)
            runs: dict[str, list[dict]] = {"batchrun": [], "file": [], "sorted": []}
            order = ("batchrun", "file", "sorted", "sorted", "file", "batchrun")
            for who in order[:3] if args.once else order:
                out = folder / f"{who}.parquet"
                if who == "batchrun":
                    runs[who].append(run_batchrun(job, out, adapters, args.kv, slots))
                else:
                    runs[who].append(run_plain(job, out, adapters, args.kv, who, plain_slots,
                                               1024))
                print(setting, who, json.dumps(runs[who][-1]), flush=True)
            best = {who: min(r["wall_s"] for r in rs) for who, rs in runs.items()}
            b = runs["batchrun"][0]
            print(json.dumps({
                "max_loras": setting, "rows": args.rows, "wall_s": best,
                "ratio_vs_better_baseline": min(best["file"], best["sorted"]) / best["batchrun"],
                "computed_prompt": {who: rs[0]["computed"] for who, rs in runs.items()},
                "block_ideal_per_adapter": b["ideal_per_adapter"],
                "block_ideal": b["ideal"]}), flush=True)


if __name__ == "__main__":
    main()
