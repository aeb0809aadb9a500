"""Keeping a session's subscriptions equal to its member's VINs, through a real coordination file.

The session here records what it is asked: whether a real session subscribes is proven in
tests/test_mqtt_filters.py, and the whole loop by tests/replica/test_vin_replicas.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from ingest.errors import BrokerError
from ingest.metrics import Metrics
from ingest.replica import subscriptions
from ingest.replica.coordination import Coordinator
from ingest.replica.envelopes import RULE_RECORD, EnvelopeRule
from ingest.replica.runtime import ReplicaRuntime
from ingest.replica.shards import APP_TOPIC_KEY, filters_of, owner, vin_filter
from ingest.replica.subscriptions import (
    KNOWN_LIST_WAIT_LEASES,
    DesiredVins,
    SubscriptionSync,
    subscribed_vins,
)
from ingest.replica.vin_mode import VinSharding

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


def _leading(runtime: ReplicaRuntime) -> ReplicaRuntime:
    """``runtime`` as the group's leader, its configured member list published (list 1)."""
    assert runtime.coordinator.try_lead()
    runtime.role.leader = True
    asyncio.run(runtime.follow_members())
    return runtime


class IdentifiedSession(RecordingSession):
    """Also records the Subscription Identifier each filter went out with, as a real session
    asks its ``subscription_ids`` while it sends the SUBSCRIBE."""

    def __init__(self, sync: SubscriptionSync) -> None:
        super().__init__()
        self.sync = sync
        self.identifiers: dict[str, int | None] = {}

    def subscribe(self, filters: Sequence[str], timeout_s: float = 10.0) -> None:
        super().subscribe(filters, timeout_s)
        self.identifiers.update({f: self.sync.subscription_id(f) for f in filters})


def test_envelope_rules_widen_on_a_new_list_and_narrow_once_every_member_covers_it(
    runtimes: dict[str, ReplicaRuntime],
) -> None:
    leader = _leading(runtimes["r0"])
    for runtime in runtimes.values():
        asyncio.run(runtime.follow_members())
    syncs, sessions = {}, {}
    for name in ("r0", "r1", "r2", "r3"):
        runtime = runtimes[name]
        syncs[name] = SubscriptionSync(
            member=name,
            members=lambda runtime=runtime: runtime.members,  # type: ignore[misc]
            prefix=PREFIX,
            runtime=runtime,
            vins=lambda: VINS,
            envelopes=True,
        )
        sessions[name] = IdentifiedSession(syncs[name])

    def step(*names: str) -> None:
        for name in names:
            syncs[name].step(sessions[name])

    step("r0", "r1", "r2", "r3")
    one = EnvelopeRule.of(1)
    for name in ("r0", "r1", "r2"):
        assert syncs[name].rule() == one
        assert sessions[name].identifiers[PREFIX] == one.identifier
        assert PREFIX in syncs[name].held(), "subscribed again at connect with the rest"
        assert PREFIX not in syncs[name].desired(), "the V2 topic is not one member's filter"
    assert syncs["r3"].rule() is None, "not in the list: takes no envelope"
    assert PREFIX not in sessions["r3"].filters

    # The leader is configured with r3 too: list 2. r0 has read it, r1 and r2 lag behind: r0
    # does not take on list 2 while they keep envelopes by list 1 without claiming list 2's
    # moved VINs (ingest.replica.handover), or an envelope both keep would be written twice.
    leader.configured_members = ["r0", "r1", "r2", "r3"]
    asyncio.run(leader.follow_members())
    step("r0")
    assert syncs["r0"].rule() == one, "r1 and r2 have not read list 2"
    for name in ("r1", "r2", "r3"):
        asyncio.run(runtimes[name].follow_members())
    step("r1", "r3")
    assert syncs["r1"].rule() == one, "r2 has not read list 2"
    assert syncs["r3"].rule() is None, "waits for r2 as well"
    step("r2")
    assert syncs["r2"].rule() == EnvelopeRule(1, 2), "everyone has read list 2: it widens"
    step("r0", "r1", "r3")
    assert syncs["r3"].rule() == EnvelopeRule.of(2), "a new session: the list in force"
    assert syncs["r0"].rule() == syncs["r1"].rule() == EnvelopeRule(1, 2)
    step("r0", "r1", "r2")
    for name in ("r0", "r1", "r2", "r3"):
        assert syncs[name].rule() == EnvelopeRule.of(2), name
        assert sessions[name].identifiers[PREFIX] == EnvelopeRule.of(2).identifier
    recorded = runtimes["r3"].coordinator.subscriptions_starting(RULE_RECORD)
    assert recorded == {EnvelopeRule.of(2).record: {"r0", "r1", "r2", "r3"}}


