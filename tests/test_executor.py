"""The executor's admission rules, watched through what reached the engine and when.

Claims about the executor are checked on `EngineLog`: which requests it sent before which
engine step, and in which step each request's prompt was computed. The fake engine's cache
rule (blocks reusable from the step after they were computed) is not vLLM's (vLLM lets
requests scheduled in one step share blocks within the step's token budget), so these tests
do not count the fake's cache hits to tell whether requests were held back. Where a test does
count cache hits (eviction), the fake's cache is small enough to evict what the claim is
about."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest

from batchrun.engine.base import GenerationRequest, StepOutput
from batchrun.engine.fake import FakeEngine
from batchrun.execute import output_lengths
from batchrun.execute.executor import StreamingExecutor
from batchrun.execute.kv_budget import PrefixReservations
from batchrun.execute.stop import StopFlag
from batchrun.plan.groups import RunGroup

PREFIX = list(range(100, 132))  # 8 blocks of 4 tokens


class EngineLog:
    """An engine as the executor sees it, with a log of what reached it: `sent[rid]` is the
    number of engine steps run before the request was added (sent together: same number),
    `prefilled[rid]` the step (1-based) whose output reported its prompt computed. A request
    sent at k >= prefilled[leader] was held back until the leader's prompt was computed."""

    def __init__(self, engine: FakeEngine) -> None:
        self.engine, self.info = engine, engine.info
        self.steps = 0
        self.sent: dict[str, int] = {}
        self.prefilled: dict[str, int] = {}

    def add(self, request: GenerationRequest) -> None:
        self.sent[request.request_id] = self.steps
        self.engine.add(request)

    def step(self) -> StepOutput:
        out = self.engine.step()
        self.steps += 1
        for rid in out.prefilled:
            self.prefilled.setdefault(rid, self.steps)
        return out

    def num_unfinished(self) -> int:
        return self.engine.num_unfinished()

    def abort(self, request_ids: list[str]) -> None:
        self.engine.abort(request_ids)

    def sent_at(self, *request_ids: str) -> list[int]:
        return [self.sent[rid] for rid in request_ids]


def requests(n: int, prefix: list[int]) -> list[GenerationRequest]:
    return [GenerationRequest(f"q{i}", prefix + [i, i + 1000], max_tokens=3) for i in range(n)]


def group(members: list[int], prefix_len: int, prefix_id: int = 1, parent_id: int = -1,
          suffix_blocks: int = 2) -> RunGroup:
    return RunGroup(np.array(members), prefix_len, prefix_len // 4,
                    np.full(len(members), suffix_blocks), prefix_id if prefix_len else -1,
                    parent_id)


def run(engine: FakeEngine | EngineLog, reqs: list[GenerationRequest], groups: list[RunGroup],
        **kw):
    done: dict[int, object] = {}
    ex = StreamingExecutor(engine, groups, lambda i: reqs[i],
                           lambda batch: done.update(batch), **kw)
    ex.run()
    return done, ex


def test_siblings_wait_for_the_leader_and_then_hit_the_cache():
    log = EngineLog(FakeEngine(block_size=4))
    reqs = requests(6, PREFIX)
    done, _ = run(log, reqs, [group(list(range(6)), 32)])
    assert len(done) == 6
    # The leader went alone; its siblings only once its prompt (the prefix) was computed.
    assert log.sent["q0"] == 0 and log.prefilled["q0"] == 1
    assert log.sent_at(*(f"q{i}" for i in range(1, 6))) == [1] * 5
    # From then on the whole shared prefix was in the cache: computed once, by q0.
    assert [done[i].cached_tokens for i in range(6)] == [0] + [32] * 5


def test_a_group_without_a_shared_prefix_sends_all_its_members_at_once():
    log = EngineLog(FakeEngine(block_size=4))
    reqs = requests(6, PREFIX)
    done, _ = run(log, reqs, [group(list(range(6)), 0)])  # prefix_len 0: no leader, no hold
    assert len(done) == 6
    assert log.sent_at(*(f"q{i}" for i in range(6))) == [0] * 6


