"""batchrun's embedding job against vLLM's own `LLM.embed`, whole commands side by side.

Both read the same JSONL file of mixed-length texts and write the vectors to Parquet, in
input order; each is timed as the whole command a user would run (start-up, reading,
tokenizing, embedding, writing), one after the other on the same machine:

    batchrun: python -m batchrun run in.jsonl -o out.parquet --task embed
    vLLM:     python bench_embed.py --vllm in.jsonl out.parquet   (LLM(runner="pooling").embed)

Run twice: all texts distinct, and 25% of the rows repeating an earlier row's text (batchrun
embeds each distinct text once). Both run eager (--enforce-eager; vLLM's enforce_eager=True)
unless --compile. Prints the ratios; the machine's load average is printed beside them (this
machine is shared: a figure taken under load is noisier).

    python benchmarks/bench_embed.py --rows 20000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the a library keeps old maps of river valley while students read quietly about "
         "trains ships weather markets music history small towns near mountains engine "
         "vector search query document answer index record field table column").split()


def write_texts(path: Path, rows: int, duplicate_share: float, seed: int = 0) -> None:
    """`rows` texts of 3 to 200 words (most short, some long), a `duplicate_share` of them
    repeating an earlier row's text."""
    rng = random.Random(seed)
    texts: list[str] = []
    for i in range(rows):
        if i and rng.random() < duplicate_share:
            texts.append(texts[rng.randrange(i)])
            continue
        n = min(200, int(rng.lognormvariate(3.0, 0.9)) + 3)
        texts.append(f"{i} " + " ".join(rng.choice(WORDS) for _ in range(n)))
    with open(path, "w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": f"r{i}", "input": t}) + "\n")


def vllm_embed(source: str, target: str, eager: bool) -> None:
    """What a user of vLLM alone writes: read the file, LLM.embed all texts, write Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from vllm import LLM

    from batchrun.model import default_embed_model_dir

    rows = [json.loads(line) for line in open(source)]
    kv = {"kv_cache_memory_bytes": 256 << 20} if os.environ.get("VLLM_TARGET_DEVICE",
                                                                 "cpu") == "cpu" else {}
    llm = LLM(model=str(default_embed_model_dir()), runner="pooling", dtype="float32",
              enforce_eager=eager, **kv)
    outputs = llm.embed([r["input"] for r in rows], use_tqdm=False)
    vectors = [o.outputs.embedding for o in outputs]
    pq.write_table(pa.table({"id": [r["id"] for r in rows],
                             "embedding": pa.array(vectors, pa.list_(pa.float32()))}), target)


def timed(command: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    start = time.monotonic()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode not in (0, 3):
        raise SystemExit(f"{command[:4]} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_embed"))
    parser.add_argument("--vllm", nargs=2, metavar=("IN", "OUT"))
    args = parser.parse_args()
    if args.vllm:
        vllm_embed(*args.vllm, eager=not args.compile)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    eager = [] if args.compile else ["--enforce-eager"]
    for share in (0.0, 0.25):
        source = args.work / f"texts-{share}.jsonl"
        write_texts(source, args.rows, share)
        ours_cmd = [sys.executable, "-m", "batchrun", "run", str(source), "-o",
                    str(args.work / "batchrun.parquet"), "--task", "embed", "--overwrite",
                    *eager]
        theirs_cmd = [sys.executable, __file__, "--vllm", str(source),
                      str(args.work / "vllm.parquet"), *(["--compile"] if args.compile else [])]
        ratios = []
        for k in range(args.repeat):  # alternate who goes first: the load drifts
            if k % 2:
                theirs, ours = timed(theirs_cmd), timed(ours_cmd)
            else:
                ours, theirs = timed(ours_cmd), timed(theirs_cmd)
            ratios.append(theirs / ours)
            print(f"{args.rows:,} rows, {share:.0%} duplicates: batchrun {ours:.1f}s, "
                  f"vLLM LLM.embed {theirs:.1f}s, speedup {theirs / ours:.2f}x "
                  f"(load average {os.getloadavg()[0]:.1f})", flush=True)
        print(f"  median speedup {sorted(ratios)[len(ratios) // 2]:.2f}x", flush=True)


if __name__ == "__main__":
    main()
