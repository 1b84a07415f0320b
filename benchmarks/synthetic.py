"""Synthetic jobs shaped like real ones, rows shuffled: few-shot classification, RAG with
shared documents, multi-turn chats sharing their histories, and a job that shares nothing."""

from __future__ import annotations

import json
import random
from functools import partial
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

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


def prefix_rows(rng: random.Random, *, systems: int = 4, rows: int = 244) -> list[dict]:
    """Pre-tokenized (`prompt_token_ids`): 4 long shared system prefixes (~320 tokens), each
    row adding its own 20-150 tokens, and 1 row in 40 a long document (up to ~1,000
    tokens in all). Like the file a tokenizing upstream step hands over."""
    heads = [[rng.randrange(100, 40_000) for _ in range(rng.randint(280, 360))]
             for _ in range(systems)]
    out = []
    for i in range(rows):
        own = rng.randint(500, 640) if i % 40 == 0 else rng.randint(20, 150)
        out.append({"prompt_token_ids": heads[i % systems]
                    + [rng.randrange(100, 40_000) for _ in range(own)], "max_tokens": 16})
    return out


def mixed_rows(rng: random.Random, *, systems: int = 4, rows: int = 240) -> list[dict]:
    """Mixed output lengths: 4 shared system texts (~70 tokens); 85% of rows ask for a
    one-word answer (max_tokens 8), 15% for a long list (max_tokens 192, and a prompt the
    model keeps answering until max_tokens)."""
    heads = [f"System {s}: you are a helpful assistant for the {_text(rng, 40)}"
             for s in range(systems)]
    out = []
    for i in range(rows):
        if rng.random() < 0.15:
            ask = (f"Here is a numbered list of 150 facts about the {rng.choice(_WORDS)} and "
                   f"the {rng.choice(_WORDS)}, one per line:\n1.")
            out.append({"prompt": f"{heads[i % systems]}\n{ask}", "max_tokens": 192})
        else:
            ask = (f"Answer with one word, yes or no: is a {rng.choice(_WORDS)} bigger than a "
                   f"{rng.choice(_WORDS)}?")
            out.append({"prompt": f"{heads[i % systems]}\n{ask}", "max_tokens": 8})
    return out


def reports_rows(rng: random.Random, *, documents: int = 16, reports: int = 6,
                 report_tokens: int = 256) -> list[dict]:
    """RAG with a few long answers: 16 shared documents (~1.2x a 256MiB cache together),
    2-20 short questions each (max_tokens 24), and on 6 of the documents one report (a prompt
    the model keeps answering, max_tokens 256). The reports are the job's critical path and
    fit the cache together with their documents: wherever sorting or the file puts them,
    the last one to start decodes alone at the end, unless they start first and overlap
    the prefills of the rest."""
    system = "You answer questions using only the document below. " + _text(rng, 30)
    reported = set(rng.sample(range(documents), reports))
    rows = []
    for d in range(documents):
        head = f"{system}\n\nDocument {d}: {_text(rng, 300)}\n\n"
        for q in range(rng.randint(2, 20)):
            rows.append({"prompt": f"{head}Question {q}: what does it say about "
                                   f"{rng.choice(_WORDS)}?\nAnswer:", "max_tokens": 24})
        if d in reported:
            rows.append({"prompt": f"{head}Here is a numbered list of 100 facts from the "
                                   "document, one per line:\n1.", "max_tokens": report_tokens})
    return rows


def tasks_rows(rng: random.Random, *, labels: int = 200, questions: int = 500,
               essays: int = 12) -> list[dict]:
    """A nightly job of three tasks under one max_tokens ceiling (192), each a chat whose
    shared head (~100-150 tokens) is a system prompt and, for the two classifiers, three
    worked examples: sentiment labels and yes/no questions (the model answers in a few
    tokens) and a few essays (the model writes to the ceiling). Nothing in the rows says
    which task talks: only the outputs do. Sorted by token ids, the essays come last."""
    def shots(system: str, ask: str, answers: list[str]) -> list[dict]:
        head = [{"role": "system", "content": system}]
        for answer in answers:
            head += [{"role": "user", "content": ask.format(_text(rng, 20))},
                     {"role": "assistant", "content": answer}]
        return head

    def chat(head: list[dict], user: str) -> dict:
        return {"messages": [*head, {"role": "user", "content": user}], "max_tokens": 192}

    label = shots("You label the sentiment of reviews. Reply with one word: positive, negative "
                  "or neutral.", "Review: {}", ["positive", "negative", "neutral"])
    yesno = shots("You are a classifier. Answer yes or no, then name the words that decided it.",
                  "Does this text mention a place? {}",
                  ["Yes. It names the harbor and the canyon.",
                   "No. It names a lantern and a ledger, which are things.",
                   "No. It names pepper and an ember, which are not places."])
    essay = shots("Write a long, detailed essay of at least 500 words on the notes you are "
                  "given. Use many paragraphs, give examples, explain every point "
                  "at length and never stop early: the reader wants every detail.", "", [])
    return ([chat(label, f"Review: {_text(rng, 30)}") for _ in range(labels)]
            + [chat(yesno, f"Does this text mention a place? {_text(rng, 30)}")
               for _ in range(questions)]
            + [chat(essay, f"Notes: {_text(rng, 36)}") for _ in range(essays)])


def duplicates_rows(rng: random.Random, *, rows: int = 192, share: float = 0.25) -> list[dict]:
    """A quarter of the rows repeat an earlier row exactly (same prompt, same sampling):
    a pipeline that re-sends items, or the same question asked by many users."""
    base = rag_rows(rng, documents=8)
    distinct = base[: int(rows * (1 - share))]
    return distinct + [dict(rng.choice(distinct)) for _ in range(rows - len(distinct))]


JOBS = {"fewshot": fewshot_rows, "rag": rag_rows, "multiturn": multiturn_rows,
        "multiturn-small": partial(multiturn_rows, chats=12), "unshared": unshared_rows,
        "prefix": prefix_rows, "mixed": mixed_rows, "duplicates": duplicates_rows,
        "reports": reports_rows, "tasks": tasks_rows}


def write_scale_jsonl(path: Path, rows: int, *, systems: int = 2_000, seed: int = 0) -> Path:
    """A large text job: `rows` JSONL rows of about 700 bytes, each one of `systems` shared
    system texts (~450 bytes) then a question of its own (~200 bytes), systems in random
    order. Written a row at a time (1M rows: 0.7 GB, about a minute), never held whole."""
    rng = random.Random(seed)
    heads = [f"System {s}: you answer for the {_text(rng, 58)}" for s in range(systems)]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for i in range(rows):
            question = f"Question {i}: what about the {_text(rng, 26)}"
            f.write(json.dumps({"id": f"r{i}", "prompt": f"{rng.choice(heads)}\n{question}",
                                "max_tokens": 16}) + "\n")
    tmp.rename(path)
    return path


def write_job(name: str, folder: Path, seed: int = 0, fmt: str = "jsonl") -> Path:
    rng = random.Random(seed)
    rows = JOBS[name](rng)
    for i, row in enumerate(rows):
        row["id"] = f"{name}-{i}"
    rng.shuffle(rows)
    if fmt == "parquet":
        path = folder / f"{name}.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
        return path
    path = folder / f"{name}.jsonl"
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path
