"""Counters of batchrun's attention backend, for the run summary, from whichever process ran
the attention calls.

The backend counts in module-level counters of the process that runs the model. With vLLM's
in-process engine (batchrun's default on CPU) that is the job's own process. vLLM on GPUs
runs the model in an engine-core (and worker) process: there, when ``BATCHRUN_ATTENTION_STATS_DIR``
names a folder, each process that ran an attention call writes its counters to
``<folder>/<pid>.json``: at its first call, then at most every ``DUMP_INTERVAL_S`` seconds
(``BATCHRUN_ATTENTION_STATS_INTERVAL_S``, default 2), and when it exits (checked with vLLM's
multi-process engine on CPU: its workers' exit dumps arrive although vLLM's shutdown kills
them after a grace period). ``VllmEngine`` creates that folder and sets the variable for the
engine's processes only; ``read_attention_stats(folder)`` merges this process's counters
with every other process's file.

Work is counted in (query token, key token) pairs per layer call, so ``prefix_share`` is the
share of attention score work that the shared-prefix path served. ``backend`` names the
backend whose forward calls were counted (None: batchrun's backend ran none), never merely the
one that was registered.
"""

from __future__ import annotations

import atexit
import json
import multiprocessing.util
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .mode import get_mode

STATS_ENV_VAR = "BATCHRUN_ATTENTION_STATS_DIR"
DUMP_INTERVAL_S = float(os.environ.get("BATCHRUN_ATTENTION_STATS_INTERVAL_S", "2"))
MAX_REPORTED_GROUPS = 16

COUNTER_NAMES = (
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
PEAK_NAMES = ("max_group_size", "max_prefix_len")

_counters: dict[str, int] = dict.fromkeys(COUNTER_NAMES, 0)
_peaks: dict[str, int] = dict.fromkeys(PEAK_NAMES, 0)
_state: dict[str, Any] = {"backend": None, "registered": None, "tp_rank": None,
                          "last_groups": [], "last_dump": None, "hooked": False}


def set_registered(name: str | None) -> None:
    """The backend the plugin registered in this process (it may still never run)."""
    _state["registered"] = name


def note_tp_rank() -> None:
    """Note this process's tensor-parallel rank (called by the backends' metadata builders,
    inside the engine): ranks > 0 repeat rank 0's steps, and a merge counts rank 0 only."""
    try:
        from vllm.distributed import parallel_state

        _state["tp_rank"] = parallel_state.get_tensor_model_parallel_rank()
    except Exception:  # no distributed state: a builder made outside an engine
        _state["tp_rank"] = None


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


def record_forward(backend: str, query_key_pairs: int, prefix_query_key_pairs: int) -> None:
    """One attention layer call of ``backend``; ``prefix_query_key_pairs`` is 0 on the stock
    path."""
    _state["backend"] = backend
    _counters["forward_calls"] += 1
    _counters["query_key_pairs"] += query_key_pairs
    if prefix_query_key_pairs:
        _counters["prefix_calls"] += 1
        _counters["prefix_query_key_pairs"] += prefix_query_key_pairs
    _dump_if_due()


def _share(counters: dict[str, Any]) -> float:
    pairs = counters["query_key_pairs"]
    return round(counters["prefix_query_key_pairs"] / pairs, 4) if pairs else 0.0


def _snapshot() -> dict[str, Any]:
    return {
        "backend": _state["backend"] if _counters["forward_calls"] else None,
        "registered": _state["registered"],
        "mode": get_mode(),
        **_counters,
        **_peaks,
        "prefix_share": _share(_counters),
        "last_groups": list(_state["last_groups"]),
        "pid": os.getpid(),
        "tp_rank": _state["tp_rank"],
    }


def merge_attention_stats(snapshots: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """One summary of several processes' counters: counters add up, peaks take the maximum.
    Tensor-parallel ranks > 0 are left out (they run the same steps as rank 0)."""
    parts = [s for s in snapshots if not s.get("tp_rank")]
    ran = [s for s in parts if s.get("forward_calls")]
    merged: dict[str, Any] = {
        "backend": "+".join(sorted({s["backend"] for s in ran if s.get("backend")})) or None,
        "registered": next((s["registered"] for s in parts if s.get("registered")), None),
        "mode": (ran or parts or [{"mode": get_mode()}])[0]["mode"],
        "processes": len(ran),
    }
    for name in COUNTER_NAMES:
        merged[name] = sum(int(s.get(name, 0)) for s in parts)
    for name in PEAK_NAMES:
        merged[name] = max((int(s.get(name, 0)) for s in parts), default=0)
    merged["prefix_share"] = _share(merged)
    merged["last_groups"] = next((s["last_groups"] for s in reversed(ran)
                                  if s.get("last_groups")), [])
    return merged


def read_attention_stats(directory: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """This process's counters merged with those other processes dumped in ``directory``
    (default: ``BATCHRUN_ATTENTION_STATS_DIR``, if set)."""
    directory = directory or os.environ.get(STATS_ENV_VAR)
    snapshots = [_snapshot()]
    if directory and Path(directory).is_dir():
        for path in sorted(Path(directory).glob("*.json")):
            if path.stem == str(os.getpid()):
                continue  # this process: its live counters are newer than its dump
            try:
                snapshots.append(json.loads(path.read_text()))
            except (OSError, ValueError):  # written atomically; unreadable means foreign
                continue
    return merge_attention_stats(snapshots)


def diff_attention_stats(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    """The counts between two ``read_attention_stats`` results (a job on a shared engine whose
    counters live in another process, where they cannot be reset). Peaks and the last groups
    are ``after``'s."""
    out = dict(after)
    for name in COUNTER_NAMES:
        out[name] = int(after.get(name, 0)) - int(before.get(name, 0))
    if not out["forward_calls"]:
        out["backend"] = None
    out["prefix_share"] = _share(out)
    return out


def reset_attention_stats() -> None:
    """Zero this process's counters (another process's are only reset by ``diff``)."""
    for name in _counters:
        _counters[name] = 0
    for name in _peaks:
        _peaks[name] = 0
    _state["last_groups"] = []
    _state["backend"] = None


def dump_attention_stats(directory: str | os.PathLike[str]) -> Path:
    """Write this process's counters to ``directory/<pid>.json`` atomically (readers never
    see a partial file)."""
    target = Path(directory) / f"{os.getpid()}.json"
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(json.dumps(_snapshot()))
    os.replace(tmp, target)
    return target


def _final_dump(directory: str) -> None:
    try:
        dump_attention_stats(directory)
    except OSError:  # the folder is gone: the engine was closed and its stats read already
        pass


def _forget_parent() -> None:
    """A forked child counts its own calls, not the ones its parent made before the fork."""
    reset_attention_stats()
    _state["last_dump"] = None
    _state["hooked"] = False


os.register_at_fork(after_in_child=_forget_parent)


def _dump_if_due() -> None:
    directory = os.environ.get(STATS_ENV_VAR)
    if not directory:
        return
    now = time.monotonic()
    if _state["last_dump"] is not None and now - _state["last_dump"] < DUMP_INTERVAL_S:
        return
    _state["last_dump"] = now
    if not _state["hooked"]:
        # The last interval's counts must reach the file when the process exits: atexit for
        # a process that exits through Python's shutdown (spawned children too), and a
        # multiprocessing finalizer for forked children, which leave by os._exit.
        atexit.register(_final_dump, directory)
        multiprocessing.util.Finalize(None, _final_dump, args=(directory,), exitpriority=10)
        _state["hooked"] = True
    _final_dump(directory)
