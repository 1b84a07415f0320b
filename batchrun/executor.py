"""Stream planned requests through an engine: a KV-sized window, each shared prefix computed once.

The executor admits requests in plan order while their prompts' KV fits the engine's KV
cache (`KvBudget`): a shared prefix counted once, not per member nor again for a nested
prefix. Decode blocks are not reserved, as vLLM's own scheduler admits: when decodes outgrow
the cache, vLLM preempts the latest-admitted request, whose blocks stay in the prefix cache,
so it resumes cheaply, where a reservation for decoding that may never happen keeps the
batch small. Requests are admitted one by one, so short requests fill the room long decodes
leave; the plan puts decode-heavy requests first, so vLLM preempts short ones, not them.

A group's first member (its leader) computes the group's prefix; the others are held back
until it has, and from then on find all of it in vLLM's prefix cache. (vLLM does let
requests scheduled in the same step reuse each other's blocks, but only the part of the
prompt that fits the step's token budget: a chunked prefill leaves siblings recomputing the
rest.) A prefix is held, and counted once in the budget, from the start of the first group
cut from it until the last such group finishes (so the cache has room to keep it between
cuts); a group whose prefix was released and is needed again elects a leader of its own.
Leaders of many groups prefill together, and later groups go on starting while a group waits
for its leader; but a group behind others starts its leader only when all its members fit
too: a prefix computed long before its members run would be evicted by then.
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
from .terminal import terminal_fd


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
    # Of each member's private blocks, those its max_tokens of decoding would fill. None: 0.
    decode_blocks: np.ndarray | None = None
    # The nearest shorter prefix this group's prefix shares with other groups (a branching
    # node of the prefix tree, whether a group or not): -1 if none. The first leader under it
    # computes it; sibling leaders wait one step instead of computing it again beside it.
    shared_above_id: int = -1

    def __post_init__(self) -> None:
        if self.private_blocks is None:
            self.private_blocks = self.suffix_blocks
        if self.decode_blocks is None:
            self.decode_blocks = np.zeros_like(self.suffix_blocks)


@dataclass(eq=False)  # identity: a field-wise == compares numpy arrays (ValueError)
class _GroupState:
    group: RunGroup
    next_member: int = 0
    holds_prefix: bool = False
    in_flight: int = 0
    kept_blocks: int = 0  # suffix blocks of started members that other members may still use

    @property
    def shared(self) -> bool:
        return self.group.prefix_len > 0

    @property
    def all_started(self) -> bool:
        return self.next_member >= len(self.group.members)


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

    def holds(self, prefix_id: int) -> bool:
        return prefix_id in self._held

    def release(self, prefix_id: int) -> int:
        """One group no longer holds the prefix; returns the blocks that freed."""
        held = self._held[prefix_id]
        held.groups -= 1
        if held.groups:
            return 0
        del self._held[prefix_id]
        return held.cost + (0 if held.outer_id is None else self.release(held.outer_id))


class StepTrace:
    """The running batch of every engine step, for the summary: its mean over the run and
    over the run's last 10% of time (the tail, where a bad order leaves long decodes alone)."""

    TAIL = 0.1

    def __init__(self) -> None:
        self._times: list[float] = []
        self._sizes: list[int] = []

    def record(self, batch_size: int) -> None:
        self._times.append(time.monotonic())
        self._sizes.append(batch_size)

    def figures(self) -> dict[str, float]:
        if not self._sizes:
            return {"steps": 0, "mean_batch": 0.0, "tail_batch": 0.0}
        times, sizes = np.array(self._times), np.array(self._sizes, dtype=np.float64)
        tail = sizes[times >= times[-1] - self.TAIL * (times[-1] - times[0])]
        return {"steps": len(sizes), "mean_batch": round(float(sizes.mean()), 2),
                "tail_batch": round(float(tail.mean()), 2)}


