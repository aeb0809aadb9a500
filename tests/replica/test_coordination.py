"""The replicas' coordination database on real SQLite files and the machine's real PostgreSQL.

Every behavioural test runs on both backends (``db_url`` is parametrised). PostgreSQL tests get a
fresh schema each (``search_path`` set through the URL's libpq ``options``) that is dropped after;
they are skipped, saying why, when 127.0.0.1:5432 does not answer.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from ingest.errors import ConfigError
from ingest.replica import coordination
from ingest.replica.coordination import (
    CoordinationError,
    Coordinator,
    Member,
    redact_url,
    sqlite_path,
)

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"
LEASE_S = 10.0
T0 = 1_700_000_000.0


class FakeClock:
    """Wall-clock seconds that move only when the test says so; shared by all coordinators."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _pg_admin() -> Any:
    psycopg = pytest.importorskip("psycopg", reason="psycopg 3 is not installed (extra 'postgres')")
    try:
        return psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(
            f"PostgreSQL at 127.0.0.1:5432 (user postgres, database test) is unreachable: "
            f"{' '.join(str(exc).split())}; start it to run the PostgreSQL coordination tests"
        )


@pytest.fixture
def pg_schema() -> Iterator[tuple[str, Any]]:
    """A fresh schema in the local PostgreSQL: (its URL, an admin connection); dropped after."""
    admin = _pg_admin()
    schema = f"hm_coord_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield f"{PG_ADMIN}?options=-csearch_path%3D{schema}", admin
    finally:
        admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
        admin.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'coordination.sqlite3'}"
    url: str = request.getfixturevalue("pg_schema")[0]
    return url


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def open_coordinator(db_url: str, clock: FakeClock) -> Iterator[Callable[[str], Coordinator]]:
    """Opens coordinators for replica ids on the test's database and clock; closes them after."""
    opened: list[Coordinator] = []

    def open_(replica: str) -> Coordinator:
        coordinator = Coordinator.open(db_url, replica=replica, lease_s=LEASE_S, clock=clock)
        opened.append(coordinator)
        return coordinator

    yield open_
    for coordinator in opened:
        coordinator.close()


def _dead(open_coordinator: Callable[[str], Coordinator], clock: FakeClock, name: str) -> None:
    """``name`` joined once and then stopped heartbeating: its lease expired LEASE_S + 1 ago."""
    assert open_coordinator(name).try_join()
    clock.advance(LEASE_S + 1)


# -- membership ---------------------------------------------------------------------------------


def test_join_heartbeat_and_expiry(open_coordinator: Any, clock: FakeClock) -> None:
    a, b = open_coordinator("a"), open_coordinator("b")
    assert a.members() == []
    assert a.try_join()
    assert b.try_join()
    assert a.members() == [Member("a", T0 + LEASE_S, True), Member("b", T0 + LEASE_S, True)]

    clock.advance(LEASE_S - 1)
    assert a.heartbeat()
    clock.advance(2)  # b's lease ran out, a's was renewed 2 s ago
    assert [(m.replica, m.alive) for m in b.members()] == [("a", True), ("b", False)]
    assert a.members()[0].expires_at == T0 + LEASE_S - 1 + LEASE_S

    # Nobody claimed b, so its late heartbeat may renew it.
    assert b.heartbeat()
    assert all(m.alive for m in a.members())


def test_heartbeat_without_a_row_is_refused(open_coordinator: Any) -> None:
    a = open_coordinator("a")
    assert not a.heartbeat()
    assert a.members() == []


def test_try_join_is_idempotent(open_coordinator: Any, clock: FakeClock) -> None:
    a = open_coordinator("a")
    assert a.try_join()
    clock.advance(3)
    assert a.try_join()
    assert a.members() == [Member("a", T0 + 3 + LEASE_S, True)]


# -- drains -------------------------------------------------------------------------------------


