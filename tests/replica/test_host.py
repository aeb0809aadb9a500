"""Hosting a lost replica's session (VIN-sharded mode), against a real mutual-TLS Mosquitto.

The "lost replica" is an MqttSession that subscribed its VINs' topics with a persistent session
and went away; messages published meanwhile are queued in its session. The host must hand each
to the pipeline, record its key before its PUBACK, never reconnect once the connection is gone,
and leave the session on the broker for the replica.
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from ingest.errors import BrokerError
from ingest.mqtt import Delivery, MqttOptions, MqttSession
from ingest.replica.adopt import message_key_function
from ingest.replica.host import SessionHost
from ingest.testing.broker import DEFAULT_MAX_INFLIGHT_MESSAGES, MosquittoBroker, free_port
from ingest.testing.certs import CertBundle
from ingest.testing.daemon import APP_ID
from ingest.testing.publish import Publisher
from ingest.testing.traffic import Message, make_vin, stream
from tests.test_mqtt import wait_until

DEADLINE_S = 15.0
CHANNEL = 7
PREFIX = f"live/level13/{APP_ID}"
VINS = [make_vin(i) for i in range(5)]
# What a VIN-sharded replica owning VINS subscribes: its VINs' V1 topics and the V2 topic.
FILTERS = [*(f"{PREFIX}/{vin}/#" for vin in VINS), PREFIX]


@pytest.fixture(params=["3.1.1", "5"])
def options(
    request: pytest.FixtureRequest, broker: MosquittoBroker, certs: CertBundle
) -> MqttOptions:
    return MqttOptions(
        host=broker.host,
        port=broker.port,
        client_id=f"lost-replica-{uuid.uuid4().hex[:8]}",
        topic="unused: the filters are FILTERS",
        ca_file=certs.ca_file,
        cert_file=certs.client_cert,
        key_file=certs.client_key,
        protocol=request.param,
        # MQTT 5: the client's receive maximum, not the broker's max_inflight_messages, bounds
        # what is in flight to us; the same window under both protocols keeps the tests alike.
        receive_maximum=DEFAULT_MAX_INFLIGHT_MESSAGES,
        reconnect_min_s=0.05,
        reconnect_max_s=0.2,
    )


class Intake:
    """Stands in for intake: takes each message, 'logs' it and acks it on its own thread, in
    receipt order, like ingest.intake does."""

    def __init__(self) -> None:
        self.received: list[tuple[str, bytes, Delivery]] = []
        self.host: SessionHost | None = None
        self.ack_delay_s = 0.0
        self._queue: queue.SimpleQueue[Delivery | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._ack_in_order, daemon=True)
        self._thread.start()

    def submit(self, topic: str, payload: bytes, delivery: Delivery) -> None:
        self.received.append((topic, payload, delivery))
        self._queue.put(delivery)

    def payloads(self) -> list[bytes]:
        return [p for _, p, _ in self.received]

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(DEADLINE_S)

    def _ack_in_order(self) -> None:
        while (delivery := self._queue.get()) is not None:
            time.sleep(self.ack_delay_s)
            assert self.host is not None
            self.host.ack(delivery)


@pytest.fixture
def intake() -> Iterator[Intake]:
    made = Intake()
    yield made
    made.close()


@pytest.fixture
def hosts() -> Iterator[Callable[..., SessionHost]]:
    """Builds hosts feeding an Intake; stops every one after the test."""
    made: list[SessionHost] = []

    def make(
        options: MqttOptions,
        intake: Intake,
        record_keys: Callable[[list[str]], None],
        filters: Callable[[], list[str]] = lambda: FILTERS,
        logged_before: Callable[[list[str]], set[str]] | None = None,
    ) -> SessionHost:
        host = SessionHost(
            options,
            replica="lost",
            channel=CHANNEL,
            submit=intake.submit,
            key_of=message_key_function(APP_ID, 1 << 20),
            record_keys=record_keys,
            filters=filters,
            logged_before=logged_before,
        )
        intake.host = host
        made.append(host)
        return host

    yield make
    for host in made:
        host.stop()


class Replica:
    """The lost replica's own session (or whoever connects with its client id), acking at once."""

    def __init__(self, options: MqttOptions) -> None:
        self.received: list[bytes] = []
        self.session = MqttSession(options, self._on_message, filters=lambda: FILTERS)

    def _on_message(self, _topic: str, payload: bytes, delivery: Delivery) -> None:
        self.received.append(payload)
        self.session.ack(delivery)

    def __enter__(self) -> Replica:
        self.session.start()
        self.session.wait_first_connection(DEADLINE_S)
        return self

    def __exit__(self, *_exc: object) -> None:
        self.session.stop()


