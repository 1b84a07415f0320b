"""Stream planned requests through an engine: bounded window, prefix computed once per group.

The executor admits requests in plan order while the in-flight KV estimate fits the engine's
KV cache (a shared prefix counted once, not per member nor again for a nested prefix), and
holds a group's other members back until its first member (the leader) has computed its
prompt: from then on the shared prefix is in vLLM's prefix cache and every sibling reuses
all of it. (vLLM does let requests scheduled in the same step reuse each other's blocks,
but only the part of the prompt that fits the step's token budget: a chunked prefill leaves
siblings recomputing the rest.) Leaders of many groups prefill together, and later groups
go on starting while a group waits, so a hold costs the group one step, not the engine.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .engine.base import Engine, EngineDiedError, GenerationRequest, GenerationResult


@dataclass(eq=False)  # identity: groups hold arrays, and a deque removes by ==
class RunGroup:
    """Requests that run together because they share a prefix (prefix_len 0: they share none)."""

    members: np.ndarray  # request indices in run order
    prefix_len: int
    prefix_blocks: int
    suffix_blocks: np.ndarray  # KV blocks each member adds: beyond the prefix and its elders'
    prefix_id: int = -1  # groups cut from one prefix's requests (to fit the KV cache) share it
    parent_id: int = -1  # prefix_id of the shared prefix this group's prefix extends, if any
    # Of each member's suffix blocks, those no other member uses: free when it finishes (the
    # rest when the group does). None: all of them.
    private_blocks: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.private_blocks is None:
            self.private_blocks = self.suffix_blocks


@dataclass(eq=False)  # identity: a field-wise == compares numpy arrays (ValueError)
class _GroupState:
    group: RunGroup
    next_member: int = 0
    leader_ready: bool = False
    in_flight: int = 0
    kept_blocks: int = 0  # suffix blocks of started members that other members may still use
    # A group cut from the same prefix as an earlier one has no leader of its own: it waits
    # for the first one's, since two leaders would compute the same prefix twice.
    leader_group: _GroupState | None = None

    @property
    def ready(self) -> bool:
        return (self.leader_group or self).leader_ready


@dataclass
class _HeldPrefix:
    blocks: int  # the whole prefix
    cost: int  # what holding it added to the budget: the blocks beyond the outer prefix
    outer_id: int | None  # the enclosing prefix it keeps held, if that one was held
    groups: int = 1  # groups in flight that hold it (their own, or a nested one's)


class PrefixReservations:
    """The KV blocks of the shared prefixes in flight, each block counted once.

    A prefix is held while a group using it is in flight. A prefix nested in one already
    held (system prompt > document) costs only its extra blocks, and keeps the outer one
    held: its members' block tables start with the outer prefix's blocks."""

    def __init__(self) -> None:
        self._held: dict[int, _HeldPrefix] = {}

    def cost(self, prefix_id: int, blocks: int, parent_id: int) -> int:
        """Blocks that acquiring this prefix would add now."""
        if prefix_id in self._held:
            return 0
        outer = self._held.get(parent_id)
        return blocks - (outer.blocks if outer else 0)

    def acquire(self, prefix_id: int, blocks: int, parent_id: int) -> int:
        """Hold the prefix for one more group; returns the blocks that added."""
        if (held := self._held.get(prefix_id)) is not None:
            held.groups += 1
            return 0
        cost = self.cost(prefix_id, blocks, parent_id)
        outer_id = parent_id if parent_id in self._held else None
        if outer_id is not None:
            self._held[outer_id].groups += 1
        self._held[prefix_id] = _HeldPrefix(blocks, cost, outer_id)
        return cost

    def release(self, prefix_id: int) -> int:
        """One group no longer holds the prefix; returns the blocks that freed."""
        held = self._held[prefix_id]
        held.groups -= 1
        if held.groups:
            return 0
        del self._held[prefix_id]
        return held.cost + (0 if held.outer_id is None else self.release(held.outer_id))


@dataclass
class StopFlag:
    """Set by the first SIGTERM/SIGINT: stop admitting; the second one aborts at once."""

    requested: bool = False
    at: float = 0.0
    signals: int = 0  # how many stop requests came in
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def request(self) -> bool:
        """Return True if this was the second request (hard stop)."""
        with self._lock:
            self.signals += 1
            if self.requested:
                return True
            self.requested, self.at = True, time.monotonic()
            return False


class Interrupted(BaseException):
    """The job was stopped by a signal; its checkpoint is resumable.

    A BaseException, like KeyboardInterrupt: it is raised from a signal handler wherever the
    main thread happens to be, often inside vLLM, whose `except Exception` handlers would
    otherwise turn it into an engine failure (or swallow it)."""


# runner.EXIT_INTERRUPTED (the runner imports this module, not the other way round).
EXIT_INTERRUPTED = 4
_ABANDON = ("batchrun: third signal: exiting now; finished rows are saved, "
            "run again with --resume\n")


def _say(message: str) -> None:
    # os.write, not print or logging: a handler may run while the main thread is inside
    # either. A closed stderr must not turn a signal into a write error.
    with contextlib.suppress(OSError):
        os.write(2, message.encode())


def install_signal_handlers(stop: StopFlag) -> Callable[[], None]:
    """SIGTERM / SIGINT: the first one drains gracefully, the second one raises Interrupted
    now, a third one (cleanup after the second is taking too long) exits the process at once.
    Returns a function that restores the previous handlers."""

    def handler(signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if not stop.request():
            _say(f"batchrun: {name}: finishing requests in flight, then saving; send it again "
                 "to stop at once\n")
            return
        if stop.signals > 2:
            # Every finished row is already in the journal, flushed and readable after a
            # kill, so leaving without any cleanup loses nothing.
            _say(_ABANDON)
            os._exit(EXIT_INTERRUPTED)
        raise Interrupted(f"second {name}: stopped at once")

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    return lambda: [signal.signal(s, h) for s, h in previous.items()]


class StreamingExecutor:
    def __init__(
        self,
        engine: Engine,
        groups: list[RunGroup],
        make_request: Callable[[int], GenerationRequest],
        on_results: Callable[[list[tuple[int, GenerationResult]]], None],
        *,
        stop: StopFlag | None = None,
        grace_s: float = 30.0,
        max_in_flight: int = 4096,
    ) -> None:
        self.engine = engine
        self._pending: deque[_GroupState] = deque()
        first_of_prefix: dict[int, _GroupState] = {}
        for g in groups:
            if not len(g.members):
                continue
            if g.prefix_len > 0 and g.prefix_id < 0:
                raise ValueError("a group with a shared prefix needs a prefix_id")
            # A group that shares no prefix has no leader to wait for.
            state = _GroupState(g, leader_ready=g.prefix_len == 0,
                                leader_group=first_of_prefix.get(g.prefix_id))
            if g.prefix_id >= 0:
                first_of_prefix.setdefault(g.prefix_id, state)
            self._pending.append(state)
        self._make_request = make_request
        self._on_results = on_results
        self._stop = stop or StopFlag()
        self._grace_s = grace_s
        self._max_in_flight = max_in_flight
        self._budget_blocks = max(engine.info.kv_capacity_tokens // engine.info.block_size, 1)
        self._used_blocks = 0
        self._prefixes = PrefixReservations()
        self._in_flight: dict[str, tuple[int, _GroupState, int]] = {}  # id -> (req, group, blocks)
        self._leaders: dict[str, _GroupState] = {}
        self._started: set[str] = set()  # in flight and past their first step (prefilled)
        self._draining = False
        self.aborted: list[int] = []

    @property
    def reserved_blocks(self) -> int:
        """KV blocks the requests and prefixes in flight are counted for now."""
        return self._used_blocks

    def run(self) -> None:
        """Run until every request finished, or until a stop request's grace period ends."""
        try:
            self._run()
        except BaseException:
            # Interrupted, an engine failure, a write error: requests left in a shared engine
            # would come back as results of the next job run on it.
            with contextlib.suppress(Exception):
                self._abort(list(self._in_flight))
            raise

    def _run(self) -> None:
        while self._pending or self._in_flight:
            if self._stop.requested:
                if not self._draining:
                    # Stop admitting: requests the engine holds but has not started are not
                    # in flight yet, and draining them could outlast any grace period.
                    self._draining = True
                    self._pending.clear()
                    self._abort([rid for rid in self._in_flight if rid not in self._started])
                if time.monotonic() - self._stop.at > self._grace_s:
                    self._abort(list(self._in_flight))
                    break
            else:
                self._admit()
            if not self._in_flight:
                break
            step = self.engine.step()
            self._started.update(step.prefilled)
            for rid in step.prefilled:
                if (state := self._leaders.pop(rid, None)) is not None:
                    state.leader_ready = True
            done = []
            for result in step.finished:
                if result.request_id not in self._in_flight:
                    continue  # aborted on a stop signal (an engine may still report it once)
                req, state, blocks = self._in_flight.pop(result.request_id)
                self._started.discard(result.request_id)
                self._used_blocks -= blocks
                state.in_flight -= 1
                g = state.group
                if state.in_flight == 0 and state.next_member >= len(g.members):
                    self._used_blocks -= state.kept_blocks + (
                        self._prefixes.release(g.prefix_id) if g.prefix_len else 0)
                if self._leaders.pop(result.request_id, None) is not None:
                    state.leader_ready = True
                done.append((req, result))
            if done:
                self._on_results(done)
            if self._in_flight and not self.engine.num_unfinished():
                # Waiting for results an engine no longer has would loop forever.
                raise EngineDiedError(
                    f"the engine dropped {len(self._in_flight)} request(s) without a result")

    def _fits(self, blocks: int) -> bool:
        # Always let one request in, however large, so a job can never stall.
        return not self._in_flight or (self._used_blocks + blocks <= self._budget_blocks
                                       and len(self._in_flight) < self._max_in_flight)

    def _admit(self) -> None:
        for state in list(self._pending):
            g = state.group
            reserved = g.prefix_len > 0  # a shared group's KV is reserved whole, up front
            if reserved and state.next_member == 0 and (state.leader_group is None
                                                         or state.ready):
                # Reserve the whole group (prefix once + every member's suffix) before its
                # leader starts, so its members can follow the leader at once: a member left
                # waiting for room could find the leader gone and its prefix evicted.
                members = int(g.suffix_blocks.sum())
                if not self._fits(members + self._prefixes.cost(
                        g.prefix_id, g.prefix_blocks, g.parent_id)):
                    return
                self._used_blocks += members + self._prefixes.acquire(
                    g.prefix_id, g.prefix_blocks, g.parent_id)
                rid = self._start(state, 0)
                if len(g.members) > 1 and state.leader_group is None:
                    self._leaders[rid] = state
                    continue
                state.leader_ready = True
            if not state.ready:
                continue
            while state.next_member < len(g.members):
                if not reserved:
                    cost = int(g.suffix_blocks[state.next_member])
                    if not self._fits(cost):
                        return
                    self._used_blocks += cost
                self._start(state, state.next_member)
            self._pending.remove(state)

    def _start(self, state: _GroupState, k: int) -> str:
        req_index = int(state.group.members[k])
        request = self._make_request(req_index)
        self.engine.add(request)
        private = int(state.group.private_blocks[k])
        self._in_flight[request.request_id] = (req_index, state, private)
        state.kept_blocks += int(state.group.suffix_blocks[k]) - private
        state.next_member = k + 1
        state.in_flight += 1
        return request.request_id

    def _abort(self, request_ids: list[str]) -> None:
        if request_ids:
            self.engine.abort(request_ids)
        for rid in request_ids:
            self.aborted.append(self._in_flight.pop(rid)[0])
            self._started.discard(rid)