def test_a_v2_topic_held_before_rules_keeps_every_envelope_until_it_has_one(
    runtimes: dict[str, ReplicaRuntime],
) -> None:
    """The V2 topic's single owner under MQTT 3.1.1, restarted under MQTT 5: its plain
    subscription is read as a rule that keeps all, and replaced once the list is settled."""
    leader = _leading(runtimes["r0"])
    leader.coordinator.record_subscribed("r0", [PREFIX])
    sync = SubscriptionSync(
        member="r0",
        members=lambda: leader.members,
        prefix=PREFIX,
        runtime=leader,
        vins=lambda: VINS,
        envelopes=True,
    )
    assert sync.rule() == EnvelopeRule(0, 1)
    session = IdentifiedSession(sync)
    sync.step(session)  # r1 and r2 hold no rule yet: r0 keeps everything meanwhile
    keep_all = EnvelopeRule(0, 1)
    assert sync.rule() == keep_all
    assert session.calls[0] == ("subscribe", [PREFIX]), "the same filter, now with a rule"
    assert session.identifiers[PREFIX] == keep_all.identifier
    assert leader.coordinator.subscriptions_starting(RULE_RECORD) == {keep_all.record: {"r0"}}
    leader.coordinator.record_subscribed("r1", [EnvelopeRule.of(1).record])
    leader.coordinator.record_subscribed("r2", [EnvelopeRule.of(1).record])
    sync.step(session)
    assert sync.rule() == EnvelopeRule.of(1)
    assert session.identifiers[PREFIX] == EnvelopeRule.of(1).identifier
    assert leader.coordinator.subscribed("r0") >= {EnvelopeRule.of(1).record}
    assert PREFIX not in leader.coordinator.subscribed("r0"), "the plain record is replaced"
    assert ("unsubscribe", [PREFIX]) not in session.calls, "never let go of the topic"


def test_the_rule_gauge_counts_the_lists_a_session_keeps_envelopes_by(
    runtimes: dict[str, ReplicaRuntime],
) -> None:
    leader = _leading(runtimes["r0"])
    metrics = Metrics(CollectorRegistry())
    sharding = VinSharding(
        runtime=leader,
        prefix=PREFIX,
        vins=lambda: VINS,
        interval_s=0.05,
        metrics=metrics,
        envelopes=True,
    )
    sync = sharding.sync_for("r0")
    session = RecordingSession()

    def lists_after_a_few_steps() -> float:
        async def run() -> None:
            stop = asyncio.Event()
            task = asyncio.create_task(sharding.keep_subscriptions(sync, session, stop))
            await asyncio.sleep(0.2)
            stop.set()
            await task

        asyncio.run(run())
        return float(metrics.envelope_rule_lists._value.get())  # type: ignore[attr-defined]

    assert lists_after_a_few_steps() == 1
    leader.configured_members = ["r0", "r1", "r2", "r3"]
    asyncio.run(leader.follow_members())
    assert lists_after_a_few_steps() == 2, "r1..r3 do not cover list 2: widened"


