"""Result rows (RESULT_SCHEMA) for a prepared job's finished requests and its error rows,
and the tokens of those that succeeded (TokenSums)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..engine.base import GenerationResult
from ..ingest.prepare import PreparedJob
from ..io.schema import RESULT_SCHEMA
from ..structured import output_problem


@dataclass(frozen=True)
class TokenSums:
    """The tokens of the result rows that succeeded (`error` null): what the summary, each
    replica's share and the progress line count."""

    prompt: int = 0
    cached: int = 0
    completion: int = 0

    @classmethod
    def of(cls, results: pa.Table) -> TokenSums:
        ok = results.filter(results["error"].is_null())
        return cls(*(pc.sum(ok[name]).as_py() or 0
                     for name in ("prompt_tokens", "cached_tokens", "completion_tokens")))


def error_results(job: PreparedJob, errors: dict[int, str]) -> pa.Table:
    rows = job.requests.table["row"].to_pylist()
    ids = job.requests.table["id"].to_pylist()
    positions = sorted(errors)
    n = len(positions)
    return pa.table({
        "row": pa.array([rows[p] for p in positions], pa.int64()),
        "id": pa.array([ids[p] for p in positions], pa.string()),
        "text": pa.nulls(n, pa.string()), "finish_reason": pa.nulls(n, pa.string()),
        "prompt_tokens": pa.nulls(n, pa.int64()), "completion_tokens": pa.nulls(n, pa.int64()),
        "cached_tokens": pa.nulls(n, pa.int64()),
        "error": pa.array([errors[p] for p in positions], pa.string()),
        "duplicate_of": pa.nulls(n, pa.string()),
        "logprobs": pa.nulls(n, RESULT_SCHEMA.field("logprobs").type),
        "cumulative_logprob": pa.nulls(n, pa.float64()),
        "embedding": pa.nulls(n, RESULT_SCHEMA.field("embedding").type),
    }, schema=RESULT_SCHEMA)


def _output_error(job: PreparedJob, i: int, row: int, result: GenerationResult) -> str | None:
    """A constrained request's output that does not keep to its constraint: decoding stopped
    before the constraint was complete. The row's error says why and what to change."""
    constraint = job.constraints[i] if job.constraints else None
    if constraint is None or result.error is not None or result.text is None:
        return result.error
    problem = output_problem(constraint, result.text)
    if problem is None:
        return None
    if result.finish_reason == "length":
        fix = (f"it stopped at max_tokens ({int(job.max_tokens[i])} tokens) before it was "
               "complete; raise max_tokens")
    else:
        fix = ("a stop string or the end of the context cut it short; drop the stop strings "
               "or shorten the prompt")
    return f"row {row}: {problem}: {fix}"


def _logprob_rows(r: GenerationResult) -> list[dict[str, Any]] | None:
    if r.logprobs is None:
        return None
    return [{"token": t.token, "logprob": t.logprob,
             "top_logprobs": [{"token": tok, "logprob": lp} for tok, lp in t.top]}
            for t in r.logprobs]


# A result for one row position (one input of it, in a row of several): (position, input,
# result, the id of the row whose request computed it for this identical one).
_Entry = tuple[int, int, GenerationResult, str | None]


class SeveralInputs:
    """The results of a row of several inputs (an OpenAI embeddings line's list), held until
    each of its inputs has one, then put together as the row's one result: the vectors one
    after another in input order, tokens summed, the first error the row's."""

    def __init__(self, job: PreparedJob) -> None:
        counts = np.bincount(job.tokens.positions, minlength=job.rows)
        for copies in job.copies.values():
            np.add.at(counts, copies, 1)
        self._inputs = counts  # per row position
        self._held: dict[int, dict[int, GenerationResult]] = {}

    def complete(self, entries: list[_Entry]) -> list[_Entry]:
        """The entries of rows of one input, and each row of several whose last input came."""
        out = []
        for pos, item, r, source in entries:
            n = int(self._inputs[pos])
            if n < 2:
                out.append((pos, item, r, source))
                continue
            held = self._held.setdefault(pos, {})
            held[item] = r
            if len(held) == n:
                del self._held[pos]
                out.append((pos, 0, _together([held[k] for k in range(n)]), None))
        return out


def _together(rs: list[GenerationResult]) -> GenerationResult:
    error = next((r.error for r in rs if r.error is not None), None)
    return GenerationResult(
        request_id=rs[0].request_id, text=None, finish_reason=None,
        prompt_tokens=sum(r.prompt_tokens for r in rs), completion_tokens=0,
        cached_tokens=sum(r.cached_tokens for r in rs), error=error,
        embedding=None if error is not None else np.concatenate([r.embedding for r in rs]))


def results_table(job: PreparedJob, finished: list[tuple[int, GenerationResult]],
                  several: SeveralInputs | None = None) -> pa.Table:
    """Result rows for finished requests, and for the identical rows each one also serves
    (their prompt counted as cached: the engine computed none of it for them). In a job
    with rows of several inputs, `several` holds their inputs' results until the row is
    complete."""
    row_of, id_of = job.row_numbers, job.row_ids
    items = job.tokens.items
    entries: list[_Entry] = []
    for i, r in finished:
        pos = int(job.tokens.positions[i])
        if (error := _output_error(job, i, int(row_of[pos]), r)) != r.error:
            r = replace(r, error=error)
        entries.append((pos, 0 if items is None else int(items[i]), r, None))
        if copies := job.copies.get(i):
            served = replace(r, cached_tokens=r.prompt_tokens)
            copy_items = job.copy_items.get(i) or [0] * len(copies)
            entries.extend((copy, item, served, id_of[pos])
                           for copy, item in zip(copies, copy_items, strict=True))
    if several is not None:
        entries = several.complete(entries)
    positions = [p for p, _, _, _ in entries]
    rs = [r for _, _, r, _ in entries]
    return pa.table({
        "row": pa.array(row_of[positions], pa.int64()),
        "id": pa.array([id_of[p] for p in positions], pa.string()),
        "text": pa.array([r.text for r in rs], pa.string()),
        "finish_reason": pa.array([r.finish_reason for r in rs], pa.string()),
        "prompt_tokens": pa.array([r.prompt_tokens for r in rs], pa.int64()),
        "completion_tokens": pa.array([r.completion_tokens for r in rs], pa.int64()),
        "cached_tokens": pa.array([r.cached_tokens for r in rs], pa.int64()),
        "error": pa.array([r.error for r in rs], pa.string()),
        "duplicate_of": pa.array([d for _, _, _, d in entries], pa.string()),
        "logprobs": pa.array([_logprob_rows(r) for r in rs],
                             RESULT_SCHEMA.field("logprobs").type),
        "cumulative_logprob": pa.array(
            [None if r.logprobs is None else sum(t.logprob for t in r.logprobs) for r in rs],
            pa.float64()),
        "embedding": _embeddings(rs),
    }, schema=RESULT_SCHEMA)


def _embeddings(rs: list[GenerationResult]) -> pa.Array:
    """The results' vectors as one list<float32> column (null where a result has none),
    built from one flat buffer."""
    kind = RESULT_SCHEMA.field("embedding").type
    if all(r.embedding is None for r in rs):
        return pa.nulls(len(rs), kind)
    lengths = np.array([0 if r.embedding is None else len(r.embedding) for r in rs])
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int32)
    values = np.concatenate([r.embedding for r in rs if r.embedding is not None])
    mask = pa.array([r.embedding is None for r in rs])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.float32()),
                                    type=kind, mask=mask)

