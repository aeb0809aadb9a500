"""Keeping a session's subscriptions equal to its member's VINs, through a real coordination file.

The session here records what it is asked: whether a real session subscribes is proven in
tests/test_mqtt_filters.py, and the whole loop by tests/replica/test_vin_replicas.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from ingest.errors import BrokerError
from ingest.replica.coordination import Coordinator
from ingest.replica.runtime import ReplicaRuntime
from ingest.replica.shards import filters_of, owner, vin_filter
from ingest.replica.subscriptions import DesiredVins, SubscriptionSync, subscribed_vins

PREFIX = "live/level13/app-1"
VINS = {f"VIN{n:014d}" for n in range(300)}


class RecordingSession:
    def __init__(self) -> None:
        self.filters: set[str] = set()
        self.calls: list[tuple[str, list[str]]] = []
        self.fail: BrokerError | None = None
        # The process dies right after the broker acknowledged an UNSUBSCRIBE.
        self.crash_after_unsubscribe = False

    def subscribe(self, filters: Sequence[str], timeout_s: float = 10.0) -> None:
        if self.fail is not None:
            raise self.fail
        self.calls.append(("subscribe", list(filters)))
        self.filters.update(filters)

    def unsubscribe(self, filters: Sequence[str], timeout_s: float = 10.0) -> None:
        self.calls.append(("unsubscribe", list(filters)))
        self.filters.difference_update(filters)
        if self.crash_after_unsubscribe:
            raise SystemExit("killed")


@pytest.fixture
def runtimes(tmp_path: Path) -> Iterator[dict[str, ReplicaRuntime]]:
    url = f"sqlite:///{tmp_path / 'coordination.sqlite3'}"
    made: dict[str, ReplicaRuntime] = {}
    for name in ("r0", "r1", "r2", "r3"):
        coordinator = Coordinator.open(url, replica=name, lease_s=10.0)
        made[name] = ReplicaRuntime(coordinator, heartbeat_s=1.0, members=["r0", "r1", "r2"])
    yield made
    for runtime in made.values():
        runtime.coordinator.close()


def _sync(
    runtime: ReplicaRuntime, member: str, members: Sequence[str], vins: set[str]
) -> SubscriptionSync:
    return SubscriptionSync(
        member=member,
        members=lambda: members,
        prefix=PREFIX,
        runtime=runtime,
        vins=lambda: vins,
    )


def test_subscribes_what_it_owns_records_it_and_is_idempotent(
    runtimes: dict[str, ReplicaRuntime],
) -> None:
    members = ["r0", "r1", "r2"]
    sync = _sync(runtimes["r0"], "r0", members, VINS)
    session = RecordingSession()
    report = sync.step(session)
    expected = filters_of("r0", members, PREFIX, VINS)
    assert session.filters == expected
    assert report.subscribed == len(expected)
    assert runtimes["r1"].coordinator.subscribed("r0") == expected
    assert sync.step(session).subscribed == 0
    assert len(session.calls) == 1, "nothing new: no second SUBSCRIBE"


def test_a_failed_subscribe_records_nothing_and_is_retried(
    runtimes: dict[str, ReplicaRuntime],
) -> None:
    sync = _sync(runtimes["r0"], "r0", ["r0", "r1", "r2"], VINS)
    session = RecordingSession()
    session.fail = BrokerError("not connected", retriable=True)
    with pytest.raises(BrokerError):
        sync.step(session)
    assert runtimes["r0"].coordinator.subscribed("r0") == set()
    session.fail = None
    assert sync.step(session).subscribed > 0


def test_the_registration_gate_sees_recorded_filters(runtimes: dict[str, ReplicaRuntime]) -> None:
    members = ["r0", "r1", "r2"]
    for name in members:
        _sync(runtimes[name], name, members, VINS).step(RecordingSession())
    coordinator = runtimes["r0"].coordinator
    newcomers = ["NEW00000000000001", "NEW00000000000002"]
    assert subscribed_vins(coordinator, PREFIX, sorted(VINS)[:5] + newcomers) == set(
        sorted(VINS)[:5]
    )


def test_a_moved_vin_is_dropped_only_after_its_new_owner_holds_it(
    runtimes: dict[str, ReplicaRuntime],
) -> None:
    old, new = ["r0", "r1", "r2"], ["r0", "r1", "r2", "r3"]
    sessions = {name: RecordingSession() for name in new}
    for name in old:
        _sync(runtimes[name], name, old, VINS).step(sessions[name])
    moving = {v for v in VINS if owner(v, new) == "r3"}
    assert moving, "some VINs move to the new member"

    # The old owners learn the new member list first: they keep what r3 does not hold yet.
    reports = {name: _sync(runtimes[name], name, new, VINS).step(sessions[name]) for name in old}
    assert sum(r.awaiting_new_owner for r in reports.values()) == len(moving)
    assert all(r.unsubscribed == 0 for r in reports.values())
    held = set().union(*(sessions[name].filters for name in old))
    assert {vin_filter(PREFIX, v) for v in moving} <= held, "no gap: still subscribed"

    _sync(runtimes["r3"], "r3", new, VINS).step(sessions["r3"])
    for name in old:
        _sync(runtimes[name], name, new, VINS).step(sessions[name])
    for name in new:
        assert sessions[name].filters == filters_of(name, new, PREFIX, VINS), name
    assert runtimes["r0"].coordinator.subscriptions() == {
        f: {name} for name in new for f in filters_of(name, new, PREFIX, VINS)
    }


def test_a_host_keeps_the_hosted_members_filters_under_its_id(
    runtimes: dict[str, ReplicaRuntime],
) -> None:
    members = ["r0", "r1", "r2"]
    # r1 subscribed once, then died; r0 hosts its session and the fleet grows meanwhile.
    _sync(runtimes["r1"], "r1", members, VINS).step(RecordingSession())
    grown = VINS | {f"NEW{n:014d}" for n in range(50)}
    hosted = RecordingSession()
    report = _sync(runtimes["r0"], "r1", members, grown).step(hosted)
    added = filters_of("r1", members, PREFIX, grown) - filters_of("r1", members, PREFIX, VINS)
    assert hosted.filters == added, "only what r1's session does not hold already"
    assert report.subscribed == len(added)
    assert runtimes["r1"].coordinator.subscribed("r1") == filters_of("r1", members, PREFIX, grown)


def test_desired_vins_rereads_only_a_changed_file(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.csv"
    fleet.write_text("vin,brand\nWVWZZZ1KZAW000001,sandbox\n")
    desired = DesiredVins(fleet)
    assert desired() == {"WVWZZZ1KZAW000001"}
    fleet.write_text("vin,brand\nWVWZZZ1KZAW000001,sandbox\nWVWZZZ1KZAW000002,sandbox\n")
    assert desired() == {"WVWZZZ1KZAW000001", "WVWZZZ1KZAW000002"}
    fleet.write_text("not a fleet file")
    assert desired() == {"WVWZZZ1KZAW000001", "WVWZZZ1KZAW000002"}, "the last good VINs"
    assert DesiredVins(None)() == frozenset()


def test_two_sessions_that_both_think_a_filter_is_not_theirs_never_both_drop_it(
    runtimes: dict[str, ReplicaRuntime],
) -> None:
    """r0 on a new member list and r1 on the old one disagree about who owns the moved VINs.
    r0 unsubscribes them and dies before it can forget them; r1's step comes next and must
    keep them: otherwise nobody would subscribe those VINs."""
    old, new = ["r0", "r1"], ["r0", "r1", "r2"]
    vins = {v for v in VINS if owner(v, new) == "r2"}
    both = {vin_filter(PREFIX, v) for v in vins if owner(v, old) == "r0"}
    assert both
    r0, r1 = RecordingSession(), RecordingSession()
    for name, session in (("r0", r0), ("r1", r1)):
        session.filters.update(both)
        runtimes[name].coordinator.record_subscribed(name, sorted(both))
    r0.crash_after_unsubscribe = True
    with pytest.raises(SystemExit):
        _sync(runtimes["r0"], "r0", new, vins).step(r0)
    assert not r0.filters & both, "r0's UNSUBSCRIBE went out"

    _sync(runtimes["r1"], "r1", old, vins).step(r1)

    assert r1.filters >= both, "r1 kept every filter r0 was leaving"


def test_a_filter_owned_again_while_leaving_is_subscribed_again(
    runtimes: dict[str, ReplicaRuntime],
) -> None:
    vin = sorted(VINS)[0]
    topic_filter = vin_filter(PREFIX, vin)
    coordinator = runtimes["r0"].coordinator
    coordinator.record_subscribed("r1", [topic_filter])
    coordinator.record_subscribed("r0", [topic_filter])
    assert coordinator.mark_leaving("r0", [topic_filter]) == [topic_filter]
    # r0 died after its UNSUBSCRIBE; back with a member list on which it owns the VIN again.
    session = RecordingSession()
    _sync(runtimes["r0"], "r0", ["r0"], {vin}).step(session)
    assert topic_filter in session.filters
    assert coordinator.leaving("r0") == set()


def test_every_replica_hashes_over_the_leaders_member_list(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.sqlite3'}"
    new = ReplicaRuntime(
        Coordinator.open(url, replica="r0", lease_s=10.0), heartbeat_s=1.0, members=["r0", "r1"]
    )
    old = ReplicaRuntime(
        Coordinator.open(url, replica="r1", lease_s=10.0), heartbeat_s=1.0, members=["r1"]
    )
    try:
        asyncio.run(old.follow_members())
        assert old.members == ["r1"], "nothing published yet: its own list"
        assert new.coordinator.try_lead()
        new.role.leader = True
        asyncio.run(new.follow_members())
        asyncio.run(old.follow_members())
        assert old.members == new.members == ["r0", "r1"]
        assert old.configured_members == ["r1"]
    finally:
        new.coordinator.close()
        old.coordinator.close()
