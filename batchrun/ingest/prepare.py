"""Stage "prepare": a job's (or one shard's) requests made ready for the planner and the
engine: token ids, each request's max_tokens, constraint and logprobs, and identical
deterministic requests folded into one (see plan/dedupe.py).

`tokenized_table` turns a batch of read rows into the shard stage's currency: the request
table with `prompt_token_ids` filled in for every usable row (prompt and messages dropped)
and tokenization problems in `error`. `prepare_requests` takes such a table (a shard, or a
whole small job) to a PreparedJob.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cache, cached_property
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..config import EngineKind, JobConfig, default_constraint
from ..engine.base import GenerationRequest
from ..engine.lora import adapters_run_together
from ..engine.sizing import LongestRequest, longest_request
from ..io.input.readers import RequestSet, read_request_set
from ..io.schema import ADAPTER
from ..plan.adapters import (
    BASE_KEY,
    adapter_keys,
    keyed_prompt,
    order_requests_by_adapter,
    per_adapter_figures,
)
from ..plan.dedupe import SamplingKey, find_duplicates, is_deterministic
from ..plan.groups import RunGroup, longest_first, make_groups
from ..plan.prefix_tree import PrefixTree
from ..plan.schedule import RequestOrder, order_requests
from ..structured import TEXT, Constraint, max_choice_tokens
from .adapters import resolve_adapters
from .lengths import replay_lengths
from .token_lists import offsets_of
from .tokenize import (
    ByteTokenizer,
    HFTokenizer,
    PromptTokenizer,
    TokenizedRequests,
    tokenize_requests,
)


@dataclass
class PreparedJob:
    """A job read and tokenized: everything but the engine."""

    config: JobConfig
    requests: RequestSet
    tokens: TokenizedRequests
    max_tokens: np.ndarray  # per tokenized request, after row values and clamping
    max_model_len: int
    finished_before: np.ndarray  # bool per row: finished in an earlier, interrupted run
    # Request index -> row positions of identical deterministic rows its result also serves.
    copies: dict[int, list[int]] = field(default_factory=dict)
    # In a job with rows of several inputs (tokens.items): the input of each of those copies.
    copy_items: dict[int, list[int]] = field(default_factory=dict)
    # Per tokenized request, after row values and job defaults: the structured-output
    # constraint (None: free text) and how many top logprobs to return (None: no logprobs).
    constraints: list[Constraint | None] = field(default_factory=list)
    logprobs: list[int | None] = field(default_factory=list)
    _orders: dict[int, RequestOrder] = field(default_factory=dict, repr=False)
    _tree: PrefixTree | None = field(default=None, repr=False)  # built on first use

    def rows_served(self, i: int) -> int:
        """Rows request i's result fills: its own, and its identical copies'."""
        return 1 + len(self.copies.get(i, ()))

    def constrained_counts(self) -> dict[str, int]:
        """Rows per constraint kind, for `plan`, `validate` and the summary."""
        counts: dict[str, int] = {}
        for i, c in enumerate(self.constraints):
            if c is not None:
                counts[c.kind] = counts.get(c.kind, 0) + self.rows_served(i)
        return dict(sorted(counts.items()))

    @property
    def rows(self) -> int:
        return self.requests.table.num_rows

    @cached_property
    def row_numbers(self) -> np.ndarray:
        """Input row number of each row position."""
        return self.requests.table["row"].to_numpy()

    @cached_property
    def row_ids(self) -> list[str]:
        """Id of each row position."""
        return self.requests.table["id"].to_pylist()

    @cached_property
    def row_adapters(self) -> list[str | None]:
        """The LoRA adapter of each row position (None: the base model)."""
        return self.requests.table[ADAPTER].to_pylist()

    @cached_property
    def request_keys(self) -> np.ndarray | None:
        """Each tokenized request's adapter key (plan/adapters.py); None when all run on
        the base model."""
        keys = adapter_keys(self.requests.table[ADAPTER])
        return None if keys is None else keys[self.tokens.positions]

    @property
    def prefix_tree(self) -> PrefixTree:
        if self._tree is None:
            self._tree = PrefixTree.build(self.tokens.values, self.tokens.offsets,
                                          self.request_keys)
        return self._tree

    def request_order(self, block_size: int) -> RequestOrder:
        """The shard's plan before any cut to a KV cache, built once per block size: sizing
        the engine, choosing its attention and running the shard all read this one. Each
        adapter's requests run together where the engine holds fewer adapters than the
        shard has (plan/adapters.py)."""
        if block_size not in self._orders:
            toks, keys = self.tokens, self.request_keys
            if keys is not None and adapters_run_together(self.config,
                                                          len(np.unique(keys))):
                self._orders[block_size] = order_requests_by_adapter(
                    self.prefix_tree, keys, self.max_tokens, block_size=block_size)
            else:
                self._orders[block_size] = order_requests(
                    toks.values, toks.offsets, self.max_tokens, block_size=block_size,
                    tree=self.prefix_tree)
        return self._orders[block_size]

    def run_groups(self, block_size: int, kv_capacity_tokens: int | None) -> tuple[
            list[RunGroup], dict[str, Any]]:
        """The plan as the executor runs it (plan/groups.py), and its figures (with
        figures per adapter in a job that declares adapters)."""
        planned = self.config.plan and len(self.tokens.positions)
        if planned and self.config.embeds:
            return longest_first(self.tokens.lengths(), self.max_tokens, block_size)
        groups, figures = make_groups(self.request_order(block_size) if planned else None,
                                      self.tokens.lengths(), self.max_tokens, block_size,
                                      kv_capacity_tokens)
        if self.config.adapters and "requests" in figures:
            names = self.row_adapters
            figures["adapters"] = per_adapter_figures(
                self.prefix_tree, [names[p] for p in self.tokens.positions.tolist()],
                block_size)
        return groups, figures

    def first_and_last_prompts(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The first and last prompts in token order (None when it has none): where this
        shard meets its neighbours (plan/job_figures.py)."""
        toks = self.tokens
        if not len(toks.positions) or not self.config.plan:
            return None, None
        order = self.prefix_tree.order
        first, last = int(order[0]), int(order[-1])
        # Copies: a view would keep the shard's whole token buffer alive with it.
        prompts = (toks.values[toks.offsets[first]:toks.offsets[first + 1]].copy(),
                   toks.values[toks.offsets[last]:toks.offsets[last + 1]].copy())
        if not self.config.adapters:
            return prompts
        # In a job with adapters: behind their adapter's key (plan/job_figures.py).
        keys = self.request_keys
        key_of = (lambda i: BASE_KEY) if keys is None else (lambda i: int(keys[i]))
        return (keyed_prompt(key_of(first), prompts[0]),
                keyed_prompt(key_of(last), prompts[1]))

    def longest_request(self) -> LongestRequest | None:
        ids = self.requests.table["id"]
        return longest_request(self.tokens.lengths(), self.max_tokens,
                               lambda i: ids[int(self.tokens.positions[i])].as_py())

    def request_errors(self) -> dict[int, str]:
        """Row position -> error, for rows not done yet that cannot run."""
        errors = {i: e for i, e in enumerate(self.requests.table["error"].to_pylist())
                  if e is not None and not self.finished_before[i]}
        errors.update(self.tokens.errors)
        return errors