def test_drain_claim_exclusivity(open_coordinator: Any, clock: FakeClock) -> None:
    a, b, c = open_coordinator("a"), open_coordinator("b"), open_coordinator("c")
    assert a.try_join()
    assert not b.try_claim_drain("a"), "a is alive"
    assert not b.try_claim_drain("nobody"), "no row: nothing to drain"
    _dead(open_coordinator, clock, "x")
    assert a.heartbeat()
    assert not b.try_claim_drain("a"), "a renewed its lease"
    assert b.try_claim_drain("x")
    assert not c.try_claim_drain("x"), "b holds an unexpired claim"
    assert b.try_claim_drain("x"), "claiming again renews my own claim"

    clock.advance(LEASE_S - 1)
    assert b.renew_drain("x")
    clock.advance(LEASE_S - 1)
    assert not c.try_claim_drain("x"), "renewed: still b's"

    clock.advance(2)  # b stalled: its claim expired, c takes over
    assert a.heartbeat()
    assert c.try_claim_drain("x")
    assert not b.renew_drain("x")
    assert not b.try_claim_drain("x")
    with pytest.raises(CoordinationError, match="no longer holds the drain claim") as lost:
        b.record_adopted("x", ["k1"])
    assert lost.value.retriable is False
    with pytest.raises(CoordinationError, match="no longer holds the drain claim"):
        b.finish_drain("x")
    assert [m.replica for m in c.members()] == ["a", "x"], "b's failed finish deleted nothing"


def test_no_one_drains_themself(open_coordinator: Any, clock: FakeClock) -> None:
    a = open_coordinator("a")
    _dead(open_coordinator, clock, "a")
    assert not a.try_claim_drain("a")


def test_try_join_refused_while_claimed(open_coordinator: Any, clock: FakeClock) -> None:
    leader = open_coordinator("leader")
    _dead(open_coordinator, clock, "x")
    assert leader.try_claim_drain("x")
    x = open_coordinator("x")
    assert not x.try_join()
    assert [m.alive for m in leader.members()] == [False], "the refused join changed nothing"

    leader.record_adopted("x", ["k1", "k2"])
    leader.finish_drain("x")
    assert leader.members() == []
    assert x.try_join()
    assert x.adopted_keys() == ["k1", "k2"], "finish_drain keeps the adopted keys"


def test_a_filter_may_leave_only_while_another_session_keeps_it(open_coordinator: Any) -> None:
    a, b = open_coordinator("a"), open_coordinator("b")
    a.record_subscribed("a", ["F", "G"])
    assert a.mark_leaving("a", ["F", "G"]) == [], "nobody else holds them"
    b.record_subscribed("b", ["F", "G"])
    assert a.mark_leaving("a", ["F"]) == ["F"]
    assert a.leaving("a") == {"F"}
    assert b.mark_leaving("b", ["F"]) == [], "a is leaving F: b is its last holder"
    assert a.mark_leaving("a", ["F"]) == ["F"], "retried after a crash: still allowed"
    a.forget_subscribed("a", ["F"])
    assert a.subscriptions() == {"F": {"b"}, "G": {"a", "b"}}
    a.record_subscribed("b", ["G"])
    assert b.mark_leaving("b", ["G"]) == ["G"]
    b.record_subscribed("b", ["G"])  # owned again: no longer leaving
    assert b.leaving("b") == set()
    assert a.mark_leaving("a", []) == []


def test_only_the_leader_publishes_the_member_list(open_coordinator: Any) -> None:
    a, b = open_coordinator("a"), open_coordinator("b")
    assert a.published_members() is None
    assert not b.publish_members(["a", "b"]), "b does not lead"
    assert a.try_lead()
    assert a.publish_members(["a", "b", "c"])
    assert b.published_members() == ["a", "b", "c"]
    assert a.publish_members(["a"])
    assert b.published_members() == ["a"]


