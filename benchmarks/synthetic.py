"""Synthetic jobs shaped like real ones, rows shuffled: few-shot classification, RAG with
shared documents, multi-turn chats sharing their histories, and a job that shares nothing."""

from __future__ import annotations

import json
import random
from functools import partial
from pathlib import Path

_WORDS = ("river stone market ledger cobalt harbor signal orchard copper meadow lantern "
          "quarry velvet summit engine thistle canyon beacon saddle marble falcon prism "
          "tundra willow garnet ember glacier hollow juniper kettle mosaic nectar opal "
          "pepper quill raven saffron timber umber vessel wicker yarrow zephyr").split()


def _text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n_words)) + "."


def fewshot_rows(rng: random.Random, *, templates: int = 16, rows: int = 192) -> list[dict]:
    """Classification: each row is one of 16 long few-shot templates + a short input. The
    templates together (~9k tokens) do not fit a 256MiB KV cache (~5.8k tokens)."""
    heads = []
    for t in range(templates):
        shots = "\n".join(f"Text: {_text(rng, 28)}\nLabel: {rng.choice(['yes', 'no'])}"
                          for _ in range(12))
        heads.append(f"Task {t}: decide whether the text mentions a place.\n{shots}\n")
    return [{"prompt": f"{heads[i % templates]}Text: {_text(rng, 12)}\nLabel:",
             "max_tokens": 4} for i in range(rows)]


def rag_rows(rng: random.Random, *, documents: int = 16) -> list[dict]:
    """RAG: a shared system prompt, then a document shared by 2-20 questions."""
    system = "You answer questions using only the document below. " + _text(rng, 30)
    rows = []
    for d in range(documents):
        doc = f"Document {d}: {_text(rng, 300)}"
        for _ in range(rng.randint(2, 20)):
            rows.append({"messages": [
                {"role": "system", "content": f"{system}\n\n{doc}"},
                {"role": "user", "content": f"What does it say about {rng.choice(_WORDS)}?"}],
                "max_tokens": 24})
    return rows


def multiturn_rows(rng: random.Random, *, chats: int = 36, turns: int = 8) -> list[dict]:
    """Multi-turn chats: row k of a chat holds its first k turns, so rows share histories.
    36 chats: a block ideal of ~22k tokens, ~3.8x a 256MiB cache, like the issue's example
    job (22,428); `multiturn-small` (12 chats, ~1.3x the cache) shows the small-job case."""
    rows = []
    for _ in range(chats):
        history: list[dict] = [{"role": "system", "content": "You are a patient tutor."}]
        for _ in range(rng.randint(3, turns)):
            history.append({"role": "user", "content": _text(rng, 40)})
            rows.append({"messages": list(history), "max_tokens": 24})
            history.append({"role": "assistant", "content": _text(rng, 40)})
    return rows


def unshared_rows(rng: random.Random, *, rows: int = 96) -> list[dict]:
    """Nothing shared: every prompt is unique from its first token."""
    return [{"prompt": f"{i}. {_text(rng, 150)} Summarize:", "max_tokens": 24}
            for i in range(rows)]


JOBS = {"fewshot": fewshot_rows, "rag": rag_rows, "multiturn": multiturn_rows,
        "multiturn-small": partial(multiturn_rows, chats=12), "unshared": unshared_rows}


def write_job(name: str, folder: Path, seed: int = 0) -> Path:
    rng = random.Random(seed)
    rows = JOBS[name](rng)
    for i, row in enumerate(rows):
        row["id"] = f"{name}-{i}"
    rng.shuffle(rows)
    path = folder / f"{name}.jsonl"
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path
