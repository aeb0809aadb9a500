"""What the leader does with a lost replica's session in VIN-sharded mode (VinSharding.host).

Real parts throughout: a mutual-TLS Mosquitto, the SessionHost on it, a SQLite coordination file
and the replica runtime on it. Intake is the stand-in from test_host (it "logs" and acks in
receipt order on its own thread). Three ways hosting ends: the replica asks for its session back
(hand-back: the session stays on the broker with its subscriptions), the replica left the member
list and its VINs have new owners (retired: the caller drains and deletes the session), and the
host shuts down (the claim is dropped at once, so the next leader need not wait for it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from ingest.metrics import Metrics
from ingest.mqtt import MqttOptions
from ingest.replica.adopt import message_key_function
from ingest.replica.coordination import Coordinator
from ingest.replica.host import SessionHost
from ingest.replica.runtime import ReplicaRuntime
from ingest.replica.subscriptions import SubscriptionSync
from ingest.replica.vin_mode import VinSharding
from ingest.testing.broker import MosquittoBroker
from ingest.testing.certs import CertBundle
from ingest.testing.daemon import APP_ID
from tests.replica.test_host import (
    DEADLINE_S,
    FILTERS,
    PREFIX,
    VINS,
    Intake,
    Replica,
    publish,
    traffic,
    wait_until,
)

LEASE_S = 1.0


@pytest.fixture
def coordination_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'coordination.sqlite3'}"


@pytest.fixture
def leader(coordination_url: str) -> Iterator[ReplicaRuntime]:
    runtime = ReplicaRuntime(
        Coordinator.open(coordination_url, replica="r0", lease_s=LEASE_S),
        heartbeat_s=0.25,
        members=["r0", "r1"],
    )
    yield runtime
    runtime.coordinator.close()


def _lose(coordination_url: str, member: str, options: MqttOptions) -> Coordinator:
    """``member`` subscribed FILTERS, recorded them, and went away: its lease runs out."""
    coordinator = Coordinator.open(coordination_url, replica=member, lease_s=LEASE_S)
    assert coordinator.try_join()
    with Replica(options):
        pass
    coordinator.record_subscribed(member, FILTERS)
    time.sleep(LEASE_S + 0.1)
    return coordinator


def _sharding(leader: ReplicaRuntime) -> VinSharding:
    return VinSharding(
        runtime=leader,
        prefix=PREFIX,
        vins=lambda: set(VINS),
        interval_s=0.25,
        metrics=Metrics(CollectorRegistry()),
    )


class Hosts:
    """Builds the SessionHosts VinSharding.host asks for, feeding ``intake``; keeps them."""

    def __init__(self, options: MqttOptions, intake: Intake, runtime: ReplicaRuntime) -> None:
        self.options, self.intake, self.runtime = options, intake, runtime
        self.made: list[SessionHost] = []

    def __call__(self, member: str, sync: SubscriptionSync) -> SessionHost:
        runtime = self.runtime
        host = SessionHost(
            self.options,
            replica=member,
            channel=5,
            submit=self.intake.submit,
            key_of=message_key_function(APP_ID, 1 << 20),
            record_keys=lambda keys: runtime.call(runtime.coordinator.record_adopted, member, keys),
            filters=sync.held,
        )
        self.intake.host = host
        self.made.append(host)
        return host


@pytest.fixture
def options(broker: MosquittoBroker, certs: CertBundle) -> MqttOptions:
    return MqttOptions(
        host=broker.host,
        port=broker.port,
        client_id="hm-ingest-r1",
        topic="unused: the filters are FILTERS",
        ca_file=certs.ca_file,
        cert_file=certs.client_cert,
        key_file=certs.client_key,
        reconnect_min_s=0.05,
        reconnect_max_s=0.2,
    )


@pytest.fixture
def intake() -> Iterator[Intake]:
    made = Intake()
    yield made
    made.close()


def test_hosting_ends_in_a_hand_back_when_the_replica_returns(
    broker: MosquittoBroker,
    certs: CertBundle,
    options: MqttOptions,
    coordination_url: str,
    leader: ReplicaRuntime,
    intake: Intake,
) -> None:
    r1 = _lose(coordination_url, "r1", options)
    assert leader.coordinator.try_claim_drain("r1")
    make = Hosts(options, intake, leader)
    before = traffic(30, seed=1)
    after = traffic(20, seed=2)

    async def scenario() -> bool:
        task = asyncio.create_task(_sharding(leader).host("r1", make))
        await asyncio.to_thread(publish, broker, certs, before)
        await asyncio.to_thread(
            wait_until, lambda: len(intake.received) == len(before), "the hosted messages"
        )
        assert not r1.try_join(), "hosted: r1 waits, asking for its session back"
        return await asyncio.wait_for(task, DEADLINE_S)

    assert asyncio.run(scenario()) is False
    assert sorted(intake.payloads()) == sorted(m.payload for m in before)
    assert len(r1.adopted_keys()) == len(before), "every hosted message's key, before its PUBACK"
    leader.coordinator.finish_drain("r1")  # the runtime does this after host() returns
    assert r1.try_join()

    publish(broker, certs, after)
    with Replica(dataclasses.replace(options)) as replica:
        session = replica.session
        assert session.session_present, "the hand-back left the session on the broker"
        wait_until(lambda: len(replica.received) == len(after), "r1's own messages")
    assert sorted(replica.received) == sorted(m.payload for m in after), "nothing twice"
    r1.close()


def test_a_removed_members_session_is_retired_once_its_vins_have_new_owners(
    broker: MosquittoBroker,
    certs: CertBundle,
    options: MqttOptions,
    coordination_url: str,
    intake: Intake,
) -> None:
    r1 = _lose(coordination_url, "r1", options)
    # r1 left the member list: r0 owns everything now, and has subscribed it.
    runtime = ReplicaRuntime(
        Coordinator.open(coordination_url, replica="r0", lease_s=LEASE_S),
        heartbeat_s=0.25,
        members=["r0"],
    )
    runtime.coordinator.record_subscribed("r0", FILTERS)
    assert runtime.coordinator.try_claim_drain("r1")
    make = Hosts(options, intake, runtime)

    retired = asyncio.run(asyncio.wait_for(_sharding(runtime).host("r1", make), DEADLINE_S))

    assert retired is True
    assert runtime.coordinator.subscribed("r1") == set(), "every filter handed to r0"
    # The session no longer holds a filter: a message to r1's old VINs does not reach it.
    publish(broker, certs, traffic(5, seed=3))
    with Replica(options) as replica:
        time.sleep(0.5)
        assert replica.received == []
    runtime.coordinator.close()
    r1.close()


def test_a_host_that_shuts_down_drops_its_claim(
    options: MqttOptions,
    coordination_url: str,
    leader: ReplicaRuntime,
    intake: Intake,
) -> None:
    r1 = _lose(coordination_url, "r1", options)
    assert leader.coordinator.try_claim_drain("r1")
    make = Hosts(options, intake, leader)

    async def scenario() -> None:
        task = asyncio.create_task(_sharding(leader).host("r1", make))
        await asyncio.sleep(1.0)
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert leader.coordinator.claims() == {}, "the next leader need not wait for it to expire"
    (host,) = make.made
    assert host.ended is None, "stopped by us, not lost"
    r1.close()