def test_each_published_list_keeps_its_epoch(open_coordinator: Any) -> None:
    a, b = open_coordinator("a"), open_coordinator("b")
    assert b.member_lists() == {}
    assert a.try_lead()
    assert a.publish_members(["a", "b"])
    assert a.publish_members(["a", "b"]), "the same list again: no new epoch"
    assert a.publish_members(["a", "b", "c"])
    assert b.member_lists() == {1: ["a", "b"], 2: ["a", "b", "c"]}
    assert a.publish_members(["a", "b"]), "back to an earlier list: a new epoch all the same"
    assert b.member_lists() == {1: ["a", "b"], 2: ["a", "b", "c"], 3: ["a", "b"]}
    assert b.published_members() == ["a", "b"]


def test_a_list_published_before_epochs_is_epoch_one(open_coordinator: Any) -> None:
    a = open_coordinator("a")
    assert a.try_lead()
    with a._write("an older release's publish") as tx:
        tx.run("INSERT INTO hm_replica_settings (name, value) VALUES (?, ?)", "members", "a,b")
    assert a.member_lists() == {1: ["a", "b"]}
    assert a.publish_members(["a", "b", "c"])
    assert a.member_lists() == {1: ["a", "b"], 2: ["a", "b", "c"]}


def test_records_by_prefix_and_replaced_in_one_step(open_coordinator: Any) -> None:
    a = open_coordinator("a")
    a.record_subscribed("a", ["p/V1/#", "v2-envelopes:1-1"])
    a.record_subscribed("b", ["v2-envelopes:1-2", "p"])
    assert a.subscriptions_starting("v2-envelopes:") == {
        "v2-envelopes:1-1": {"a"},
        "v2-envelopes:1-2": {"b"},
    }
    a.replace_subscribed("b", ["v2-envelopes:1-2", "p"], ["v2-envelopes:2-2"])
    assert a.subscribed("b") == {"v2-envelopes:2-2"}
    assert a.subscribed("a") == {"p/V1/#", "v2-envelopes:1-1"}
    assert a.subscriptions_starting("p/") == {"p/V1/#": {"a"}}


# -- hosting (VIN-sharded mode) ------------------------------------------------------------------


def test_a_returning_replica_asks_its_host_for_its_session(
    open_coordinator: Any, clock: FakeClock
) -> None:
    host = open_coordinator("host")
    _dead(open_coordinator, clock, "x")
    assert host.try_claim_drain("x")
    assert host.renew_hosting("x") == "keep"

    x = open_coordinator("x")
    assert not x.try_join(), "hosted: x waits"
    assert host.renew_hosting("x") == "release", "x's refused join asked for its session back"
    host.record_adopted("x", ["k1"])
    host.finish_drain("x")
    assert x.try_join()
    assert x.adopted_keys() == ["k1"]

    # The request is gone with the hosting: a later hosting of x starts over at "keep".
    clock.advance(LEASE_S + 1)
    assert host.try_claim_drain("x")
    assert host.renew_hosting("x") == "keep"


def test_renew_hosting_of_a_claim_taken_over_is_lost(
    open_coordinator: Any, clock: FakeClock
) -> None:
    a, b = open_coordinator("a"), open_coordinator("b")
    _dead(open_coordinator, clock, "x")
    assert a.try_claim_drain("x")
    clock.advance(LEASE_S + 1)
    assert b.try_claim_drain("x")
    assert a.renew_hosting("x") == "lost"
    assert b.renew_hosting("x") == "keep"


def test_abandon_drain_frees_the_member_at_once(open_coordinator: Any, clock: FakeClock) -> None:
    a, b = open_coordinator("a"), open_coordinator("b")
    _dead(open_coordinator, clock, "x")
    assert a.try_claim_drain("x")
    b.abandon_drain("x")
    assert not b.try_claim_drain("x"), "b's abandon touched nothing of a's"
    a.abandon_drain("x")
    assert b.try_claim_drain("x"), "no need to wait for a's claim to expire"
    assert [(m.replica, m.alive) for m in b.members()] == [("x", False)]