def test_groups_cut_from_one_prefix_share_one_leader():
    log = EngineLog(FakeEngine(block_size=4))
    reqs = requests(8, PREFIX)
    done, _ = run(log, reqs, [group([0, 1, 2, 3], 32, prefix_id=7),
                              group([4, 5, 6, 7], 32, prefix_id=7)])
    assert len(done) == 8
    # q0 leads both cuts: no one else is sent before its prompt is computed, the second
    # cut's first member included.
    assert [rid for rid, k in log.sent.items() if k < log.prefilled["q0"]] == ["q0"]
    assert log.sent_at(*(f"q{i}" for i in range(1, 8))) == [log.prefilled["q0"]] * 7


class RunningLog(FakeEngine):
    """Records the requests running in each step."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.running: list[set[str]] = []

    def step(self) -> StepOutput:
        out = super().step()
        self.running.append(set(self._running) | {r.request_id for r in out.finished})
        return out


def test_window_never_exceeds_the_kv_budget_but_always_admits_one():
    # 10 blocks of KV. Requests of 4 blocks: two fit side by side, a third would not. One
    # request of 14 blocks needs more than the whole cache: it runs, alone.
    engine = RunningLog(block_size=4, kv_capacity_tokens=40)
    reqs = [GenerationRequest(f"u{i}", [i] * 14, max_tokens=2) for i in range(6)]
    reqs.insert(3, GenerationRequest("huge", [9] * 54, max_tokens=2))
    blocks = np.array([4, 4, 4, 14, 4, 4, 4])
    done, ex = run(engine, reqs, [RunGroup(np.arange(7), 0, 0, blocks)])
    assert len(done) == 7 and ex.reserved_blocks == 0
    cost = {r.request_id: int(b) for r, b in zip(reqs, blocks, strict=True)}
    for running in engine.running:
        assert sum(cost[rid] for rid in running) <= 10 or running == {"huge"}
    assert {"huge"} in engine.running  # admitted, though over the budget: alone
    assert engine.max_running_seen == 2


class ToMaxTokens(FakeEngine):
    """Decodes every request to its max_tokens."""

    @staticmethod
    def _target(request: GenerationRequest, tokens: list[str]) -> int:
        return request.max_tokens


class Endless(ToMaxTokens):
    """Decodes every request to its max_tokens; stops the run when its step `stop_at` ends."""

    def __init__(self, stop: StopFlag, stop_at: int, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self._stop, self._stop_at = stop, stop_at

    def step(self) -> StepOutput:
        out = super().step()
        if self.steps == self._stop_at:
            self._stop.request()
        return out


def test_stop_flag_drains_then_aborts_after_the_grace_period():
    # The engine runs two requests at a time; the executor holds four in flight (two of them
    # waiting in the engine) and two more pending. The stop comes after step 2.
    stop = StopFlag()
    engine = Endless(stop, stop_at=2, block_size=4, max_num_seqs=2, step_delay_s=0.01)
    lengths = [3, 10_000, 5, 5, 5, 5]  # s0 finishes while draining, s1 would take minutes
    reqs = [GenerationRequest(f"s{i}", [i, 1, 2], max_tokens=n) for i, n in enumerate(lengths)]
    done, ex = run(engine, reqs, [group(list(range(6)), 0)], stop=stop, grace_s=0.3,
                   max_in_flight=4)
    assert engine.admission_order == ["s0", "s1"]  # nothing started after the stop
    # At the stop: the requests the engine had not started are aborted (s2, s3), the pending
    # ones never sent (s4, s5). The drain lets s0 finish; s1 is aborted when the grace ends.
    assert list(done) == [0] and ex.aborted == [2, 3, 1]
    assert engine.steps > 3 and time.monotonic() - stop.at >= 0.3  # it drained, then aborted
    assert engine.num_unfinished() == 0  # nothing left behind in the engine


def test_a_group_finishing_admission_while_an_earlier_one_waits_for_its_leader():
    log = EngineLog(FakeEngine(block_size=4))
    reqs = requests(6, PREFIX) + [GenerationRequest("lone", [7, 7, 7], max_tokens=2)]
    done, _ = run(log, reqs, [group([0, 1, 2], 32, prefix_id=1),
                              group([3, 4, 5], 32, prefix_id=1), group([6], 0)])
    assert len(done) == 7
    # The unshared request started while the prefix group still waited for its leader.
    assert log.engine.admission_order[:2] == ["q0", "lone"]
    assert log.sent_at("q0", "lone") == [0, 0] and log.sent["q1"] == log.prefilled["q0"]


def test_a_nested_prefix_costs_only_its_extra_blocks_while_the_outer_one_is_held():
    prefixes = PrefixReservations()
    assert prefixes.acquire(1, blocks=8, parent_id=-1) == 8  # system prompt
    assert prefixes.cost(2, blocks=12, parent_id=1) == 4  # a document under it
    assert prefixes.acquire(2, blocks=12, parent_id=1) == 4
    assert prefixes.acquire(2, blocks=12, parent_id=1) == 0  # a second group cut from it
    # The system prompt's own group ends first: its blocks stay, the document's groups use them.
    assert prefixes.release(1) == 0
    assert prefixes.release(2) == 0
    assert prefixes.release(2) == 4 + 8  # the last holder frees both
    assert prefixes.cost(2, blocks=12, parent_id=1) == 12  # nothing held any more


def test_nested_groups_run_side_by_side_in_a_window_that_fits_them_counted_once():
    # Outer prefix 8 blocks, nested prefix 12 blocks (the outer 8 + 4), 2 members each with
    # 2 blocks of their own: 8 + 4 + 4 + 4 = 20 blocks together; 28 if each prefix counted
    # in full. A 20-block cache runs all four requests at once.
    # Each request decodes all its 4 tokens: the two leaders (the inner one waits a step for
    # the outer prefix its own extends) and both followers overlap.
    engine = ToMaxTokens(block_size=4, kv_capacity_tokens=80)
    outer, inner = PREFIX, PREFIX + list(range(200, 216))
    reqs = [GenerationRequest(f"q{i}", outer + [i, i + 1000], max_tokens=4) for i in range(2)]
    reqs += [GenerationRequest(f"n{i}", inner + [i], max_tokens=4) for i in range(2)]
    done, ex = run(engine, reqs, [group([0, 1], 32, prefix_id=1),
                                  group([2, 3], 48, prefix_id=2, parent_id=1)])
    assert len(done) == 4 and engine.max_running_seen == 4
    assert ex.reserved_blocks == 0  # every reservation was given back


def test_a_shared_group_without_a_prefix_id_is_refused():
    with pytest.raises(ValueError, match="prefix_id"):
        StreamingExecutor(FakeEngine(block_size=4),
                          [RunGroup(np.arange(2), 32, 8, np.full(2, 2))],
                          lambda i: None, lambda batch: None)


def test_requests_are_admitted_by_their_prompt_blocks_not_their_decode():
    # 20 blocks; each request: 1 prompt block + 4 blocks should it decode all 16 max_tokens.
    # Counting decode in full, 4 would run at once; by their prompts (vLLM's own rule) all
    # 12 do, and vLLM preempts should decodes outgrow the cache.
    engine = FakeEngine(block_size=4, kv_capacity_tokens=80)
    reqs = [GenerationRequest(f"d{i}", [i, 1, 2], max_tokens=16) for i in range(12)]
    heavy = RunGroup(np.arange(12), 0, 0, np.full(12, 5), decode_blocks=np.full(12, 4))
    done, ex = run(engine, reqs, [heavy])
    assert len(done) == 12 and engine.max_running_seen == 12
    assert ex.reserved_blocks == 0


def test_cuts_of_one_prefix_keep_it_counted_until_the_last_one_finishes():
    # Room for one cut at a time (prefix 8 blocks + 3 members x 2): between the cuts the
    # prefix stays counted in the budget, so the cache has room to keep it, and the second
    # cut follows without a leader of its own.
    engine = FakeEngine(block_size=4, kv_capacity_tokens=60)  # 15 blocks
    reqs = requests(6, PREFIX)
    reserved_after: dict[int, int] = {}
    ex = StreamingExecutor(engine, [group([0, 1, 2], 32, prefix_id=3),
                                    group([3, 4, 5], 32, prefix_id=3)], lambda i: reqs[i],
                           lambda batch: reserved_after.update(
                               {i: ex.reserved_blocks for i, _ in batch}))
    ex.run()
    first_cut_done = max(reserved_after[i] for i in (0, 1, 2))
    assert first_cut_done >= 8  # the prefix, still held for the second cut
    assert ex.reserved_blocks == 0 and engine.admission_order[0] == "q0"
    assert sorted(engine.admission_order) == [f"q{i}" for i in range(6)]
    assert len(reserved_after) == 6


def test_a_group_behind_others_starts_its_leader_only_when_its_members_fit_too():
    # 28 blocks. Each member: its prefix's 8 blocks, then 9 tokens of its own (2 full blocks
    # and a partial one: 3 blocks). The first group needs 8 + 8 x 3 = 32 blocks: it fills the
    # cache, its members run in turns. Beside its leader (11 blocks) the second group's
    # leader (11) would fit; started then, it would compute its prefix long before its
    # members could run, and the first group's members, computing their own 16 blocks
    # meanwhile, push that prefix out of the cache (8 + 16 + 16 + 8 blocks > 28).
    log = EngineLog(FakeEngine(block_size=4, kv_capacity_tokens=112))
    first = [GenerationRequest(f"q{i}", PREFIX + [1000 + 9 * i + t for t in range(9)],
                               max_tokens=3) for i in range(8)]
    other = [GenerationRequest(f"o{i}", list(range(300, 332)) + [5000 + 9 * i + t
                                                               for t in range(9)],
                               max_tokens=3) for i in range(4)]
    done, _ = run(log, first + other, [group(list(range(8)), 32, 1, suffix_blocks=3),
                                       group([8, 9, 10, 11], 32, 2, suffix_blocks=3)])
    assert len(done) == 12
    # The second leader was sent only when all its members could follow it: they were, in
    # the step its prompt was computed.
    assert log.sent["o0"] >= max(log.sent_at(*(f"q{i}" for i in range(8))))
    assert log.sent_at("o1", "o2", "o3") == [log.prefilled["o0"]] * 3
    # So each prefix was computed once, by its leader, and found whole by every member.
    assert [done[i].cached_tokens for i in range(12)] == [0] + [32] * 7 + [0] + [32] * 3


def test_a_group_behind_others_leaves_room_for_members_waiting_on_their_leader():
    # The first group's leader is prefilling; its 7 other members start the moment it has.
    # Beside the leader alone, the second group would fit (10 + 16 of 32 blocks), beside all
    # of the first group it does not (24 + 16): started then, its leader would finish while
    # its members wait, and vLLM may evict a prefix nothing references before they start.
    log = EngineLog(FakeEngine(block_size=4, kv_capacity_tokens=128))  # 32 blocks
    first = requests(8, PREFIX)
    other = [GenerationRequest(f"o{i}", list(range(300, 332)) + [i], max_tokens=3)
             for i in range(4)]
    done, _ = run(log, first + other, [group(list(range(8)), 32, prefix_id=1),
                                       group([8, 9, 10, 11], 32, prefix_id=2)])
    assert len(done) == 12
    # The first group's members went the moment its leader's prompt was computed; the
    # second leader only after them, not beside the first leader.
    assert log.sent_at(*(f"q{i}" for i in range(1, 8))) == [log.prefilled["q0"]] * 7
    assert log.sent["o0"] > log.sent["q0"]
    order = log.engine.admission_order
    assert order.index("o0") > max(order.index(f"q{i}") for i in range(8))
    assert sum(done[i].cached_tokens == 0 for i in range(12)) == 2  # each prefix once


def test_sibling_leaders_wait_for_the_prefix_they_share_instead_of_computing_it_twice():
    # A system prompt (8 blocks) that the planner chose as no group of its own, and two
    # document groups below it (prefix tree node 1 above both): the first leader computes the
    # system prompt, the second is sent once that prompt is computed, a step later. (Sent
    # together, vLLM computes it once only while both prompts fit one step's token budget;
    # a chunked prefill computes it twice.)
    docs = [list(range(200, 216)), list(range(300, 316))]
    reqs = [GenerationRequest(f"d{d}m{m}", PREFIX + docs[d] + [m, 9], max_tokens=2)
            for d in range(2) for m in range(2)]

    def sent(shared_above_id: int) -> tuple[EngineLog, int]:
        groups = [replace(group([0, 1], 48, prefix_id=2), shared_above_id=shared_above_id),
                  replace(group([2, 3], 48, prefix_id=3), shared_above_id=shared_above_id)]
        log = EngineLog(FakeEngine(block_size=4, kv_capacity_tokens=4096))
        done, _ = run(log, reqs, groups)
        assert len(done) == 4
        return log, sum(r.prompt_tokens - r.cached_tokens for r in done.values())

    held, computed = sent(1)
    assert held.sent_at("d0m0", "d1m0") == [0, held.prefilled["d0m0"]] == [0, 1]
    # Each leader's member follows once that leader's own prompt is computed.
    assert held.sent["d0m1"] == held.prefilled["d0m0"]
    assert held.sent["d1m1"] == held.prefilled["d1m0"]
    # The system prompt once, each document once, each member's own last block.
    assert computed == len(PREFIX) + 2 * 16 + 4 * 2
    # Without the shared node, nothing holds the second leader: both are sent at once.
    free, _ = sent(-1)
    assert free.sent_at("d0m0", "d1m0") == [0, 0]


LIGHT_HEAD, HEAVY_HEAD = [900 + t for t in range(8)], [700 + t for t in range(8)]


class AnswersByHead(FakeEngine):
    """A prompt under LIGHT_HEAD answers in one token (a classifier), any other decodes to
    its max_tokens (an essay)."""

    @staticmethod
    def _target(request: GenerationRequest, tokens: list[str]) -> int:
        return 1 if request.prompt_token_ids[0] == LIGHT_HEAD[0] else request.max_tokens


def light_then_heavy(kv_capacity_tokens: int, lights: int = 40
                     ) -> tuple[AnswersByHead, StreamingExecutor]:
    """`lights` light requests planned before 3 heavy ones, all asking for 80 tokens; each
    prompt 2 blocks of shared head and 2 of its own (4-token blocks)."""
    reqs = [GenerationRequest(f"light{i}", LIGHT_HEAD + [i, i + 1000], max_tokens=80)
            for i in range(lights)]
    reqs += [GenerationRequest(f"heavy{i}", HEAVY_HEAD + [i, i + 1000], max_tokens=80)
             for i in range(3)]
    engine = AnswersByHead(block_size=4, kv_capacity_tokens=kv_capacity_tokens)
    done, ex = run(engine, reqs, [group(list(range(lights)), 8, prefix_id=1),
                                  group(list(range(lights, lights + 3)), 8, prefix_id=2)])
    assert len(done) == lights + 3
    return engine, ex


def test_a_prefix_whose_first_members_answer_briefly_lets_later_work_start_before_its_rest(
        monkeypatch: pytest.MonkeyPatch):
    # 32 blocks: the light head and 15 members fit at once. Their first 8 answer in one
    # token: the head is light, and its members not started yet (most of the 200) go behind
    # the heavy group, which starts now instead of after all 200.
    engine, ex = light_then_heavy(kv_capacity_tokens=128, lights=200)
    # The heavy decodes overlap the light rest: the run takes about their 80 steps.
    assert engine.steps <= 80 + 8
    order = engine.admission_order
    assert order.index("heavy0") < order.index("light199")
    assert ex.trace.figures()["deferred_light_prefixes"] == 1
    # Learning nothing (no prefix's sample ever complete), the heavy group waits for all
    # 200 light requests (about 15 at a time) and then decodes alone: the bound above fails.
    monkeypatch.setattr(output_lengths, "SAMPLE", 10**9)
    unlearned, ex = light_then_heavy(kv_capacity_tokens=128, lights=200)
    assert ex.trace.figures()["deferred_light_prefixes"] == 0
    assert unlearned.admission_order.index("heavy0") > unlearned.admission_order.index(
        "light199")
    assert unlearned.steps > 80 + 8


def test_a_light_prefix_too_large_to_hold_aside_keeps_its_place():
    # 16 blocks: the 2-block light head is over 1/16 of the cache, so holding it while it
    # waits behind other work would cost the running batch: plan order stands.
    engine, ex = light_then_heavy(kv_capacity_tokens=64)
    order = engine.admission_order
    assert order.index("heavy0") > order.index("light39")
    assert ex.trace.figures()["deferred_light_prefixes"] == 0