def load_tokenizer(config: JobConfig, engine_kind: str,
                   engine_max_model_len: int | None = None) -> tuple[PromptTokenizer, int]:
    """The tokenizer and context length, without starting an engine (or with the context
    length of an engine already started)."""
    caps = [c for c in (config.engine.max_model_len, engine_max_model_len) if c]
    if engine_kind == EngineKind.FAKE:
        return ByteTokenizer(), min(caps or [2048])
    from ..model import model_context_length, resolve_model

    model_dir = resolve_model(config.model_name)
    return HFTokenizer(model_dir), min([model_context_length(model_dir), *caps])


def length_rules(config: JobConfig) -> dict[str, Any]:
    """tokenize_requests' rules for a prompt's length in this job: an embedding needs no room
    to generate, and may be cut to the context when the job says --truncate."""
    return {"room": 0, "truncate": config.truncate} if config.embeds else {}


def prepare_job(config: JobConfig, *, engine_kind: str = EngineKind.VLLM,
                finished_rows: set[int] | frozenset[int] = frozenset(),
                engine_max_model_len: int | None = None) -> PreparedJob:
    """Read and tokenize a whole job in memory (tests, benchmarks). Rows finished before (a
    resumed run) are not tokenized."""
    requests = read_request_set(config.input, config.columns, config.input_format)
    requests = replace(requests, table=resolve_adapters(requests.table, config,
                                                        requests.input_format))
    if (replay := replay_lengths(config.engine.replay_lengths, engine_kind)) is not None:
        requests = replace(requests, table=replay.fill(requests.table))
    tokenizer, max_model_len = load_tokenizer(config, engine_kind, engine_max_model_len)
    skip = np.zeros(requests.table.num_rows, dtype=bool)
    skip[list(finished_rows)] = True  # row numbers are table positions: one row per input row
    return prepare_requests(config, requests, tokenizer, max_model_len, skip=skip)


