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
too, beside the members of earlier groups that wait for their own leaders: a leader that
finishes before its members start leaves its prefix referenced by no request, and vLLM's
cache evicts the least recently freed blocks first, held by the budget or not.

The plan ranks work by max_tokens; as the run goes, the first members of each shared prefix
show how long its requests really answer (`OutputLengths`). A prefix found light (a
classifier's one-word answers under a ceiling of hundreds of tokens) sends its requests not
started yet behind the rest of the pending work, whose length is not known yet: if that
work decodes for long, it starts now and overlaps the light requests, instead of decoding
alone at the end. The light prefix stays held meanwhile (its members will use it), so only
prefixes that together hold at most 1/DEFER_SHARE of the cache are deferred at a time.
"""

from __future__ import annotations

import contextlib
import operator
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from ..engine.base import Engine, GenerationRequest, GenerationResult
from ..errors import EngineDiedError
from ..plan.groups import RunGroup
from .kv_budget import KvBudget
from .output_lengths import OutputLengths
from .stop import StopFlag
from .trace import StepTrace

DEFER_SHARE = 16


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
        self._lengths = OutputLengths()
        self._deferred: dict[int, int] = {}  # light prefixes deferred -> their blocks
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
            self.trace.stepping()
            step = self.engine.step()
            self.trace.record(step)
            self._started.update(step.prefilled)
            for rid in step.prefilled:
                self._leader_done(rid)
            finished = [self._finish(result) for result in step.finished
                    # an engine may report a request aborted at a stop once more: not ours
                    if result.request_id in self._in_flight]
            if finished:
                self._on_results(finished)
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
        self._budget.member_finished(blocks)
        state.in_flight -= 1
        if state.in_flight == 0 and state.all_started:
            self._budget.group_finished(state.group, state.kept_blocks, state.holds_prefix)
        if result.error is not None:
            self._lengths.failed(result.request_id)
        elif (light := self._lengths.finished(result.request_id,
                                              result.completion_tokens)) is not None:
            self._defer(light)
        return req, result

    def _fits(self, blocks: int) -> bool:
        return self._budget.fits(blocks, not self._in_flight) and \
            len(self._in_flight) < self._max_in_flight

    def _admit(self) -> None:
        """Start requests in plan order while they fit; a group waiting for its leader lets
        the groups after it go ahead, but only with room left for its own members: they
        start the moment the leader has prefilled."""
        promised = 0  # prompt blocks of members waiting for their group's leader
        for position, state in enumerate(list(self._pending)):
            g = state.group
            needs_leader = state.shared and not self._budget.prefix_ready(g.prefix_id) and \
                g.prefix_id not in self._computing
            if needs_leader and position > 0 and \
                    not self._fits(self._whole_cost(state) + promised):
                return
            if state.shared and not state.holds_prefix:
                if not self._fits(self._budget.prefix_cost(g) + self._budget.member_cost(g, 0)):
                    return
                self._hold_prefix(g.prefix_id)
            if state.shared and not self._budget.prefix_ready(g.prefix_id):
                if not {g.prefix_id, g.parent_id, g.shared_above_id} & self._computing:
                    # No leader in flight computes it, or a prefix it extends: start one.
                    leader = self._start_member(state)
                    if leader is None:
                        return
                    computes = self._computed_by_leader(g)
                    self._computing.update(computes)
                    self._leaders[leader] = (state, computes)
                    if state.all_started:
                        self._pending.remove(state)
                promised += self._budget.members_cost(g, state.next_member)
                continue
            while not state.all_started:
                if self._start_member(state) is None:
                    return
            self._pending.remove(state)

    def _defer(self, prefix_id: int) -> None:
        """Send a light prefix's groups not started in full behind the rest of the pending
        work, if the prefixes deferred so far leave room under the cap."""
        waiting = [s for s in self._cuts[prefix_id] if not s.all_started]
        if self._draining or not waiting or \
                all(map(operator.is_, list(self._pending)[-len(waiting):], waiting)):
            return  # nothing left to defer, or it is at the back already
        self._deferred = {p: b for p, b in self._deferred.items() if self._budget.holds(p)}
        blocks = waiting[0].group.prefix_blocks
        if (sum(self._deferred.values()) + blocks) * DEFER_SHARE > self._budget.capacity:
            return
        self._deferred[prefix_id] = blocks
        for state in waiting:
            self._pending.remove(state)
            self._pending.append(state)
        self.trace.prefix_deferred()

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
        if not self._fits(self._budget.member_cost(g, k)):
            return None
        own, kept = self._budget.start_member(g, k)
        request = self._make_request(int(g.members[k]))
        self.engine.add(request)
        if state.shared:
            self._lengths.started(g.prefix_id, request.request_id, request.max_tokens)
        self._in_flight[request.request_id] = (int(g.members[k]), state, own)
        state.kept_blocks += kept
        state.next_member = k + 1
        state.in_flight += 1
        return request.request_id

    def _abort(self, request_ids: list[str]) -> None:
        if request_ids:
            self.engine.abort(request_ids)
        for rid in request_ids:
            self.aborted.append(self._in_flight.pop(rid)[0])
            self._started.discard(rid)