def test_back_on_mqtt_3_the_v2_topic_is_one_filter_again_and_only_its_owner_keeps_it(
    runtimes: dict[str, ReplicaRuntime],
) -> None:
    """Every session held the V2 topic under an envelope rule (MQTT 5); under MQTT 3.1.1 its
    owner keeps it and the others let it go once the owner holds it, as any moved filter."""
    members = ["r0", "r1", "r2"]
    app_owner = owner(APP_TOPIC_KEY, members)
    others = [m for m in members if m != app_owner]
    coordinator = runtimes["r0"].coordinator
    for member in members:
        coordinator.record_subscribed(member, [EnvelopeRule.of(1).record])
    syncs = {m: _sync(runtimes[m], m, members, VINS) for m in members}
    sessions = {m: RecordingSession() for m in members}
    for member in [*others, app_owner, *others]:
        syncs[member].step(sessions[member])
    assert PREFIX in syncs[app_owner].held()
    for member in others:
        assert ("unsubscribe", [PREFIX]) in sessions[member].calls, member
        assert PREFIX not in syncs[member].held()
    assert coordinator.subscriptions_starting(RULE_RECORD) == {}
    assert coordinator.subscriptions_starting(PREFIX)[PREFIX] == {app_owner}


def test_a_moved_vin_is_taken_over_only_once_its_holder_claims_its_messages(
    runtimes: dict[str, ReplicaRuntime],
) -> None:
    """r3 subscribes a VIN that moved to it only once the session holding it has recorded that
    it reads by the new list, so every message both receive is claimed by both."""
    leader = _leading(runtimes["r0"])
    for runtime in runtimes.values():
        asyncio.run(runtime.follow_members())
    syncs = {
        name: SubscriptionSync(
            member=name,
            members=lambda runtime=runtimes[name]: runtime.members,  # type: ignore[misc]
            prefix=PREFIX,
            runtime=runtimes[name],
            vins=lambda: VINS,
        )
        for name in ("r0", "r1", "r2", "r3")
    }
    sessions = {name: RecordingSession() for name in syncs}
    for name in ("r0", "r1", "r2"):
        syncs[name].step(sessions[name])
    new = ["r0", "r1", "r2", "r3"]
    moved = {vin_filter(PREFIX, v) for v in VINS if owner(v, new) == "r3"}
    from_r1 = {f for f in moved if f in sessions["r1"].filters}
    assert from_r1, "some of r3's VINs come from r1"

    leader.configured_members = new
    asyncio.run(leader.follow_members())
    asyncio.run(runtimes["r3"].follow_members())
    syncs["r0"].step(sessions["r0"])  # r0 reads by list 2; r1 and r2 do not yet
    report = syncs["r3"].step(sessions["r3"])
    from_r0 = {f for f in moved if f in sessions["r0"].filters}
    from_r2 = {f for f in moved if f in sessions["r2"].filters}
    assert from_r0
    assert from_r2
    assert sessions["r3"].filters - {PREFIX} == from_r0, "only r0's: r1 and r2 do not claim yet"
    assert report.awaiting_handover == len(moved) - len(from_r0)
    asyncio.run(runtimes["r1"].follow_members())
    syncs["r1"].step(sessions["r1"])
    syncs["r3"].step(sessions["r3"])
    assert from_r1 <= sessions["r3"].filters, "r1 reads by list 2: its VINs are taken over"
    assert not from_r2 & sessions["r3"].filters, "r2 still does not"


def test_a_holder_that_never_reads_the_new_list_is_not_waited_for_forever(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'c.sqlite3'}"
    lease_s = 0.2
    runtimes = {
        name: ReplicaRuntime(
            Coordinator.open(url, replica=name, lease_s=lease_s),
            heartbeat_s=0.1,
            members=["r0"],
        )
        for name in ("r0", "r1")
    }
    try:
        leader = _leading(runtimes["r0"])
        sync = _sync(leader, "r0", leader.members, VINS)
        session = RecordingSession()
        # r1's session holds some of r0's VINs and never records a list (a stale record).
        stale = sorted(filters_of("r0", ["r0"], PREFIX, VINS))[:5]
        leader.coordinator.record_subscribed("r1", stale)
        assert sync.step(session).awaiting_handover == 5
        assert not set(stale) & session.filters
        clock = [time.monotonic() + KNOWN_LIST_WAIT_LEASES * lease_s + 1]
        monkeypatch.setattr(subscriptions.time, "monotonic", lambda: clock[0])
        assert sync.step(session).awaiting_handover == 0
        assert set(stale) <= session.filters, "taken over after the wait"
    finally:
        for runtime in runtimes.values():
            runtime.coordinator.close()