def prepare_requests(config: JobConfig, requests: RequestSet, tokenizer: PromptTokenizer,
                     max_model_len: int, *, skip: np.ndarray | None = None) -> PreparedJob:
    """Tokenize (pre-tokenized rows cost nothing) and fill in each request's settings."""
    table = requests.table
    if skip is None:
        skip = np.zeros(table.num_rows, dtype=bool)
    tokens = tokenize_requests(table, tokenizer, max_model_len=max_model_len, skip=skip,
                               **length_rules(config))
    constraints = request_constraints(table, tokens.positions, config)
    logprobs = request_logprobs(table, tokens.positions, config)
    max_tokens = request_max_tokens(table, tokens, constraints, config, max_model_len)
    job = PreparedJob(config, requests, tokens, max_tokens, max_model_len, skip,
                      constraints=constraints, logprobs=logprobs)
    return _without_duplicates(job) if config.plan else job


def request_max_tokens(table: pa.Table, tokens: TokenizedRequests,
                       constraints: list[Constraint | None], config: JobConfig,
                       max_model_len: int) -> np.ndarray:
    """Each request's max_tokens: its row's, else the job's; at most what the context leaves.
    An embedding generates nothing: 1 (the engine's one step)."""
    if config.embeds:
        return np.ones(len(tokens.positions), dtype=np.int64)
    row_max = table["max_tokens"].fill_null(config.sampling.max_tokens).to_numpy()
    wanted = row_max[tokens.positions].astype(np.int64)
    wanted[wanted <= 0] = config.sampling.max_tokens
    for i, c in enumerate(constraints):
        # A choice takes no more tokens than its longest choice has bytes (plus the end of
        # sequence): asking for more would only reserve KV cache it never uses.
        if c is not None and (bound := max_choice_tokens(c)):
            wanted[i] = min(wanted[i], bound)
    # Generation stops at the context's end anyway; planning with the real room is exact.
    return np.maximum(1, np.minimum(wanted, max_model_len - tokens.lengths()))