class KvBudget:
    """The KV blocks the requests and prefixes in flight are expected to hold, against the
    engine's capacity. Changed only through its methods."""

    def __init__(self, capacity_blocks: int) -> None:
        self.capacity = max(capacity_blocks, 1)
        self.used = 0
        self.prefixes = PrefixReservations()
        self._prefix_ready: set[int] = set()  # held prefixes a leader has computed

    def fits(self, blocks: int, nothing_in_flight: bool) -> bool:
        # Always let one request in, however large, so a job can never stall.
        return nothing_in_flight or self.used + blocks <= self.capacity

    @staticmethod
    def member_cost(group: RunGroup, k: int) -> int:
        """Blocks member k's prompt adds (its decode blocks are not reserved: see the module
        notes)."""
        return int(group.suffix_blocks[k]) - int(group.decode_blocks[k])

    def prefix_cost(self, group: RunGroup) -> int:
        return self.prefixes.cost(group.prefix_id, group.prefix_blocks, group.parent_id)

    def hold_prefix(self, group: RunGroup) -> None:
        self.used += self.prefixes.acquire(group.prefix_id, group.prefix_blocks,
                                           group.parent_id)

    def release_prefix(self, group: RunGroup) -> None:
        self.used -= self.prefixes.release(group.prefix_id)
        if not self.prefixes.holds(group.prefix_id):
            self._prefix_ready.discard(group.prefix_id)  # the cache may evict it from now on

    def prefix_computed(self, prefix_id: int) -> None:
        if self.prefixes.holds(prefix_id):  # an unheld prefix may be evicted at any time
            self._prefix_ready.add(prefix_id)

    def prefix_ready(self, prefix_id: int) -> bool:
        return prefix_id in self._prefix_ready

    def take(self, blocks: int) -> None:
        self.used += blocks

    def give_back(self, blocks: int) -> None:
        self.used -= blocks



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
        os.write(terminal_fd(), message.encode())


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
        trace: StepTrace | None = None,
    ) -> None:
        self.engine = engine
        self._pending: deque[_GroupState] = deque()
        self._cuts: dict[int, list[_GroupState]] = {}  # prefix_id -> its groups
        for g in groups:
            if not len(g.members):
                continue
            if g.prefix_len > 0 and g.prefix_id < 0:
                raise ValueError("a group with a shared prefix needs a prefix_id")
            state = _GroupState(g)
            self._pending.append(state)
            if state.shared:
                self._cuts.setdefault(g.prefix_id, []).append(state)
        self._make_request = make_request
        self._on_results = on_results
        self._stop = stop or StopFlag()
        self._grace_s = grace_s
        self._max_in_flight = max_in_flight
        info = engine.info
        self._budget = KvBudget(info.kv_capacity_tokens // info.block_size)
        # id -> (request index, group, blocks it holds)
        self._in_flight: dict[str, tuple[int, _GroupState, int]] = {}
        # leader id -> its group, and the prefixes it computes
        self._leaders: dict[str, tuple[_GroupState, list[int]]] = {}
        self._computing: set[int] = set()  # prefixes a leader in flight is computing
        self._shared_computed: set[int] = set()  # outer prefixes a leader has computed
        self._started: set[str] = set()  # in flight and past their first step (prefilled)
        self._draining = False
        self.aborted: list[int] = []
        self.trace = trace if trace is not None else StepTrace()

    @property
    def reserved_blocks(self) -> int:
        """KV blocks the requests and prefixes in flight are counted for now."""
        return self._budget.used

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
            self.trace.record(step.batch_size)
            self._started.update(step.prefilled)
            for rid in step.prefilled:
                self._leader_done(rid)
            done = [self._finish(result) for result in step.finished
                    # an engine may report a request aborted at a stop once more: not ours
                    if result.request_id in self._in_flight]
            if done:
                self._on_results(done)
            if self._in_flight and not self.engine.num_unfinished():
                # Waiting for results an engine no longer has would loop forever.
                raise EngineDiedError(
                    f"the engine dropped {len(self._in_flight)} request(s) without a result")

    def _computed_by_leader(self, g: RunGroup) -> list[int]:
        """The prefixes group g's leader computes: its own, and those its prefix extends that
        no leader has computed yet (sibling groups wait for them rather than compute them
        again in the same step)."""
        return [g.prefix_id] + [
            above for above in dict.fromkeys((g.parent_id, g.shared_above_id))
            if above >= 0 and above not in self._shared_computed
            and not self._budget.prefix_ready(above)]

    def _leader_done(self, rid: str) -> None:
        """The leader prefilled (or finished): its prefixes are cached, its group (and
        groups under the prefix it extends) may follow."""
        if (leading := self._leaders.pop(rid, None)) is not None:
            for prefix_id in leading[1]:
                self._computing.discard(prefix_id)
                self._budget.prefix_computed(prefix_id)
            # Computed once, an outer prefix stays a hint: if the cache evicts it later, the
            # next leaders compute it again beside each other, as with no hint at all.
            self._shared_computed.update(leading[1][1:])

    def _finish(self, result: GenerationResult) -> tuple[int, GenerationResult]:
        req, state, blocks = self._in_flight.pop(result.request_id)
        self._started.discard(result.request_id)
        self._leader_done(result.request_id)
        self._budget.give_back(blocks)
        state.in_flight -= 1
        if state.in_flight == 0 and state.all_started:
            self._budget.give_back(state.kept_blocks)
            if state.holds_prefix:
                self._budget.release_prefix(state.group)
        return req, result

    def _fits(self, blocks: int) -> bool:
        return self._budget.fits(blocks, not self._in_flight) and \
            len(self._in_flight) < self._max_in_flight

    def _admit(self) -> None:
        """Start requests in plan order while they fit; a group waiting for its leader lets
        the groups after it go ahead."""
        for position, state in enumerate(list(self._pending)):
            g = state.group
            needs_leader = state.shared and not self._budget.prefix_ready(g.prefix_id) and \
                g.prefix_id not in self._computing
            if needs_leader and position > 0 and not self._fits(self._whole_cost(state)):
                return
            if state.shared and not state.holds_prefix:
                if not self._fits(self._budget.prefix_cost(g) + self._budget.member_cost(g, 0)):
                    return
                self._hold_prefix(g.prefix_id)
            if state.shared and not self._budget.prefix_ready(g.prefix_id):
                if {g.prefix_id, g.parent_id, g.shared_above_id} & self._computing:
                    continue  # a leader in flight computes it, or a prefix it extends
                leader = self._start_member(state)
                if leader is None:
                    return
                computes = self._computed_by_leader(g)
                self._computing.update(computes)
                self._leaders[leader] = (state, computes)
                if state.all_started:
                    self._pending.remove(state)
                continue
            while not state.all_started:
                if self._start_member(state) is None:
                    return
            self._pending.remove(state)

    def _whole_cost(self, state: _GroupState) -> int:
        """Blocks the group's prefix and all its members not started yet would take, their
        decode counted in full (a bound, cheap for groups of any size)."""
        g = state.group
        return self._budget.prefix_cost(g) + int(g.suffix_blocks[state.next_member:].sum())

    def _hold_prefix(self, prefix_id: int) -> None:
        """Hold a prefix for every group cut from it, started or not: it stays counted in
        the budget (so the cache has room to keep it) until the last of them finishes."""
        for state in self._cuts[prefix_id]:
            if not state.holds_prefix:
                self._budget.hold_prefix(state.group)
                state.holds_prefix = True

    def _start_member(self, state: _GroupState) -> str | None:
        """Start the group's next member if its KV fits; its request id, else None."""
        g, k = state.group, state.next_member
        cost = self._budget.member_cost(g, k)
        if not self._fits(cost):
            return None
        self._budget.take(cost)
        request = self._make_request(int(g.members[k]))
        self.engine.add(request)
        shared_with_others = int(g.suffix_blocks[k]) - int(g.private_blocks[k])
        self._in_flight[request.request_id] = (int(g.members[k]), state,
                                               cost - shared_with_others)
        state.kept_blocks += shared_with_others
        state.next_member = k + 1
        state.in_flight += 1
        return request.request_id

    def _abort(self, request_ids: list[str]) -> None:
        if request_ids:
            self.engine.abort(request_ids)
        for rid in request_ids:
            self.aborted.append(self._in_flight.pop(rid)[0])
            self._started.discard(rid)
