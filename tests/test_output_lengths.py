"""Output lengths learned as the run goes: when a shared prefix is found light."""

from __future__ import annotations

from batchrun.execute.output_lengths import SAMPLE, OutputLengths


def start(lengths: OutputLengths, prefix_id: int, n: int, max_tokens: int = 192) -> list[str]:
    ids = [f"p{prefix_id}-{i}" for i in range(n)]
    for rid in ids:
        lengths.started(prefix_id, rid, max_tokens)
    return ids


def test_a_prefix_is_found_light_when_its_first_members_have_all_answered_briefly():
    lengths = OutputLengths()
    ids = start(lengths, 1, SAMPLE + 4)
    decided = [lengths.finished(rid, 2) for rid in ids[:SAMPLE]]
    assert decided == [None] * (SAMPLE - 1) + [1]  # at the sample's last finish, not before
    assert lengths.finished(ids[SAMPLE], 2) is None  # decided once; later members say nothing


def test_the_sample_is_the_first_started_not_the_first_finished():
    # Seven short answers finish first; the eighth member started is an essay still running:
    # the prefix is not light while it runs, and not once it finishes at length either.
    lengths = OutputLengths()
    ids = start(lengths, 1, SAMPLE + 10)
    for rid in ids[1:SAMPLE] + ids[SAMPLE:]:  # later members answering briefly do not count
        assert lengths.finished(rid, 2) is None
    assert lengths.finished(ids[0], 192) is None  # the sample complete, and not light


def test_short_answers_under_a_small_max_tokens_are_not_light():
    # 8 tokens asked, 2 used: a quarter, but deferring saves at most a few steps.
    lengths = OutputLengths()
    ids = start(lengths, 1, SAMPLE, max_tokens=8)
    assert [lengths.finished(rid, 2) for rid in ids] == [None] * SAMPLE


def test_answers_using_over_a_quarter_of_max_tokens_are_not_light():
    lengths = OutputLengths()
    ids = start(lengths, 1, SAMPLE, max_tokens=192)
    assert [lengths.finished(rid, 60) for rid in ids] == [None] * SAMPLE


def test_a_failed_member_leaves_its_prefix_undecided():
    lengths = OutputLengths()
    ids = start(lengths, 1, SAMPLE)
    lengths.failed(ids[0])
    assert [lengths.finished(rid, 1) for rid in ids[1:]] == [None] * (SAMPLE - 1)


def test_prefixes_are_sampled_apart():
    lengths = OutputLengths()
    light, heavy = start(lengths, 1, SAMPLE), start(lengths, 2, SAMPLE)
    decided = []
    for a, b in zip(light, heavy, strict=True):
        decided += [lengths.finished(a, 1), lengths.finished(b, 192)]
    assert [p for p in decided if p is not None] == [1]
