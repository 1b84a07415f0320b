"""Decode-heavy work first, on real vLLM: what sorting the file cannot do. Known from
max_tokens (the reports), or learned as the run goes (the tasks).

A RAG-shaped job: documents shared by short questions, and on two documents a report that
decodes for a long time. Sorted by prompt tokens, each report waits for its document's turn
and then decodes nearly alone at the end; batchrun starts the reports first (the plan ranks
sibling subtrees by decode work per computed prompt token, so the reports' documents go
first), so their decoding overlaps the prefills and short answers of everything else. With
that ranking and decode_heavy_first both switched off, batchrun runs 137 steps here, as many
as the sorted rows. Counted in engine steps (one forward pass each), which the machine's
load does not change."""

from __future__ import annotations

import random

from batchrun.engine.base import Engine, GenerationRequest
from batchrun.errors import EXIT_OK
from batchrun.job.run import run_job
from tests.helpers import job, read_output, write_jsonl

REPORT_TOKENS = 96
WORDS = "river stone market ledger cobalt harbor signal orchard copper meadow lantern".split()


def reports_job(tokenizer) -> tuple[list[dict], list[int]]:
    """Pre-tokenized rows (batchrun and the sorted baseline see the same token ids), and the
    row numbers of the reports: on the two documents that sort last."""
    rng = random.Random(3)
    system = "You answer questions using only the document below. "
    heads = [tokenizer.encode(f"{system}\n\nDocument {d}: "
                              + " ".join(rng.choice(WORDS) for _ in range(250)) + "\n\n",
                              add_special_tokens=False) for d in range(16)]
    reported = sorted(range(len(heads)), key=lambda d: heads[d])[-2:]
    rows, reports = [], []
    for d, head in enumerate(heads):
        for q in range(10):
            ask = f"Question {q}: what does it say about the {rng.choice(WORDS)}?\nAnswer:"
            rows.append({"prompt_token_ids": head + tokenizer.encode(ask), "max_tokens": 24})
        if d in reported:
            reports.append(len(rows))
            ask = "Here is a numbered list of 100 facts from the document, one per line:\n1."
            rows.append({"prompt_token_ids": head + tokenizer.encode(ask),
                         "max_tokens": REPORT_TOKENS})
    order = list(range(len(rows)))
    rng.shuffle(order)
    for i, row in enumerate(rows):
        row["id"] = f"row-{i}"
    return [rows[i] for i in order], [order.index(r) for r in reports]


def steps_in_sorted_order(engine: Engine, rows: list[dict]) -> int:
    """vLLM fed the rows sorted by prompt tokens (its own scheduler, prefix caching on)."""
    engine.reset_prefix_cache()
    for i, row in sorted(enumerate(rows), key=lambda r: r[1]["prompt_token_ids"]):
        engine.add(GenerationRequest(f"sorted-{i}", row["prompt_token_ids"], row["max_tokens"]))
    steps = 0
    while engine.num_unfinished():
        engine.step()
        steps += 1
    return steps


def run_planned(tmp_path, engine: Engine, rows: list[dict]) -> tuple[dict, list[dict]]:
    """batchrun's run of the rows on the session's engine, its cache reset first: the
    job's summary and its output rows."""
    cfg = job(tmp_path, write_jsonl(tmp_path / "in.jsonl", rows))
    engine.reset_prefix_cache()
    outcome = run_job(cfg, engine=engine, interactive=False, handle_signals=False)
    assert outcome.exit_code == EXIT_OK, outcome.message
    return outcome.summary, read_output(cfg)


def model_tokenizer():
    from transformers import AutoTokenizer

    from batchrun.model import default_model_dir

    return AutoTokenizer.from_pretrained(default_model_dir())


