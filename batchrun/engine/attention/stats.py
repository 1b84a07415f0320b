"""Counters of batchrun's attention backend, for the run summary.

The backend updates module-level counters in the process that runs the model. With vLLM's
in-process engine (batchrun's default on CPU) that is the runner's process, and
``read_attention_stats()`` reads them directly. A multi-process engine runs the model in
another process: when ``BATCHRUN_ATTENTION_STATS`` names a file, that process dumps its
counters there (at most every ``DUMP_INTERVAL_S`` seconds and at exit), and
``read_attention_stats()`` in a process that ran no step reads the file instead.

Work is counted in (query token, key token) pairs per layer call, so ``prefix_share`` is the
share of attention score work that the shared-prefix path served.
"""

from __future__ import annotations

import atexit
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .mode import get_mode

STATS_ENV_VAR = "BATCHRUN_ATTENTION_STATS"
DUMP_INTERVAL_S = 2.0
MAX_REPORTED_GROUPS = 16

_COUNTER_NAMES = (
    "forward_calls",  # attention layer calls with metadata (all paths)
    "prefix_calls",  # ... of which took the shared-prefix path
    "steps",  # metadata builds (once per engine step and KV-cache group)
    "prefix_steps",  # ... of which planned the shared-prefix path
    "groups",  # prefix groups used, summed over steps
    "grouped_seqs",  # sequences in those groups, summed over steps
    "skipped_groups",  # groups found but left to the stock path by the heuristic
    "query_key_pairs",  # causal (query, key) pairs of all layer calls
    "prefix_query_key_pairs",  # ... served by the shared-prefix matmuls
)

_counters: dict[str, int] = dict.fromkeys(_COUNTER_NAMES, 0)
_peaks = {"max_group_size": 0, "max_prefix_len": 0}
_state: dict[str, Any] = {"backend": "vllm", "last_groups": [], "last_dump": 0.0,
                          "atexit": False}


def set_backend(name: str) -> None:
    """Name of the attention backend this process registered (``vllm`` when none)."""
    _state["backend"] = name


def record_step(groups: Sequence[tuple[int, int]], skipped: int) -> None:
    """One metadata build: ``groups`` are (members, prefix tokens) of the groups it planned."""
    _counters["steps"] += 1
    _counters["skipped_groups"] += skipped
    if not groups:
        return
    _counters["prefix_steps"] += 1
    _counters["groups"] += len(groups)
    _counters["grouped_seqs"] += sum(members for members, _ in groups)
    _peaks["max_group_size"] = max(_peaks["max_group_size"], *(m for m, _ in groups))
    _peaks["max_prefix_len"] = max(_peaks["max_prefix_len"], *(p for _, p in groups))
    _state["last_groups"] = [[m, p] for m, p in groups[:MAX_REPORTED_GROUPS]]


def record_forward(query_key_pairs: int, prefix_query_key_pairs: int) -> None:
    """One attention layer call; ``prefix_query_key_pairs`` is 0 on the stock path."""
    _counters["forward_calls"] += 1
    _counters["query_key_pairs"] += query_key_pairs
    if prefix_query_key_pairs:
        _counters["prefix_calls"] += 1
        _counters["prefix_query_key_pairs"] += prefix_query_key_pairs
    _dump_if_due()


def _snapshot() -> dict[str, Any]:
    pairs = _counters["query_key_pairs"]
    return {
        "backend": _state["backend"],
        "mode": get_mode(),
        **_counters,
        **_peaks,
        "prefix_share": round(_counters["prefix_query_key_pairs"] / pairs, 4) if pairs else 0.0,
        "last_groups": list(_state["last_groups"]),
    }


def read_attention_stats() -> dict[str, Any]:
    """The counters as a JSON-ready dict: this process's, or, when this process ran no engine
    step and ``BATCHRUN_ATTENTION_STATS`` names a file, the engine process's last dump."""
    path = os.environ.get(STATS_ENV_VAR)
    if _counters["steps"] == 0 and path and Path(path).is_file():
        return json.loads(Path(path).read_text())
    return _snapshot()


def reset_attention_stats() -> None:
    """Zero this process's counters (a separate engine process keeps its own)."""
    for name in _counters:
        _counters[name] = 0
    for name in _peaks:
        _peaks[name] = 0
    _state["last_groups"] = []


def dump_attention_stats(path: str | os.PathLike[str]) -> None:
    """Write the counters to ``path`` atomically (readers never see a partial file)."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(_snapshot()))
    os.replace(tmp, target)


def _dump_if_due() -> None:
    path = os.environ.get(STATS_ENV_VAR)
    if not path:
        return
    now = time.monotonic()
    if now - _state["last_dump"] < DUMP_INTERVAL_S:
        return
    _state["last_dump"] = now
    if not _state["atexit"]:
        # The last interval's counts would be lost when the engine process exits.
        atexit.register(dump_attention_stats, path)
        _state["atexit"] = True
    dump_attention_stats(path)