def leave_a_session(options: MqttOptions) -> None:
    """The replica subscribes its filters with a persistent session, then goes away."""
    with Replica(options):
        pass


def publish(broker: MosquittoBroker, certs: CertBundle, messages: list[Message]) -> None:
    with Publisher(broker, certs) as publisher:
        publisher.publish_many([(m.topic, m.payload) for m in messages])


def traffic(count: int, seed: int) -> list[Message]:
    return list(stream(APP_ID, count, vehicles=len(VINS), seed=seed, prefix=f"s{seed}"))


def test_queued_messages_reach_intake_and_no_puback_leaves_before_their_keys_are_recorded(
    broker: MosquittoBroker,
    certs: CertBundle,
    options: MqttOptions,
    intake: Intake,
    hosts: Callable[..., SessionHost],
) -> None:
    leave_a_session(options)
    messages = traffic(50, seed=1)
    publish(broker, certs, messages)

    recorded: list[str] = []
    first_batch_may_finish = threading.Event()

    def record_keys(keys: list[str]) -> None:
        # The first batch is held: until it returns, no PUBACK may go out at all.
        assert first_batch_may_finish.wait(DEADLINE_S)
        recorded.extend(keys)

    host = hosts(options, intake, record_keys)
    host.start()
    assert host.wait_connected(DEADLINE_S) is True
    # Mosquitto sends no more than its in-flight window of unacknowledged messages: stuck at
    # exactly that many, the broker has seen no PUBACK while the keys were being recorded.
    wait_until(lambda: len(intake.received) == DEFAULT_MAX_INFLIGHT_MESSAGES, "a full window")
    time.sleep(0.5)
    assert len(intake.received) == DEFAULT_MAX_INFLIGHT_MESSAGES
    assert recorded == []

    first_batch_may_finish.set()
    wait_until(lambda: len(intake.received) == len(messages), "every queued message")
    wait_until(lambda: len(recorded) == len(messages), "every key recorded")
    assert host.messages == len(messages)
    assert {d.channel for _, _, d in intake.received} == {CHANNEL}
    assert sorted(intake.payloads()) == sorted(m.payload for m in messages)
    # The sink keys these messages by message_id: those are what a returning replica skips.
    assert sorted(recorded) == sorted(m.message_id for m in messages)
    host.release(DEADLINE_S)
    assert host.ended is None

    # Everything was acknowledged: the replica, back, gets only what is new.
    with Replica(options) as replica:
        assert replica.session.session_present is True
        marker = traffic(1, seed=2)
        publish(broker, certs, marker)
        wait_until(lambda: bool(replica.received), "the marker")
        time.sleep(0.2)
        assert replica.received == [marker[0].payload]