def test_long_decodes_start_first_and_the_job_takes_fewer_steps_than_sorted(
        tmp_path, vllm_engine):
    rows, reports = reports_job(model_tokenizer())
    summary, out = run_planned(tmp_path, vllm_engine, rows)
    # The premise: the reports really decode for all their max_tokens.
    assert [out[r]["completion_tokens"] for r in reports] == [REPORT_TOKENS] * 2
    planned = summary["batch"]["steps"]
    sorted_steps = steps_in_sorted_order(vllm_engine, rows)
    # Sorted, the reports start only once their documents come up: the steps before that
    # come on top of their decoding (measured: 138 steps). Started first, the job takes
    # about the reports' own length (measured: 96).
    assert planned <= REPORT_TOKENS + 16, (planned, sorted_steps)
    assert sorted_steps >= planned + 24, (planned, sorted_steps)


ESSAY_TOKENS = 96


def tasks_job(tokenizer) -> tuple[list[dict], list[int]]:
    """Two tasks under one max_tokens (96): 320 yes/no questions after three worked examples
    (the model answers in ~15 tokens) and 2 essays, whose system prompt sorts last. Nothing
    but the outputs tells them apart. Pre-tokenized chats; the row numbers of the essays."""
    rng = random.Random(5)

    def text(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n)) + "."

    def chat(messages: list[dict]) -> list[int]:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=True)
        return tokenizer.encode(rendered, add_special_tokens=False)

    shots = [{"role": "system", "content": "You are a classifier. Answer yes or no, then name "
                                           "the words that decided it."}]
    for answer in ("Yes. It names the harbor and the canyon.",
                   "No. It names a lantern and a ledger, which are things.",
                   "No. It names pepper and an ember, which are not places."):
        shots += [{"role": "user", "content": f"Does this text mention a place? {text(20)}"},
                  {"role": "assistant", "content": answer}]
    essay = {"role": "system", "content": "Write a long, detailed essay on the notes you are "
                                          "given. Use many paragraphs, give examples, explain "
                                          "every point at length and never stop early: the "
                                          "reader wants every detail, and a short essay "
                                          "fails the assignment."}
    rows = [{"prompt_token_ids": chat([*shots, {"role": "user", "content":
                                                f"Does this text mention a place? {text(30)}"}])}
            for _ in range(320)]
    rows += [{"prompt_token_ids": chat([essay, {"role": "user", "content": f"Notes: {text(30)}"}])}
             for _ in range(2)]
    order = list(range(len(rows)))
    rng.shuffle(order)
    shuffled = [rows[i] for i in order]
    for i, row in enumerate(shuffled):
        row.update(id=f"row-{i}", max_tokens=ESSAY_TOKENS)
    last_two = sorted(shuffled, key=lambda r: r["prompt_token_ids"])[-2:]
    assert {id(r) for r in last_two} == {id(r) for r in rows[-2:]}  # the essays sort last
    return shuffled, [order.index(len(rows) - 2), order.index(len(rows) - 1)]


def test_a_task_found_brief_as_the_run_goes_lets_the_long_one_start_early(
        tmp_path, vllm_engine):
    rows, essays = tasks_job(model_tokenizer())
    summary, out = run_planned(tmp_path, vllm_engine, rows)
    # The premise: the essays decode for all their max_tokens, the answers for a few tokens.
    assert [out[r]["completion_tokens"] for r in essays] == [ESSAY_TOKENS] * 2
    answers = [row["completion_tokens"] for i, row in enumerate(out) if i not in essays]
    assert max(answers) * 4 <= ESSAY_TOKENS
    batch = summary["batch"]
    sorted_steps = steps_in_sorted_order(vllm_engine, rows)
    # Sorted (and planned by max_tokens alone), the essays start once every question has:
    # their decoding comes after the questions' steps (measured: 174 sorted, 176 batchrun
    # without the learning). Found brief after its first 8 questions, the classifier's rest
    # goes behind the essays, which then overlap it (measured: 124).
    assert batch["steps"] + 32 <= sorted_steps, (batch["steps"], sorted_steps)
    assert batch["deferred_light_prefixes"] == 1