def test_ensure_members_gives_a_never_started_member_one_lease(
    open_coordinator: Any, clock: FakeClock
) -> None:
    leader = open_coordinator("leader")
    assert leader.try_join()
    configured = ["leader", "late", "never"]
    leader.ensure_members(configured)
    assert leader.members() == [Member("leader", T0 + LEASE_S, True)], "no row shown as live"
    assert not leader.try_claim_drain("never"), "it has one lease to show up"
    clock.advance(2)
    assert open_coordinator("late").try_join()
    leader.ensure_members(configured)
    assert [m.replica for m in leader.members()] == ["late", "leader"]
    clock.advance(LEASE_S - 2)
    assert leader.heartbeat()
    leader.ensure_members(configured)
    # Waited since T0: expired as of T0 + LEASE_S, i.e. now.
    assert Member("never", T0 + LEASE_S, False) in leader.members()
    assert leader.try_claim_drain("never")
    assert not leader.try_claim_drain("late")
    assert leader.claims() == {"never": "leader"}
    leader.ensure_members(configured)  # changes no existing row
    assert Member("never", T0 + LEASE_S, False) in leader.members()


def test_a_member_that_joins_stops_being_expected(open_coordinator: Any, clock: FakeClock) -> None:
    leader = open_coordinator("leader")
    assert leader.try_join()
    leader.ensure_members(["leader", "x"])
    x = open_coordinator("x")
    assert x.try_join()
    # x's row goes (a hosting of it ended), then the leader looks again much later: x gets a
    # fresh lease to rejoin, not an at once expired row from the old wait.
    clock.advance(LEASE_S + 1)
    assert leader.heartbeat()
    assert leader.try_claim_drain("x")
    leader.finish_drain("x")
    leader.ensure_members(["leader", "x"])
    assert [m.replica for m in leader.members()] == ["leader"]
    assert not leader.try_claim_drain("x")


def test_subscriptions_are_recorded_per_session(open_coordinator: Any) -> None:
    a, b = open_coordinator("a"), open_coordinator("b")
    assert a.subscribed("a") == set()
    a.record_subscribed("a", ["p/V1/#", "p/V2/#"])
    a.record_subscribed("a", ["p/V1/#"])  # idempotent
    b.record_subscribed("b", ["p/V2/#"])
    b.record_subscribed("x", ["p/V3/#"])  # a host records under the hosted member's id
    assert a.subscribed("a") == {"p/V1/#", "p/V2/#"}
    assert a.subscriptions() == {"p/V1/#": {"a"}, "p/V2/#": {"a", "b"}, "p/V3/#": {"x"}}
    a.forget_subscribed("a", ["p/V2/#", "p/absent/#"])
    assert b.subscriptions() == {"p/V1/#": {"a"}, "p/V2/#": {"b"}, "p/V3/#": {"x"}}
    a.record_subscribed("a", [])
    a.forget_subscribed("a", [])


def test_stale_claim_of_a_dead_leader_is_cleared_by_join(
    open_coordinator: Any, clock: FakeClock
) -> None:
    leader = open_coordinator("leader")
    _dead(open_coordinator, clock, "x")
    assert leader.try_claim_drain("x")
    leader.record_adopted("x", ["k1"])
    clock.advance(LEASE_S + 1)  # the leader died mid-drain

    x = open_coordinator("x")
    assert x.try_join()
    assert x.heartbeat(), "the stale claim is gone, so it no longer fences x"
    # The old leader, waking up, is fenced out of the member it no longer drains.
    assert not leader.renew_drain("x")
    with pytest.raises(CoordinationError):
        leader.record_adopted("x", ["k2"])
    assert x.adopted_keys() == ["k1"]


def test_heartbeat_fenced_after_being_drained(open_coordinator: Any, clock: FakeClock) -> None:
    x, leader = open_coordinator("x"), open_coordinator("leader")
    assert x.try_join()
    clock.advance(LEASE_S + 1)  # x stalls (GC pause, paused VM) past its lease
    assert leader.try_claim_drain("x")
    assert not x.heartbeat(), "claimed: x must stop"
    assert [m.expires_at for m in leader.members()] == [T0 + LEASE_S], "and is not renewed"
    leader.finish_drain("x")
    assert not x.heartbeat(), "drained: x's row is gone"
    assert x.try_join()
    assert x.heartbeat()


