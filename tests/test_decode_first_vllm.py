"""Decode-heavy work first, on real vLLM: what sorting the file cannot do.

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
from batchrun.runner import EXIT_OK, run_job
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


def test_long_decodes_start_first_and_the_job_takes_fewer_steps_than_sorted(
        tmp_path, vllm_engine):
    from transformers import AutoTokenizer

    from batchrun.model import default_model_dir

    rows, reports = reports_job(AutoTokenizer.from_pretrained(default_model_dir()))
    cfg = job(tmp_path, write_jsonl(tmp_path / "reports.jsonl", rows))
    vllm_engine.reset_prefix_cache()
    outcome = run_job(cfg, engine=vllm_engine, interactive=False, handle_signals=False)
    assert outcome.exit_code == EXIT_OK, outcome.message
    out = read_output(cfg)
    # The premise: the reports really decode for all their max_tokens.
    assert [out[r]["completion_tokens"] for r in reports] == [REPORT_TOKENS] * 2
    planned = outcome.summary["batch"]["steps"]
    sorted_steps = steps_in_sorted_order(vllm_engine, rows)
    # Sorted, the reports start only once their documents come up: the steps before that
    # come on top of their decoding (measured: 138 steps). Started first, the job takes
    # about the reports' own length (measured: 96).
    assert planned <= REPORT_TOKENS + 16, (planned, sorted_steps)
    assert sorted_steps >= planned + 24, (planned, sorted_steps)