def tokenized_table(requests: pa.Table, tokens: TokenizedRequests,
                    skip: np.ndarray) -> pa.Table:
    """`requests` without the `skip` rows, as the shard stage keeps them: usable rows carry
    their token ids (prompt and messages dropped: the ids are all that runs), rows that
    could not be tokenized carry the reason in `error`."""
    n = requests.num_rows
    lengths = np.zeros(n, dtype=np.int64)
    if tokens.items is None:
        lengths[tokens.positions] = tokens.lengths()
    else:  # a row of several inputs: their tokens one after another
        np.add.at(lengths, tokens.positions, tokens.lengths())
    offsets = offsets_of(lengths)
    has_tokens = np.zeros(n, dtype=bool)
    has_tokens[tokens.positions] = True
    ids = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)),
                                   pa.array(tokens.values, pa.int32()),
                                   mask=pa.array(~has_tokens))
    errors = requests["error"]
    if tokens.errors:
        extra = [None] * n
        for pos, message in tokens.errors.items():
            extra[pos] = message
        errors = pc.coalesce(errors, pa.array(extra, pa.string()))
    table = (requests.set_column(requests.schema.get_field_index("prompt_token_ids"),
                                 "prompt_token_ids", ids)
             .set_column(requests.schema.get_field_index("error"), "error", errors)
             .set_column(requests.schema.get_field_index("input_lengths"), "input_lengths",
                         _input_lengths(tokens, n)))
    for name in ("prompt", "messages", "inputs"):
        i = table.schema.get_field_index(name)
        table = table.set_column(i, name, pa.nulls(n, table.schema.field(name).type))
    return table.filter(pa.array(~skip)) if skip.any() else table


def _input_lengths(tokens: TokenizedRequests, n: int) -> pa.Array:
    """Each row's inputs' token counts where it has several; null for a row of one."""
    kind = pa.list_(pa.int32())
    if tokens.items is None:
        return pa.nulls(n, kind)
    counts = np.bincount(tokens.positions, minlength=n)
    several = counts > 1
    return pa.ListArray.from_arrays(
        pa.array(offsets_of(np.where(several, counts, 0)).astype(np.int32)),
        pa.array(tokens.lengths()[several[tokens.positions]].astype(np.int32)),
        type=kind, mask=pa.array(~several))


def _without_duplicates(job: PreparedJob) -> PreparedJob:
    """The job with identical deterministic requests run once (see plan/dedupe.py)."""
    positions = job.tokens.positions

    @cache
    def columns() -> tuple[Callable[[int], tuple], list[str | None]]:
        # Read only when two prompts are equal: in most jobs none are.
        return row_sampling(job), job.row_adapters

    def key_of(i: int) -> SamplingKey | None:
        pos = int(positions[i])
        sampling, adapters = columns()
        if job.config.embeds:  # an embedding is its input's alone (and its adapter's)
            return (adapters[pos],)
        temperature, top_p, seed, stop = sampling(pos)
        # Everything that shapes the output: a constraint, logprobs or another adapter make
        # rows differ too.
        return (int(job.max_tokens[i]), temperature, top_p, seed, stop, job.constraints[i],
                job.logprobs[i], adapters[pos]) if is_deterministic(temperature, seed) else None

    found = find_duplicates(job.prefix_tree, key_of)
    if not found.copies:
        return job
    renumber = {int(r): k for k, r in enumerate(found.runs)}
    copies = {renumber[r]: [int(positions[c]) for c in cs] for r, cs in found.copies.items()}
    items = job.tokens.items
    copy_items = {} if items is None else {
        renumber[r]: [int(items[c]) for c in cs] for r, cs in found.copies.items()}
    runs = found.runs.tolist()
    return replace(job, tokens=job.tokens.take(found.runs),
                   max_tokens=job.max_tokens[found.runs], copies=copies, copy_items=copy_items,
                   constraints=[job.constraints[r] for r in runs],
                   logprobs=[job.logprobs[r] for r in runs], _orders={},
                   _tree=job.prefix_tree.subset(found.runs))


