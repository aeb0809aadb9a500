"""Handovers of VINs between sessions: claims decide who writes a message both sessions receive.

Real coordination files (SQLite); the sessions are the intake's view of received groups. The
whole loop (replicas resized under a stream, every message once) is
tests/replica/test_vin_handovers.py.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from ingest.batch import content_digest
from ingest.metrics import Metrics
from ingest.mqtt import Delivery
from ingest.replica.coordination import CoordinationError, Coordinator
from ingest.replica.envelopes import EnvelopeRule
from ingest.replica.handover import (
    MessageOwnership,
    moving,
    open_epochs,
    overlapping,
)
from ingest.replica.shards import filters_of, owner, vin_filter

PREFIX = "live/level13/app-1"
OLD, NEW = ["r0", "r1", "r2"], ["r0", "r1", "r2", "r3"]
LISTS = {1: OLD, 2: NEW}
VINS = [f"VIN{n:014d}" for n in range(400)]
WINDOW_S = 600.0
T0 = 1_800_000_000.0


def _metrics() -> Metrics:
    return Metrics(CollectorRegistry())


def _moved() -> list[str]:
    return [v for v in VINS if owner(v, OLD) != owner(v, NEW)]


def _message(vin: str, n: int) -> tuple[str, bytes, Delivery]:
    return (f"{PREFIX}/{vin}/diagnostics", b'{"n": %d}' % n, Delivery(1, n, 1))


@pytest.fixture
def coordinators(tmp_path: Path) -> Iterator[dict[str, Coordinator]]:
    url = f"sqlite:///{tmp_path / 'coordination.sqlite3'}"
    made = {name: Coordinator.open(url, replica=name, lease_s=10.0) for name in NEW}
    yield made
    for coordinator in made.values():
        coordinator.close()


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def _ownership(
    member: str,
    coordinator: Coordinator,
    *,
    settled_at: Mapping[int, float] | None = None,
    clock: Clock | None = None,
    metrics: Metrics | None = None,
) -> MessageOwnership:
    settled = dict(settled_at or {})
    return MessageOwnership(
        prefix=PREFIX,
        member_of=lambda channel: member if channel == 0 else None,
        member_lists=lambda: LISTS,
        settled_at=lambda: settled,
        claim=coordinator.claim,
        window_s=WINDOW_S,
        metrics=metrics or _metrics(),
        clock=clock or Clock(),
    )


def test_a_list_is_open_from_its_publication_until_a_window_after_it_settled() -> None:
    assert open_epochs({1: OLD}, {}, T0, WINDOW_S) == [], "one list: nothing moves"
    assert open_epochs(LISTS, {}, T0, WINDOW_S) == [2]
    assert open_epochs(LISTS, {2: T0}, T0 + WINDOW_S - 1, WINDOW_S) == [2]
    assert open_epochs(LISTS, {2: T0}, T0 + WINDOW_S, WINDOW_S) == []
    three = {1: OLD, 2: NEW, 3: OLD}
    assert open_epochs(three, {2: T0}, T0 + WINDOW_S, WINDOW_S) == [3]


def test_moving_vins_are_those_whose_owner_changed() -> None:
    moved = _moved()
    assert 0 < len(moved) < len(VINS) / 2, "about a quarter move to the new member"
    assert all(moving(v, [2], LISTS) for v in moved)
    assert not any(moving(v, [2], LISTS) for v in set(VINS) - set(moved))
    assert not any(moving(v, [], LISTS) for v in moved)


def test_the_group_is_settled_only_with_one_session_per_vin_its_owners() -> None:
    def held(members: Sequence[str], *, app_topic: bool = True) -> dict[str, set[str]]:
        return {
            f: {m}
            for m in members
            for f in filters_of(m, members, PREFIX, VINS, app_topic=app_topic)
        }

    settled = held(NEW)
    assert overlapping(settled, prefix=PREFIX, members=NEW, epoch=2, envelopes=False) is None
    # The old owner still holds a moved VIN (its new owner does not yet, or does too).
    vin = _moved()[0]
    old_owner = owner(vin, OLD)
    alone = {**settled, vin_filter(PREFIX, vin): {old_owner}}
    why = overlapping(alone, prefix=PREFIX, members=NEW, epoch=2, envelopes=False)
    assert why is not None
    assert "not its owner" in why
    both = {**settled, vin_filter(PREFIX, vin): {old_owner, "r3"}}
    why = overlapping(both, prefix=PREFIX, members=NEW, epoch=2, envelopes=False)
    assert why is not None
    assert "r3" in why
    # Under MQTT 5: every envelope rule narrowed to the newest list.
    narrow = {**held(NEW, app_topic=False), EnvelopeRule.of(2).record: set(NEW)}
    assert overlapping(narrow, prefix=PREFIX, members=NEW, epoch=2, envelopes=True) is None
    wide = {**narrow, EnvelopeRule(1, 2).record: {"r1"}}
    assert overlapping(wide, prefix=PREFIX, members=NEW, epoch=2, envelopes=True) is not None
    untagged = {**narrow, PREFIX: {"r0"}}
    assert overlapping(untagged, prefix=PREFIX, members=NEW, epoch=2, envelopes=True) is not None


def test_of_two_sessions_receiving_a_moved_vins_messages_exactly_one_logs_each(
    coordinators: dict[str, Coordinator],
) -> None:
    """The old owner and the new one get the same messages, read in different groups and
    orders: every message is kept by exactly one of them, whichever read it first."""
    vin = _moved()[0]
    old_owner = owner(vin, OLD)
    metrics = {name: _metrics() for name in (old_owner, "r3")}
    old = _ownership(old_owner, coordinators[old_owner], metrics=metrics[old_owner])
    new = _ownership("r3", coordinators["r3"], metrics=metrics["r3"])
    messages = [_message(vin, n) for n in range(1, 41)]

    kept_old = old.keep(messages[:25])  # the old owner reads ahead
    kept_new = new.keep(messages[10:]) + new.keep(messages[:10])  # the new one in two groups
    kept_old += old.keep(messages[25:])
    by_new = dict(zip([m[1] for m in messages[10:] + messages[:10]], kept_new, strict=True))
    for (_, payload, _), old_kept in zip(messages, kept_old, strict=True):
        assert old_kept != by_new[payload], payload
    assert kept_old[:25] == [True] * 25, "the first to read them claimed them"
    assert kept_new[:15] == [False] * 15
    assert kept_new[15:30] == [True] * 15
    assert kept_new[30:] == [False] * 10
    # Read again (a redelivery after a crash before the PUBACK): the claim is still its own.
    assert old.keep(messages[:25]) == [True] * 25
    assert new.keep(messages[:25]) == [False] * 25
    own = metrics[old_owner].handover_claims.labels("own")._value.get()  # type: ignore[attr-defined]
    assert own == 25 + 25


def test_messages_of_vins_that_stay_put_are_kept_without_asking(
    coordinators: dict[str, Coordinator],
) -> None:
    staying = next(v for v in VINS if v not in _moved())
    member = owner(staying, NEW)
    metrics = _metrics()
    ownership = _ownership(member, coordinators[member], metrics=metrics)
    assert ownership.keep([_message(staying, n) for n in range(5)]) == [True] * 5
    assert metrics.handover_claims.labels("own")._value.get() == 0  # type: ignore[attr-defined]
    assert coordinators[member].claim("r9", [content_digest(*_message(staying, 0)[:2])]) == {
        content_digest(*_message(staying, 0)[:2]): "r9"
    }, "nothing was claimed for it"


def test_claims_stop_a_window_after_the_group_settled(
    coordinators: dict[str, Coordinator],
) -> None:
    vin = _moved()[0]
    clock = Clock()
    new = _ownership("r3", coordinators["r3"], settled_at={2: T0}, clock=clock)
    old_owner = owner(vin, OLD)
    coordinators[old_owner].claim(old_owner, [content_digest(*_message(vin, 1)[:2])])
    clock.now = T0 + WINDOW_S - 1
    assert new.keep([_message(vin, 1)]) == [False], "within the window: claimed by the old owner"
    clock.now = T0 + WINDOW_S
    assert new.keep([_message(vin, 1)]) == [True], "after it: no longer asked"


def test_an_unreachable_database_keeps_the_messages(
    coordinators: dict[str, Coordinator],
) -> None:
    vin = _moved()[0]
    metrics = _metrics()

    def unreachable(member: str, keys: Sequence[str]) -> dict[str, str]:
        raise CoordinationError("database away", retriable=True)

    ownership = _ownership("r3", coordinators["r3"], metrics=metrics)
    ownership.claim = unreachable
    assert ownership.keep([_message(vin, n) for n in range(3)]) == [True] * 3
    assert metrics.handover_claims.labels("unavailable")._value.get() == 3  # type: ignore[attr-defined]


def test_a_hosted_member_claims_under_its_own_name(coordinators: dict[str, Coordinator]) -> None:
    """The leader hosting r1 claims r1's copies as r1: when r1 returns and reads a message it
    claimed before it died, the claim is its own."""
    vin = next(v for v in _moved() if owner(v, OLD) == "r1")
    host = MessageOwnership(
        prefix=PREFIX,
        member_of={0: "r0", 7: "r1"}.get,
        member_lists=lambda: LISTS,
        settled_at=dict,
        claim=coordinators["r0"].claim,
        window_s=WINDOW_S,
        metrics=_metrics(),
        clock=Clock(),
    )
    topic, payload, _ = _message(vin, 1)
    assert host.keep([(topic, payload, Delivery(1, 1, 1, channel=7))]) == [True]
    assert _ownership("r1", coordinators["r1"]).keep([_message(vin, 1)]) == [True]
    assert _ownership("r3", coordinators["r3"]).keep([_message(vin, 1)]) == [False]