def test_a_redelivery_an_earlier_holder_logged_is_marked_so_intake_does_not_log_it_again(
    broker: MosquittoBroker,
    certs: CertBundle,
    options: MqttOptions,
    hosts: Callable[..., SessionHost],
) -> None:
    """A host logs messages and records their keys, but its connection ends before the broker
    reads their PUBACKs (or it dies): the next host gets them again, flagged DUP. Those whose
    keys an earlier holder recorded are marked ``logged_elsewhere``; the rest are new to it."""
    leave_a_session(options)
    messages = traffic(30, seed=3)
    publish(broker, certs, messages)
    first = Intake()
    first.host = hosts(options, first, lambda _keys: None)
    # The first host's intake never acknowledges: what it received stays in flight.
    first.host.ack = lambda _delivery: False  # type: ignore[method-assign]
    first.host.start()
    assert first.host.wait_connected(DEADLINE_S) is True
    wait_until(lambda: len(first.received) == DEFAULT_MAX_INFLIGHT_MESSAGES, "a full window")
    logged = {m.message_id for m in messages if m.payload in set(first.payloads()[:12])}
    first.host.stop()
    first.close()

    asked: list[list[str]] = []

    def logged_before(keys: list[str]) -> set[str]:
        asked.append(keys)
        return set(keys) & logged

    second = Intake()
    try:
        host = hosts(options, second, lambda _keys: None, logged_before=logged_before)
        host.start()
        assert host.wait_connected(DEADLINE_S) is True
        wait_until(lambda: len(second.received) == len(messages), "every message")
    finally:
        second.close()
    by_payload = {payload: delivery for _, payload, delivery in second.received}
    in_flight = set(first.payloads())
    for message in messages:
        delivery = by_payload[message.payload]
        assert delivery.redelivered == (message.payload in in_flight), message.message_id
        assert delivery.logged_elsewhere == (message.message_id in logged), message.message_id
    assert host.logged_before == len(logged) == 12
    assert len(asked) == DEFAULT_MAX_INFLIGHT_MESSAGES, "only redeliveries are looked up"


def test_keys_that_cannot_be_recorded_end_hosting_and_nothing_is_acknowledged(
    broker: MosquittoBroker,
    certs: CertBundle,
    options: MqttOptions,
    intake: Intake,
    hosts: Callable[..., SessionHost],
) -> None:
    leave_a_session(options)
    messages = traffic(10, seed=3)
    publish(broker, certs, messages)

    def record_keys(_keys: list[str]) -> None:
        raise ConnectionError("coordination database unreachable")

    host = hosts(options, intake, record_keys)
    host.start()
    # The first key can fail before this thread sees the subscription complete: hosting has
    # then already ended, and wait_connected says so. Either way, the assertions below hold.
    with contextlib.suppress(BrokerError):
        host.wait_connected(DEADLINE_S)
    wait_until(lambda: host.ended is not None, "hosting to end")
    assert "recording" in str(host.ended)
    assert "coordination database unreachable" in str(host.ended)
    host.stop()

    # Nothing was acknowledged: all of it is still queued for the next holder of the session.
    with Replica(options) as replica:
        assert replica.session.session_present is True
        wait_until(lambda: len(replica.received) == len(messages), "every message again")
        assert sorted(replica.received) == sorted(m.payload for m in messages)


def test_hosting_ends_without_reconnecting_when_the_replica_takes_its_session_back(
    options: MqttOptions, intake: Intake, hosts: Callable[..., SessionHost]
) -> None:
    leave_a_session(options)
    host = hosts(options, intake, lambda _keys: None)
    host.start()
    host.wait_connected(DEADLINE_S)

    with Replica(options) as replica:  # same client id: the broker ends the host's connection
        wait_until(lambda: host.ended is not None, "hosting to end")
        assert "connection lost" in str(host.ended)
        time.sleep(1.0)  # several reconnect backoffs (0.2 s at most): the host must not try
        assert replica.session.connected.is_set()
        assert replica.session.reconnects == 0
    with pytest.raises(BrokerError, match="not connected"):
        host.subscribe([f"{PREFIX}/{make_vin(99)}/#"])