def request_constraints(table: pa.Table, positions: np.ndarray,
                 config: JobConfig) -> list[Constraint | None]:
    """Each request's constraint: its row's own, else the job's default; "text" rows none."""
    default = default_constraint(config.sampling)
    if table["constraint"].null_count == table.num_rows:
        return [default] * len(positions)
    kinds = table["constraint"].to_pylist()
    specs = table["constraint_spec"].to_pylist()
    seen: dict[tuple[str, str | None], Constraint] = {}  # one object per distinct constraint
    out: list[Constraint | None] = []
    for pos in positions.tolist():
        kind = kinds[pos]
        if kind is None:
            out.append(default)
        elif kind == TEXT:
            out.append(None)
        else:
            key = (kind, specs[pos])
            out.append(seen.get(key) or seen.setdefault(key, Constraint(kind, specs[pos])))
    return out


def request_logprobs(table: pa.Table, positions: np.ndarray, config: JobConfig) -> list[int | None]:
    """Each request's top-logprobs count (None: no logprobs). A row's logprobs/top_logprobs
    win over the job's; top_logprobs alone turns logprobs on."""
    s = config.sampling
    default = None
    if s.logprobs or s.top_logprobs is not None:
        default = s.top_logprobs or 0
    n = table.num_rows
    if table["logprobs"].null_count == n and table["top_logprobs"].null_count == n:
        return [default] * len(positions)
    asked, top = table["logprobs"].to_pylist(), table["top_logprobs"].to_pylist()
    out: list[int | None] = []
    for pos in positions.tolist():
        if asked[pos] is False:
            out.append(None)
        elif asked[pos] is None and top[pos] is None:
            out.append(default)
        else:
            out.append(top[pos] if top[pos] is not None else s.top_logprobs or 0)
    return out


def row_sampling(job: PreparedJob) -> Callable[[int], tuple[float, float, int | None,
                                                            tuple[str, ...]]]:
    """A row position's (temperature, top_p, seed, stop): its own values, else the job's."""
    table, s = job.requests.table, job.config.sampling
    temperature, top_p, seed, stop = (table[c].to_pylist()
                                      for c in ("temperature", "top_p", "seed", "stop"))

    def at(pos: int) -> tuple[float, float, int | None, tuple[str, ...]]:
        return (s.temperature if temperature[pos] is None else temperature[pos],
                s.top_p if top_p[pos] is None else top_p[pos],
                s.seed if seed[pos] is None else seed[pos],
                s.stop if stop[pos] is None else tuple(stop[pos]))

    return at


def request_factory(job: PreparedJob) -> Callable[[int], GenerationRequest]:
    """Builds the engine request of tokenized request i (row values win over defaults). Its
    target_tokens: the row's completion_tokens (given or replayed, lengths.py), if any."""
    ids = job.row_ids
    sampling = row_sampling(job)
    adapters = job.row_adapters
    given = job.requests.table["completion_tokens"]
    targets = None if given.null_count == len(given) else given.fill_null(-1).to_numpy()
    items = job.tokens.items

    def make(i: int) -> GenerationRequest:
        pos = int(job.tokens.positions[i])
        temperature, top_p, seed, stop = sampling(pos)
        # A row's second and later inputs: the engine's request ids must be unique.
        rid = ids[pos] if items is None or not items[i] else f"{ids[pos]}\x1f{items[i]}"
        return GenerationRequest(request_id=rid, prompt_token_ids=job.tokens.values[
                                     job.tokens.offsets[i]:job.tokens.offsets[i + 1]],
                                 max_tokens=int(job.max_tokens[i]), temperature=temperature,
                                 top_p=top_p, seed=seed, stop=stop,
                                 constraint=job.constraints[i] if job.constraints else None,
                                 logprobs=job.logprobs[i] if job.logprobs else None,
                                 target_tokens=None if targets is None or targets[pos] < 0
                                 else int(targets[pos]), adapter=adapters[pos])

    return make


def prepare_shard(config: JobConfig, shard: pa.Table, input_format: str,
                  max_model_len: int) -> PreparedJob:
    """A shard's tokenized requests (see tokenized_table) made ready to plan and run."""
    requests = RequestSet(shard, pa.table({}), input_format)
    return prepare_requests(config, requests, ByteTokenizer(), max_model_len)
