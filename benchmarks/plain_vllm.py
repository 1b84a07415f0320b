"""The baseline a careful user writes instead of batchrun: read the file, hand every row to
vLLM's offline `LLM.generate` (prefix caching on), write Parquet. `--order sorted` first
sorts the rows by their prompt token ids (the one-line fix that puts shared prefixes
together); `--order file` keeps the file's order.

    python benchmarks/plain_vllm.py in.jsonl out.parquet --order sorted --kv-cache-memory 256MiB

Rows may name a LoRA adapter (`adapter`), given as `--adapter NAME=FOLDER`: each such row gets
its LoRARequest, and `--order sorted` sorts by (adapter, prompt token ids).

Same engine settings as batchrun's CPU defaults (float32, 32-token blocks, eager,
in-process engine core). Prints one JSON line: token counts, wall time, the seconds in
LLM.generate (the rest is start-up: imports, the engine, tokenizing) and the running batch
size per engine step (mean, and over the last 10% of the run: the tail).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout: the result line


def read_rows(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def token_ids(rows: list[dict], tokenizer) -> list[list[int]]:
    out = []
    for row in rows:
        if row.get("prompt_token_ids") is not None:
            out.append(list(row["prompt_token_ids"]))
        elif row.get("messages") is not None:
            # Rendered, then encoded without extra special tokens: vLLM's chat path (and
            # batchrun's). tokenize=True returns a BatchEncoding in recent transformers.
            text = tokenizer.apply_chat_template(row["messages"], tokenize=False,
                                                 add_generation_prompt=True)
            out.append(tokenizer.encode(text, add_special_tokens=False))
        else:
            out.append(tokenizer.encode(row["prompt"], add_special_tokens=False))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("input", type=Path)
    ap.add_argument("output", type=Path)
    ap.add_argument("--order", choices=("file", "sorted"), default="file")
    ap.add_argument("--kv-cache-memory", default="256MiB")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--adapter", action="append", default=[], help="NAME=FOLDER")
    ap.add_argument("--max-loras", type=int, default=None)
    args = ap.parse_args()
    adapters = dict(a.split("=", 1) for a in args.adapter)

    t0 = time.perf_counter()
    import pyarrow as pa
    import pyarrow.parquet as pq
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from batchrun.config import parse_size
    from batchrun.engine.base import StepOutput
    from batchrun.execute.trace import StepTrace
    from batchrun.model import default_model_dir

    llm = LLM(model=str(default_model_dir()), dtype="float32", block_size=32,
              enable_prefix_caching=True, enforce_eager=True, seed=0,
              kv_cache_memory_bytes=parse_size(args.kv_cache_memory),
              max_model_len=args.max_model_len,
              **({"enable_lora": True, "max_lora_rank": 8,
                  "max_loras": args.max_loras or len(adapters)} if adapters else {}))
    rows = read_rows(args.input)
    prompts = token_ids(rows, llm.get_tokenizer())
    order = list(range(len(rows)))
    if args.order == "sorted":
        order.sort(key=lambda i: (rows[i].get("adapter") or "", prompts[i]))
    from vllm.lora.request import LoRARequest

    lora_ids = {name: k + 1 for k, name in enumerate(sorted(adapters))}
    loras = [LoRARequest(a, lora_ids[a], adapters[a]) if (a := rows[i].get("adapter"))
             else None for i in order] if adapters else None
    params = [SamplingParams(max_tokens=rows[i].get("max_tokens") or args.max_tokens,
                             temperature=0.0) for i in order]
    trace = StepTrace()  # batchrun's own step statistics, for a like-for-like tail figure
    engine_step = llm.llm_engine.step
    # The in-process engine core's scheduler: LLM.generate returns only finished requests
    # from a step, so the running batch is read where vLLM keeps it.
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler

    def counted_step():
        outputs = engine_step()
        # still running + just finished
        trace.record(StepOutput(batch_size=len(scheduler.running) + len(outputs)))
        return outputs

    llm.llm_engine.step = counted_step
    generate_t0 = time.perf_counter()
    outputs = llm.generate([TokensPrompt(prompt_token_ids=prompts[i]) for i in order], params,
                           use_tqdm=False, lora_request=loras)
    generate_s = time.perf_counter() - generate_t0
    by_row = {i: o for i, o in zip(order, outputs, strict=True)}
    pq.write_table(pa.table({
        "id": [str(r.get("id", i)) for i, r in enumerate(rows)],
        "text": [by_row[i].outputs[0].text for i in range(len(rows))],
    }), args.output)
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    cached = sum(o.num_cached_tokens or 0 for o in outputs)
    print(json.dumps({"rows": len(rows), "prompt": prompt, "cached": cached,
                      "computed_prompt": prompt - cached,
                      "completion": sum(len(o.outputs[0].token_ids) for o in outputs),
                      "wall_s": time.perf_counter() - t0, "generate_s": generate_s,
                      **trace.figures()}))


if __name__ == "__main__":
    main()