def test_subscribe_on_a_hosted_session_delivers_its_topics(
    broker: MosquittoBroker,
    certs: CertBundle,
    options: MqttOptions,
    intake: Intake,
    hosts: Callable[..., SessionHost],
) -> None:
    # The broker has no session for this id: the host subscribes filters() itself.
    host = hosts(options, intake, lambda _keys: None, filters=lambda: FILTERS[:1])
    host.start()
    assert host.wait_connected(DEADLINE_S) is False

    newly_owned = make_vin(1000)
    host.subscribe([f"{PREFIX}/{newly_owned}/#"])
    message = next(stream(APP_ID, 1, vehicles=1, seed=4, prefix="new"))
    moved = Message(
        message.topic.replace(message.vin, newly_owned),
        message.payload,
        message.message_id,
        newly_owned,
        message.items,
    )
    publish(broker, certs, [moved])
    wait_until(lambda: bool(intake.received), "the new VIN's message")
    topic, _, delivery = intake.received[0]
    assert (topic, delivery.channel) == (moved.topic, CHANNEL)

    host.unsubscribe([f"{PREFIX}/{newly_owned}/#"])


def test_stop_leaves_the_session_with_its_subscriptions_for_the_replica(
    broker: MosquittoBroker,
    certs: CertBundle,
    options: MqttOptions,
    intake: Intake,
    hosts: Callable[..., SessionHost],
) -> None:
    leave_a_session(options)
    host = hosts(options, intake, lambda _keys: None)
    host.start()
    assert host.wait_connected(DEADLINE_S) is True
    host.stop()
    assert host.ended is None  # stopped, not ended by itself

    while_away = traffic(5, seed=5)
    publish(broker, certs, while_away)
    with Replica(options) as replica:
        assert replica.session.session_present is True
        assert replica.session.subscribes == 0  # the broker kept the subscriptions
        wait_until(lambda: len(replica.received) == len(while_away), "the queued messages")
        live = traffic(3, seed=6)
        publish(broker, certs, live)
        wait_until(lambda: len(replica.received) == 8, "the live ones")
        assert sorted(replica.received) == sorted(m.payload for m in while_away + live)


def test_release_waits_for_intake_so_the_replica_gets_no_repeat(
    broker: MosquittoBroker,
    certs: CertBundle,
    options: MqttOptions,
    intake: Intake,
    hosts: Callable[..., SessionHost],
) -> None:
    leave_a_session(options)
    # More than the broker's in-flight window: the rest come as intake acks, after release()
    # began, and must be left to the replica.
    messages = traffic(DEFAULT_MAX_INFLIGHT_MESSAGES + 10, seed=7)
    publish(broker, certs, messages)
    recorded: list[str] = []
    intake.ack_delay_s = 0.05  # intake logs slower than messages arrive
    host = hosts(options, intake, recorded.extend)
    host.start()
    host.wait_connected(DEADLINE_S)
    wait_until(lambda: bool(intake.received), "the first message")

    host.release(DEADLINE_S)

    taken = {p for _, p, _ in intake.received}
    assert len(recorded) == len(taken) == host.messages
    # What the host did not take stays queued for the replica; what it took never comes back.
    with Replica(options) as replica:
        rest = len(messages) - len(taken)
        assert rest > 0
        wait_until(lambda: len(replica.received) == rest, f"the {rest} left")
        marker = traffic(1, seed=8)
        publish(broker, certs, marker)
        wait_until(lambda: marker[0].payload in replica.received, "the marker")
        assert not taken & set(replica.received)
        assert taken | set(replica.received) == {m.payload for m in messages + marker}


def test_a_host_that_cannot_connect_in_time_says_so_and_stops_trying(
    options: MqttOptions, intake: Intake, hosts: Callable[..., SessionHost]
) -> None:
    host = hosts(dataclasses.replace(options, port=free_port()), intake, lambda _keys: None)
    host.start()
    with pytest.raises(BrokerError, match=r"not connected within 0\.5 s") as raised:
        host.wait_connected(0.5)
    assert raised.value.retriable
    assert host.ended is not None