def test_finish_drain_keeps_a_rejoined_row_and_adopted_keys(
    open_coordinator: Any, clock: FakeClock
) -> None:
    leader = open_coordinator("leader")
    _dead(open_coordinator, clock, "x")
    _dead(open_coordinator, clock, "y")
    assert leader.try_claim_drain("x")
    assert leader.try_claim_drain("y")
    leader.record_adopted("x", ["kx"])
    leader.record_adopted("y", ["ky"])
    leader.finish_drain("x")
    assert [m.replica for m in leader.members()] == ["y"]
    assert open_coordinator("x").adopted_keys() == ["kx"]
    assert open_coordinator("y").adopted_keys() == ["ky"]


def test_record_adopted_20k_keys(
    open_coordinator: Any, clock: FakeClock, db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    leader = open_coordinator("leader")
    _dead(open_coordinator, clock, "x")
    _dead(open_coordinator, clock, "y")
    assert leader.try_claim_drain("x")
    assert leader.try_claim_drain("y")
    keys = [f"vin{i % 97:03d}:msg-{i:06d}" for i in range(20_000)]

    started = time.perf_counter()
    leader.record_adopted("x", keys)
    elapsed = time.perf_counter() - started
    with capsys.disabled():
        print(
            f"\n  record_adopted 20000 keys on {db_url.split(':', 1)[0]}: {elapsed * 1000:.0f} ms"
        )

    leader.record_adopted("x", [*keys[:100], "extra"])  # a redelivery recorded again: fine
    leader.record_adopted("y", ["y-only", keys[0]])
    x = open_coordinator("x")
    assert x.adopted_keys() == sorted([*keys, "extra"])

    x.forget_adopted(keys[:10_000])
    assert x.adopted_keys() == sorted([*keys[10_000:], "extra"])
    x.forget_adopted([*keys[10_000:], "extra", "never-adopted"])
    assert x.adopted_keys() == []
    assert open_coordinator("y").adopted_keys() == sorted(["y-only", keys[0]])


def test_empty_key_lists_are_no_ops(open_coordinator: Any) -> None:
    a = open_coordinator("a")
    a.record_adopted("x", [])  # no claim needed for nothing
    a.forget_adopted([])
    assert a.adopted_keys() == []


# -- leader leases ------------------------------------------------------------------------------


def test_exactly_one_leader_and_takeover(open_coordinator: Any, clock: FakeClock) -> None:
    trio = [open_coordinator(name) for name in ("a", "b", "c")]
    assert trio[0].leader() is None
    won = [c.try_lead() for c in trio]
    assert won == [True, False, False]
    assert {c.leader() for c in trio} == {"a"}

    clock.advance(LEASE_S - 1)
    assert trio[0].try_lead(), "the holder renews"
    assert [c.try_lead() for c in trio[1:]] == [False, False]
    clock.advance(LEASE_S - 1)
    assert trio[2].leader() == "a", "renewed, so still a's"

    clock.advance(2)  # a stopped renewing: its lease expired
    assert trio[0].leader() is None
    assert trio[2].try_lead()
    assert not trio[1].try_lead()
    assert not trio[0].try_lead(), "the old leader does not get it back"
    assert trio[0].leader() == "c"

    trio[0].resign()  # not a's to give up: no effect
    assert trio[1].leader() == "c"
    trio[2].resign()
    assert trio[1].leader() is None
    assert trio[1].try_lead()


def test_roles_are_independent(open_coordinator: Any) -> None:
    a, b = open_coordinator("a"), open_coordinator("b")
    assert a.try_lead()
    assert b.try_lead("compactor")
    assert (a.leader(), a.leader("compactor")) == ("a", "b")


def test_one_coordinator_shared_by_threads(open_coordinator: Any, clock: FakeClock) -> None:
    # The daemon calls it from asyncio.to_thread workers and adopter threads at the same time.
    a = open_coordinator("a")
    _dead(open_coordinator, clock, "x")
    assert a.try_join()
    assert a.try_claim_drain("x")

    def work(thread: int) -> list[bool]:
        answers = []
        for i in range(30):
            answers += [a.heartbeat(), a.try_lead(), a.renew_drain("x")]
            a.record_adopted("x", [f"t{thread}-{i}"])
            answers.append(a.members()[0].alive)
        return answers

    with ThreadPoolExecutor(8) as pool:
        answers = [answer for result in pool.map(work, range(8)) for answer in result]
    assert all(answers)
    assert len(open_coordinator("x").adopted_keys()) == 8 * 30


# -- several OS processes racing ----------------------------------------------------------------

PROCESSES = 4
ROUNDS = 25


def _race_worker(
    url: str,
    replica: str,
    action: str,
    barrier: Any,
    results: Any,
) -> None:
    try:
        barrier.wait(timeout=60)  # all open at once: table creation races too
        coordinator = Coordinator.open(url, replica=replica, lease_s=600)
        for round_ in range(ROUNDS):
            barrier.wait(timeout=60)
            if action == "lead":
                won = coordinator.try_lead(f"round-{round_}")
            else:
                won = coordinator.try_claim_drain(f"dead-{round_}")
            results.put((round_, replica, won))
        coordinator.close()
    except Exception as exc:
        results.put((-1, replica, repr(exc)))
        barrier.abort()


def _race(url: str, action: str) -> dict[int, list[str]]:
    """Run PROCESSES processes through ROUNDS rounds of ``action``; winners per round."""
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(PROCESSES)
    results = ctx.Queue()
    workers = [
        ctx.Process(target=_race_worker, args=(url, f"r{i}", action, barrier, results))
        for i in range(PROCESSES)
    ]
    for worker in workers:
        worker.start()
    outcomes = []
    try:
        for _ in range(PROCESSES * ROUNDS):
            outcomes.append(results.get(timeout=120))
            assert outcomes[-1][0] != -1, f"worker failed: {outcomes[-1]}"
    except queue.Empty:
        pytest.fail(f"workers stopped answering after {len(outcomes)} results")
    finally:
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.kill()
    assert all(worker.exitcode == 0 for worker in workers)
    winners: dict[int, list[str]] = {round_: [] for round_ in range(ROUNDS)}
    for round_, replica, won in outcomes:
        if won:
            winners[round_].append(replica)
    return winners


def test_processes_race_for_leadership(db_url: str) -> None:
    winners = _race(db_url, "lead")
    assert all(len(w) == 1 for w in winners.values()), winners
    with Coordinator.open(db_url, replica="observer", lease_s=LEASE_S) as observer:
        assert [observer.leader(f"round-{r}") for r in range(ROUNDS)] == [
            winners[r][0] for r in range(ROUNDS)
        ]
    # Several processes won some round: the race was a real one, not one fast process.
    print(f"distinct round winners: {sorted({w[0] for w in winners.values()})}")


def test_processes_race_for_drain_claims(db_url: str) -> None:
    for round_ in range(ROUNDS):
        # Joined at the epoch with a 1 s lease: long expired by the real clock the workers use.
        with Coordinator.open(
            db_url, replica=f"dead-{round_}", lease_s=1.0, clock=lambda: 0.0
        ) as dead:
            assert dead.try_join()
    winners = _race(db_url, "drain")
    assert all(len(w) == 1 for w in winners.values()), winners


# -- failures -----------------------------------------------------------------------------------


def test_writer_lock_timeout_is_a_retriable_error(
    db_url: str, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(coordination, "_LOCK_TIMEOUT_S", 0.2)
    with (
        Coordinator.open(db_url, replica="a", lease_s=LEASE_S, clock=clock) as a,
        Coordinator.open(db_url, replica="stuck", lease_s=LEASE_S, clock=clock) as stuck,
    ):
        assert a.try_join()
        # A replica frozen inside its write transaction holds the writer lock.
        with stuck._write("hold the lock"):
            with pytest.raises(CoordinationError, match="could not heartbeat") as busy:
                a.heartbeat()
            assert busy.value.retriable
        assert a.heartbeat(), "works again once the lock is free"


def test_lost_postgresql_connection_reconnects(
    pg_schema: tuple[str, Any], clock: FakeClock
) -> None:
    url, admin = pg_schema
    name = f"coord-{uuid.uuid4().hex[:8]}"
    with Coordinator.open(
        f"{url}&application_name={name}", replica="a", lease_s=LEASE_S, clock=clock
    ) as a:
        assert a.try_join()
        killed = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            (name,),
        ).fetchall()
        assert killed == [(True,)]
        with pytest.raises(CoordinationError) as lost:
            a.heartbeat()
        assert lost.value.retriable
        assert a.heartbeat(), "the next call reconnects"


# -- handovers (VIN-sharded mode) -------------------------------------------------------------


def test_the_first_claimant_of_a_message_keeps_it_and_asking_again_changes_nothing(
    open_coordinator: Callable[[str], Coordinator],
) -> None:
    a, b = open_coordinator("a"), open_coordinator("b")
    assert a.claim("a", ["k1", "k2", "k2"]) == {"k1": "a", "k2": "a"}
    assert b.claim("b", ["k2", "k3"]) == {"k2": "a", "k3": "b"}
    assert a.claim("a", ["k1", "k3"]) == {"k1": "a", "k3": "b"}, "a redelivery: the same answer"
    # A host claims for the member it hosts, whose own coordinator later finds the claim its own.
    assert a.claim("c", ["k4"]) == {"k4": "c"}
    assert open_coordinator("c").claim("c", ["k4"]) == {"k4": "c"}
    many = [f"key-{n}" for n in range(1_234)]  # more than one SELECT's worth of keys
    assert b.claim("b", many) == dict.fromkeys(many, "b")
    assert a.forget_claims() == 4 + len(many)
    assert a.claim("a", ["k2"]) == {"k2": "a"}, "forgotten: free to claim"


def test_known_lists_and_settled_times_are_recorded(
    open_coordinator: Callable[[str], Coordinator], clock: FakeClock
) -> None:
    a, b = open_coordinator("a"), open_coordinator("b")
    assert a.known_epochs() == {}
    a.record_known("a", 1)
    b.record_known("b", 2)
    a.record_known("a", 2)
    a.record_known("c", 1)  # a hosted member, recorded by its host
    assert b.known_epochs() == {"a": 2, "b": 2, "c": 1}
    assert b.settled_times() == {}
    a.mark_settled([2, 3])
    clock.advance(5)
    b.mark_settled([3, 4])  # 3 is kept at the first time
    assert a.settled_times() == {2: T0, 3: T0, 4: T0 + 5}
    # Settled times live beside the member lists and are not taken for one.
    assert a.try_lead()
    assert a.publish_members(["a", "b"])
    assert b.member_lists() == {1: ["a", "b"]}


def test_postgresql_tables_live_in_the_urls_schema(pg_schema: tuple[str, Any]) -> None:
    url, admin = pg_schema
    schema = url.rsplit("%3D", 1)[1]
    Coordinator.open(url, replica="a", lease_s=LEASE_S).close()
    tables = admin.execute(
        "SELECT table_schema, table_name FROM information_schema.tables "
        "WHERE table_name LIKE 'hm_replica_%%' AND table_schema = %s ORDER BY table_name",
        (schema,),
    ).fetchall()
    assert [t for _, t in tables] == [
        "hm_replica_adopted",
        "hm_replica_claims",
        "hm_replica_drains",
        "hm_replica_expected",
        "hm_replica_known",
        "hm_replica_leases",
        "hm_replica_members",
        "hm_replica_returns",
        "hm_replica_settings",
        "hm_replica_subscriptions",
    ]


def test_postgres_scheme_is_accepted(pg_schema: tuple[str, Any]) -> None:
    url = pg_schema[0].replace("postgresql://", "postgres://", 1)
    with Coordinator.open(url, replica="a", lease_s=LEASE_S) as a:
        assert a.try_join()


def test_open_is_idempotent(db_url: str) -> None:
    for _ in range(2):
        with Coordinator.open(db_url, replica="a", lease_s=LEASE_S) as a:
            assert a.try_join()
    with Coordinator.open(db_url, replica="b", lease_s=LEASE_S) as b:
        assert [m.replica for m in b.members()] == ["a"]


def test_closed_coordinator_refuses_calls(tmp_path: Path) -> None:
    a = Coordinator.open(f"sqlite:///{tmp_path / 'c.sqlite3'}", replica="a", lease_s=LEASE_S)
    a.close()
    a.close()
    with pytest.raises(CoordinationError, match="closed"):
        a.try_join()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mysql://u:s3cret@db/x", "unsupported database"),
        ("", "unsupported database"),
        ("sqlite://relative.sqlite3", "not an absolute SQLite path"),
        ("sqlite:///", "not an absolute SQLite path"),
        ("sqlite:////tmp/x.sqlite3?mode=ro", "take no parameters"),
        ("sqlite:////nonexistent-folder-hm/coordination.sqlite3", "nonexistent-folder-hm does not"),
    ],
)
def test_bad_urls_are_config_errors(url: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected) as bad:
        Coordinator.open(url, replica="a", lease_s=LEASE_S)
    assert bad.value.key == "replica.coordination"
    assert "s3cret" not in str(bad.value)


