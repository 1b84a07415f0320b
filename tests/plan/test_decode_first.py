"""Decode-heavy members of every group run first; a job that asks for about the same number
of tokens everywhere keeps its plan."""

from __future__ import annotations

import numpy as np

from batchrun.plan.groups import RunGroup, decode_heavy_first


def group(members: list[int], prefix_id: int) -> RunGroup:
    n = len(members)
    return RunGroup(np.array(members), 32, 8, np.full(n, 3), prefix_id, private_blocks=None,
                    decode_blocks=np.full(n, 1))


def test_every_groups_long_decodes_go_first_keeping_their_prefix():
    # Two system prompts, 4 rows each; rows 2 and 5 ask for essays, the rest for one word.
    max_tokens = np.array([8, 8, 192, 8, 8, 192, 8, 8])
    groups = [group([0, 1, 2, 3], prefix_id=1), group([4, 5, 6, 7], prefix_id=2)]
    out = decode_heavy_first(groups, max_tokens)
    assert [g.members.tolist() for g in out] == [[2], [5], [0, 1, 3], [4, 6, 7]]
    assert [g.prefix_id for g in out] == [1, 2, 1, 2]
    assert all(len(g.suffix_blocks) == len(g.decode_blocks) == len(g.members) for g in out)


def test_uniform_jobs_and_chained_groups_keep_their_order():
    groups = [group([0, 1], prefix_id=1), group([2, 3], prefix_id=2)]
    assert decode_heavy_first(groups, np.array([24, 24, 30, 20])) is groups
    chat = RunGroup(np.array([0, 1, 2]), 32, 8, np.array([3, 2, 2]), 1,
                    private_blocks=np.array([1, 1, 2]), decode_blocks=np.array([1, 1, 1]))
    # Turns of one chat share blocks beyond the prefix: pulling one out would break them.
    assert decode_heavy_first([chat], np.array([8, 200, 8]))[0] is chat
