"""A deterministic in-process engine for pipeline tests (`--engine fake`): no model, no vLLM.

It behaves like vLLM where the executor can tell: requests run concurrently up to a KV budget,
one token per step, and a block-granular LRU prefix cache reports `cached_tokens` the way
vLLM's num_cached_tokens does. Its text is a pure function of the prompt, sampling and LoRA
adapter, so outputs do not depend on order or batching. As in vLLM, a prefix cached under one
adapter is not found under another (nor under the base model). Never used by `batchrun run`
unless asked.

Constrained rows: a choice row answers one of its choices, a JSON row the smallest instance of
its schema (`{}` for json_object), four characters a token, cut short at max_tokens as a real
engine's would be. It does not follow regexes: a regex row answers free text (which the
output check (execute/result_rows.py) then fails). Logprobs are made up, but shaped like vLLM's.

`batchrun run --engine fake` reads extra constructor arguments from the environment variable
BATCHRUN_FAKE_ENGINE, a JSON object, so that CLI-level tests can slow the engine down (to kill
or signal a run mid-way) or inject failures without a model:

    BATCHRUN_FAKE_ENGINE='{"step_delay_s": 0.02, "die_after_steps": 40}' \
        batchrun run prompts.jsonl -o out.parquet --engine fake

`admitted_log` names a file that gets one line per request the engine admits (its request
id), written as it happens: a test of a CLI run, in another process and perhaps killed, reads
from it what that run generated (a resume must not admit a row that had finished).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError, EngineDiedError
from ..structured import CHOICE, JSON_OBJECT, JSON_SCHEMA
from .base import (
    EngineInfo,
    EngineStats,
    GenerationRequest,
    GenerationResult,
    StepOutput,
    TokenLogprob,
)

ENV_VAR = "BATCHRUN_FAKE_ENGINE"
FAKE_EMBEDDING_DIM = 384  # an embedding job's vectors on the fake engine (MiniLM's size)


_RNG = np.random.default_rng(0xFA4E)
_WEIGHTS = _RNG.integers(1, 2**63, 1024, dtype=np.uint64) | np.uint64(1)
_MUL = np.uint64(0x9E3779B97F4A7C15)  # odd, so invertible mod 2**64
_MUL_INV = np.uint64(pow(int(_MUL), -1, 2**64))


def _powers(base: np.uint64, n: int) -> np.ndarray:
    """base**0 .. base**(n - 1) mod 2**64 (uint64 products wrap)."""
    return np.cumprod(np.concatenate(([np.uint64(1)], np.full(n - 1, base, np.uint64))),
                      dtype=np.uint64)


_MUL_POW = _powers(_MUL, 1 << 15)  # up to 32,768 blocks a prompt
_MUL_INV_POW = _powers(_MUL_INV, 1 << 15)


@dataclass
class _Running:
    request: GenerationRequest
    cached: int
    target: int  # tokens it will produce: its natural length, capped by max_tokens
    digest: str  # of its prompt and sampling: what its completion is made from
    tokens: list[str]  # its natural completion, token by token
    produced: int = 0


class FakeEngine:
    def __init__(
        self,
        *,
        block_size: int = 4,
        kv_capacity_tokens: int = 4096,
        max_model_len: int = 2048,
        max_num_seqs: int = 64,
        fail_request_ids: frozenset[str] = frozenset(),
        die_after_steps: int | None = None,
        step_delay_s: float = 0.0,
        admitted_log: str | None = None,
        embedding_dim: int | None = None,
        hold_while_exists: str | None = None,
        record_admissions: bool = True,
    ) -> None:
        self.info = EngineInfo("fake", "fake", block_size, kv_capacity_tokens, max_model_len,
                               {"engine": "fake", "block_size": block_size})
        self._max_num_seqs = max_num_seqs
        # Embedding jobs: each request ends in one step with a vector of this many floats.
        self._embedding_dim = embedding_dim
        self._waiting: deque[GenerationRequest] = deque()
        self._running: dict[str, _Running] = {}
        self._cache: OrderedDict[int, None] = OrderedDict()  # block-chain hash -> LRU order
        self._computed: list[int] = []
        self._fail = fail_request_ids
        self._die_after = die_after_steps
        self._step_delay_s = step_delay_s  # wall time of a step, as a real engine has
        # Once a result has been returned, steps wait while this file exists: a test keeps a
        # run in flight for as long as it needs, whatever the machine's load.
        self._hold = hold_while_exists
        self._returned_any = False
        self.steps = 0
        # Every request id admitted, for tests that check what reached the engine; off for
        # the engines the CLI makes (from_env): 10M ids are ~0.7 GB, which a scale run would
        # count as batchrun's memory.
        self.admission_order: list[str] = []
        self._record_admissions = record_admissions
        self.max_running_seen = 0
        # Unbuffered appends: a line written is in the file even if the process is killed.
        self._admitted_fd = None if admitted_log is None else os.open(
            admitted_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    @classmethod
    def from_env(cls, **defaults: Any) -> FakeEngine:
        """A fake engine with `defaults`, overridden by the JSON object in BATCHRUN_FAKE_ENGINE
        (keys: this class's constructor arguments)."""
        defaults = {"record_admissions": False, **defaults}
        raw = os.environ.get(ENV_VAR, "").strip()
        if not raw:
            return cls(**defaults)
        try:
            options = json.loads(raw)
        except ValueError as e:
            raise ConfigError(f"{ENV_VAR} is not valid JSON ({e}); write e.g. "
                              '\'{"step_delay_s": 0.02}\'') from None
        known = set(inspect.signature(cls).parameters)
        if not isinstance(options, dict) or not set(options) <= known:
            raise ConfigError(f"{ENV_VAR} must be a JSON object with keys among {sorted(known)}")
        if "fail_request_ids" in options:
            options["fail_request_ids"] = frozenset(options["fail_request_ids"])
        return cls(**{**defaults, **options})

    def add(self, request: GenerationRequest) -> None:
        self._waiting.append(request)

    def _block_hashes(self, tokens: np.ndarray) -> list[int]:
        """A hash of each full block's whole prefix (block k: tokens [0, (k + 1) * bs)), as
        vLLM chains block hashes. In numpy: scale-test jobs have millions of prompts."""
        bs = self.info.block_size
        full = len(tokens) - len(tokens) % bs
        if not full:
            return []
        blocks = tokens[:full].astype(np.uint64).reshape(-1, bs)
        with np.errstate(over="ignore"):  # arithmetic mod 2**64 is the point
            block = (blocks * _WEIGHTS[:bs]).sum(axis=1)
            # chain[k] = sum_j block[j] * M**(k - j): a polynomial hash of the block sequence.
            k = np.arange(len(block), dtype=np.uint64)
            chain = np.cumsum(block * _MUL_INV_POW[k]) * _MUL_POW[k]
        return chain.tolist()

    def _admit(self, request: GenerationRequest) -> None:
        prompt = np.asarray(request.prompt_token_ids, dtype=np.int64)
        hashes = self._block_hashes(prompt)
        if request.adapter is not None:  # vLLM keys cached blocks by adapter too
            salt = int.from_bytes(hashlib.sha256(request.adapter.encode()).digest()[:8], "big")
            hashes = [h ^ salt for h in hashes]
        hits = 0
        # Like vLLM, never serve the whole prompt from cache: the last token is recomputed.
        while hits < len(hashes) and hashes[hits] in self._cache and \
                (hits + 1) * self.info.block_size < len(request.prompt_token_ids):
            hits += 1
        # Blocks become reusable once computed, i.e. after this step: siblings admitted in the
        # same step recompute the prefix, as they do in vLLM.
        self._computed.extend(hashes)
        digest = self._digest(request, prompt)
        tokens = self._tokens(request, digest)
        target = 1 if self._embedding_dim else self._target(request, tokens)
        self._running[request.request_id] = _Running(
            request, hits * self.info.block_size, target, digest, tokens)
        if self._record_admissions:
            self.admission_order.append(request.request_id)
        if self._admitted_fd is not None:
            os.write(self._admitted_fd, f"{request.request_id}\n".encode())

    def step(self) -> StepOutput:
        self.steps += 1
        if self._step_delay_s:
            time.sleep(self._step_delay_s)
        while self._hold is not None and self._returned_any and os.path.exists(self._hold):
            time.sleep(0.05)
        if self._die_after is not None and self.steps > self._die_after:
            raise EngineDiedError("the fake engine died (injected failure)")
        while self._waiting and len(self._running) < self._max_num_seqs:
            self._admit(self._waiting.popleft())
        self.max_running_seen = max(self.max_running_seen, len(self._running))
        out = StepOutput(batch_size=len(self._running))
        block, used_blocks = self.info.block_size, 0
        for rid, run in list(self._running.items()):
            run.produced += 1
            out.completion_tokens += 1
            used_blocks += -(-(len(run.request.prompt_token_ids) + run.produced) // block)
            if run.produced == 1:
                out.prefilled.append(rid)
                out.prompt_tokens += len(run.request.prompt_token_ids) - run.cached
            if run.produced < run.target:
                continue
            del self._running[rid]
            out.finished.append(self._result(run, run.target))
        for h in self._computed:
            self._cache[h] = None
            self._cache.move_to_end(h)
        self._computed.clear()
        capacity_blocks = self.info.kv_capacity_tokens // self.info.block_size
        out.kv_usage = min(1.0, used_blocks / capacity_blocks) if capacity_blocks else None
        while len(self._cache) > capacity_blocks:
            self._cache.popitem(last=False)
        self._returned_any = self._returned_any or bool(out.finished)
        return out

    @staticmethod
    def _digest(request: GenerationRequest, prompt: np.ndarray) -> str:
        """What the completion depends on: the prompt and the sampling settings."""
        h = hashlib.sha256(prompt.tobytes())
        h.update(repr((request.temperature, request.top_p, request.seed)).encode())
        if request.adapter is not None:  # another model: another completion
            h.update(b"adapter:" + request.adapter.encode())
        return h.hexdigest()

    @staticmethod
    def _target(request: GenerationRequest, tokens: list[str]) -> int:
        """Tokens the request will produce: its natural completion, cut at max_tokens."""
        return min(request.max_tokens, len(tokens))

    @staticmethod
    def _tokens(request: GenerationRequest, digest: str) -> list[str]:
        """The whole completion the request would get with no max_tokens, token by token."""
        c = request.constraint
        if c is not None and c.kind in (CHOICE, JSON_OBJECT, JSON_SCHEMA):
            if c.kind == CHOICE:
                choices = c.choices()
                text = choices[int(digest[:4], 16) % len(choices)]
            else:
                text = json.dumps(_instance(json.loads(c.spec)) if c.kind == JSON_SCHEMA else {})
            return [text[i:i + 4] for i in range(0, len(text), 4)] or [""]
        n = 1 + int(digest[:4], 16) % 24
        return [f"{' ' if i else ''}w{digest[i % 60:i % 60 + 4]}" for i in range(n)]

    def _result(self, run: _Running, length: int) -> GenerationResult:
        r = run.request
        prompt_tokens = len(r.prompt_token_ids)
        if r.request_id in self._fail:
            return GenerationResult(r.request_id, None, None, prompt_tokens, 0, run.cached,
                                    error="engine error: injected failure for this request")
        if self._embedding_dim:
            return GenerationResult(r.request_id, None, None, prompt_tokens, 0, 0,
                                    embedding=fake_embedding(r.prompt_token_ids,
                                                             self._embedding_dim))
        tokens, digest = run.tokens, run.digest
        reason = "stop" if length == len(tokens) else "length"
        tokens = tokens[:length]
        logprobs = None
        if r.logprobs is not None:
            logprobs = tuple(
                TokenLogprob(t, -int(digest[i % 64], 16) / 8,
                             tuple((t if j == 0 else f"alt{j}",
                                    -int(digest[i % 64], 16) / 8 - j) for j in range(r.logprobs)))
                for i, t in enumerate(tokens))
        return GenerationResult(r.request_id, "".join(tokens), reason, prompt_tokens, length,
                                run.cached, logprobs=logprobs)

    def num_unfinished(self) -> int:
        return len(self._waiting) + len(self._running)

    def abort(self, request_ids: list[str]) -> None:
        drop = set(request_ids)
        self._waiting = deque(r for r in self._waiting if r.request_id not in drop)
        for rid in drop:
            self._running.pop(rid, None)

    def stats(self, *, new_job: bool = False) -> EngineStats:
        """Nothing to count: no attention backend, no structured-output backends."""
        return EngineStats()

    def close(self) -> None:
        self._waiting.clear()
        self._running.clear()
        if self._admitted_fd is not None:
            os.close(self._admitted_fd)
            self._admitted_fd = None


def fake_embedding(token_ids: Any, dim: int) -> np.ndarray:
    """A unit vector that is a pure function of the token ids (their order included)."""
    ids = np.asarray(token_ids, dtype=np.float64)
    phase = (ids + 1) * 0.618 + np.arange(len(ids)) * 0.001
    vector = np.cos(np.outer(phase, np.arange(1, dim + 1))).sum(axis=0)
    return (vector / (np.linalg.norm(vector) or 1.0)).astype(np.float32)


def _instance(schema: dict) -> object:
    """A small value valid against a simple JSON schema (the fake engine's JSON answer)."""
    if not isinstance(schema, dict):
        return None
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        if schema.get(key):
            return _instance(schema[key][0])
    kind = schema.get("type", "object" if "properties" in schema else "null")
    kind = kind[0] if isinstance(kind, list) and kind else kind
    if kind == "object":
        required = set(schema.get("required", ()))
        return {k: _instance(v) for k, v in schema.get("properties", {}).items()
                if k in required}
    if kind == "array":
        return [_instance(schema.get("items", {}))] * schema.get("minItems", 0)
    if kind == "string":
        return "x" * schema.get("minLength", 1)
    if kind in ("integer", "number"):
        return schema.get("minimum", 0)
    if kind == "boolean":
        return True
    return None