def test_unreachable_postgresql_is_a_config_error_without_the_password() -> None:
    pytest.importorskip("psycopg")
    url = "postgresql://postgres:hunter2@127.0.0.1:1/test?connect_timeout=2"
    with pytest.raises(ConfigError) as bad:
        Coordinator.open(url, replica="a", lease_s=LEASE_S)
    message = str(bad.value)
    assert "hunter2" not in message
    assert "postgresql://postgres:***@127.0.0.1:1/test" in message
    assert "check that the server is running" in message


def test_malformed_postgresql_url_is_a_config_error() -> None:
    pytest.importorskip("psycopg")
    with pytest.raises(ConfigError, match="not a valid PostgreSQL URL") as bad:
        Coordinator.open("postgresql://u:s3cret@h/db?no_such_parameter=1", replica="a", lease_s=1)
    assert "s3cret" not in str(bad.value)


def test_postgresql_connections_are_named_after_the_replica(pg_schema: tuple[str, Any]) -> None:
    url, admin = pg_schema
    with Coordinator.open(url, replica="pod-7", lease_s=LEASE_S) as a:
        assert a.try_join()
        names = admin.execute(
            "SELECT application_name FROM pg_stat_activity WHERE application_name LIKE 'hm-%%'"
        ).fetchall()
    assert ("hm-ingest pod-7",) in names


def test_unwritable_sqlite_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(ConfigError, match="cannot use the coordination database"):
        Coordinator.open(f"sqlite:///{path}", replica="a", lease_s=LEASE_S)


def test_sqlite_url_forms() -> None:
    assert sqlite_path("sqlite:////shared/c.sqlite3") == Path("/shared/c.sqlite3")
    assert sqlite_path("sqlite:///shared/c.sqlite3") == Path("/shared/c.sqlite3")


def test_redact_url() -> None:
    assert redact_url("postgresql://u:p@h:5/db") == "postgresql://u:***@h:5/db"
    assert redact_url("postgresql://u@h/db") == "postgresql://u@h/db"
    assert redact_url("postgres://h/db?password=p&sslmode=require") == (
        "postgres://h/db?password=***&sslmode=require"
    )
