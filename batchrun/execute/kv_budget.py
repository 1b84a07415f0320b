"""The executor's KV budget: the blocks the requests and prefixes in flight are expected to
hold, against the engine's KV cache.

Like vLLM's scheduler asking its KVCacheManager, the executor asks the budget whether a
request or a prefix fits, and tells it what starts and what finishes; only the budget changes
the count. A shared prefix is counted once, however many groups use it, and a prefix nested
in one already held (system prompt > document) only for its extra blocks
(`PrefixReservations`). Decode blocks are not counted: see the executor's module notes.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..plan.groups import RunGroup


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


class KvBudget:
    """The KV blocks in flight against the engine's capacity. Changed only through its
    methods: a member starting or finishing, a group finishing, a prefix held or released."""

    def __init__(self, capacity_blocks: int) -> None:
        self.capacity = max(capacity_blocks, 1)
        self._used = 0
        self._prefixes = PrefixReservations()
        self._prefix_ready: set[int] = set()  # held prefixes a leader has computed

    @property
    def used(self) -> int:
        return self._used

    def fits(self, blocks: int, nothing_in_flight: bool) -> bool:
        # Always let one request in, however large, so a job can never stall.
        return nothing_in_flight or self._used + blocks <= self.capacity

    @staticmethod
    def member_cost(group: RunGroup, k: int) -> int:
        """Blocks member k's prompt adds (its decode blocks are not reserved: see the
        executor's module notes)."""
        return int(group.suffix_blocks[k]) - int(group.decode_blocks[k])

    @staticmethod
    def members_cost(group: RunGroup, first: int) -> int:
        """Blocks the prompts of members `first`.. add: member_cost summed."""
        rest = slice(first, len(group.members))
        return int(group.suffix_blocks[rest].sum()) - int(group.decode_blocks[rest].sum())

    def prefix_cost(self, group: RunGroup) -> int:
        """Blocks holding the group's prefix would add now (0 when it is held already)."""
        return self._prefixes.cost(group.prefix_id, group.prefix_blocks, group.parent_id)

    def hold_prefix(self, group: RunGroup) -> None:
        self._used += self._prefixes.acquire(group.prefix_id, group.prefix_blocks,
                                             group.parent_id)

    def holds(self, prefix_id: int) -> bool:
        """Whether a group in flight, or waiting to start, holds the prefix."""
        return self._prefixes.holds(prefix_id)

    def prefix_computed(self, prefix_id: int) -> None:
        if self._prefixes.holds(prefix_id):  # an unheld prefix may be evicted at any time
            self._prefix_ready.add(prefix_id)

    def prefix_ready(self, prefix_id: int) -> bool:
        return prefix_id in self._prefix_ready

    def start_member(self, group: RunGroup, k: int) -> tuple[int, int]:
        """Count member k's prompt. Returns the blocks it frees when it finishes, and those it
        keeps for the group (blocks other members use too), freed when the group finishes."""
        cost = self.member_cost(group, k)
        kept = int(group.suffix_blocks[k]) - int(group.private_blocks[k])
        self._used += cost
        return cost - kept, kept

    def member_finished(self, own_blocks: int) -> None:
        self._used -= own_blocks

    def group_finished(self, group: RunGroup, kept_blocks: int, holds_prefix: bool) -> None:
        """The group's last member finished: its kept blocks go, and its hold on its prefix
        (the cache may evict the prefix from then on unless another group holds it)."""
        self._used -= kept_blocks
        if holds_prefix:
            self._used -= self._prefixes.release(group.prefix_id)
            if not self._prefixes.holds(group.prefix_id):
                self._prefix_ready.discard(group.prefix_id)
