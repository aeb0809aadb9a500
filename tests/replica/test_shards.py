"""Who owns which VIN's topic in VIN-sharded mode: stable, even, and moving little."""

from __future__ import annotations

from collections import Counter

import pytest

from ingest.replica.shards import (
    APP_TOPIC_KEY,
    filters_of,
    owner,
    topic_prefix,
    unit_of,
    vin_filter,
)

PREFIX = "live/level13/app-1"
VINS = [f"WVWZZZ1KZ{n:08d}" for n in range(6000)]
MEMBERS = ["hm-ingest-0", "hm-ingest-1", "hm-ingest-2"]


def test_every_vin_has_exactly_one_owner_and_the_shares_are_even() -> None:
    shares = {m: filters_of(m, MEMBERS, PREFIX, VINS) for m in MEMBERS}
    union = set().union(*shares.values())
    assert len(union) == len(VINS) + 1, "every VIN plus the V2 topic"
    assert sum(len(s) for s in shares.values()) == len(union), "no filter owned twice"
    sizes = [len(s) for s in shares.values()]
    assert max(sizes) / min(sizes) < 1.1, sizes
    assert sum(PREFIX in s for s in shares.values()) == 1, "the V2 topic has one owner"


def test_owner_does_not_depend_on_member_order() -> None:
    assert all(owner(v, MEMBERS) == owner(v, list(reversed(MEMBERS))) for v in VINS[:500])


def test_adding_a_member_moves_only_what_it_wins() -> None:
    before = {v: owner(v, MEMBERS) for v in VINS}
    after = {v: owner(v, [*MEMBERS, "hm-ingest-3"]) for v in VINS}
    moved = [v for v in VINS if before[v] != after[v]]
    assert all(after[v] == "hm-ingest-3" for v in moved), "nothing moves between old members"
    assert 0.2 < len(moved) / len(VINS) < 0.3, len(moved)  # about 1/4


def test_removing_a_member_moves_only_its_vins() -> None:
    before = Counter(owner(v, MEMBERS) for v in VINS)
    fewer = MEMBERS[:2]
    for vin in VINS:
        if owner(vin, MEMBERS) != "hm-ingest-2":
            assert owner(vin, fewer) == owner(vin, MEMBERS)
    assert sum(before.values()) == len(VINS)


def test_filters_and_units() -> None:
    assert topic_prefix("live/level13/app-1/#") == PREFIX
    with pytest.raises(ValueError, match="does not end in '/#'"):
        topic_prefix("live/level13/app-1")
    assert vin_filter(PREFIX, "V1") == f"{PREFIX}/V1/#"
    assert unit_of(PREFIX, f"{PREFIX}/V1/#") == "V1"
    assert unit_of(PREFIX, PREFIX) == APP_TOPIC_KEY
    with pytest.raises(ValueError, match="no members"):
        owner("V1", [])


def test_a_vin_that_cannot_be_one_topic_level_is_skipped() -> None:
    odd = ["A/B", "A+", "#", ""]
    assert all(f == PREFIX for m in MEMBERS for f in filters_of(m, MEMBERS, PREFIX, odd))
