"""MqttSession's topic filters against a real mutual-TLS Mosquitto: the filters subscribed at
connect, and subscribe/unsubscribe while it runs (VIN-sharded replicas)."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from ingest.errors import BrokerError
from ingest.mqtt import FILTERS_PER_PACKET, Delivery, FilterSession, MqttOptions, MqttSession
from ingest.testing import CertBundle, MosquittoBroker, publish_lines
from ingest.testing.broker import free_port
from ingest.testing.proxy import FaultyProxy
from tests.test_mqtt import wait_until

DEADLINE_S = 15.0
DYNAMIC_SECURITY_PLUGIN = Path("/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so")


class Inbox:
    """Collects what a session delivers and acks each message at once."""

    def __init__(self) -> None:
        self.items: list[tuple[str, bytes, Delivery]] = []
        self._lock = threading.Lock()
        self.session: MqttSession | None = None

    def __call__(self, topic: str, payload: bytes, delivery: Delivery) -> None:
        with self._lock:
            self.items.append((topic, payload, delivery))
        if self.session is not None:
            self.session.ack(delivery)

    def payloads(self) -> list[bytes]:
        with self._lock:
            return [p for _, p, _ in self.items]

    def wait_for(self, payload: bytes) -> None:
        wait_until(lambda: payload in self.payloads(), f"payload {payload!r}")


class Filters:
    """What a VIN-sharded replica keeps: the filters it holds, read by the session at connect."""

    def __init__(self, *filters: str) -> None:
        self.held = list(filters)

    def __call__(self) -> list[str]:
        return list(self.held)


@pytest.fixture
def prefix() -> str:
    return f"live/level13/{uuid.uuid4().hex[:10]}"


@pytest.fixture(params=["3.1.1", "5"])
def protocol(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def options_for(
    broker: MosquittoBroker, certs: CertBundle, protocol: str = "3.1.1", **overrides: object
) -> MqttOptions:
    fields: dict[str, object] = {
        "host": broker.host,
        "port": broker.port,
        "client_id": f"vin-replica-{uuid.uuid4().hex[:10]}",
        "topic": "unused/by/these/tests",
        "ca_file": certs.ca_file,
        "cert_file": certs.client_cert,
        "key_file": certs.client_key,
        "protocol": protocol,
        "reconnect_min_s": 0.05,
        "reconnect_max_s": 0.5,
    }
    fields.update(overrides)
    return MqttOptions(**fields)  # type: ignore[arg-type]


@pytest.fixture
def sessions() -> Iterator[Callable[..., tuple[MqttSession, Inbox]]]:
    """Starts sessions (acking what they receive) and stops every one after the test."""
    made: list[MqttSession] = []

    def make(
        options: MqttOptions,
        filters: Callable[[], list[str]],
        *,
        channel: int = 0,
        subscription_ids: Callable[[str], int | None] | None = None,
    ) -> tuple[MqttSession, Inbox]:
        inbox = Inbox()
        session = MqttSession(
            options, inbox, filters=filters, channel=channel, subscription_ids=subscription_ids
        )
        inbox.session = session
        made.append(session)
        session.start()
        return session, inbox

    yield make
    for session in made:
        session.stop()


def publish(broker: MosquittoBroker, certs: CertBundle, *messages: tuple[str, bytes]) -> None:
    publish_lines(broker, certs, list(messages))


def test_runtime_subscribe_delivers_and_unsubscribe_stops_delivery(
    broker: MosquittoBroker,
    certs: CertBundle,
    sessions: Callable[..., tuple[MqttSession, Inbox]],
    prefix: str,
    protocol: str,
) -> None:
    session, inbox = sessions(options_for(broker, certs, protocol), Filters(), channel=3)
    session.wait_first_connection(DEADLINE_S)
    assert session.subscribes == 0  # nothing assigned yet: subscribed at once, no packet
    filter_session: FilterSession = session

    filter_session.subscribe([f"{prefix}/VIN1/#", prefix])
    publish(broker, certs, (f"{prefix}/VIN1/diagnostics/get/odometer", b"v1"), (prefix, b"v2"))
    inbox.wait_for(b"v2")
    inbox.wait_for(b"v1")
    assert {d.channel for _, _, d in inbox.items} == {3}

    filter_session.unsubscribe([f"{prefix}/VIN1/#"])
    # One publisher, QoS 1: the marker on the still-subscribed topic comes after the other.
    publish(broker, certs, (f"{prefix}/VIN1/diagnostics/get/odometer", b"gone"), (prefix, b"mark"))
    inbox.wait_for(b"mark")
    assert b"gone" not in inbox.payloads()
    # Empty input is nothing to do, not an error.
    filter_session.subscribe([])
    filter_session.unsubscribe([])


def test_connect_without_a_session_subscribes_what_filters_returns(
    tmp_path: Path,
    certs: CertBundle,
    sessions: Callable[..., tuple[MqttSession, Inbox]],
    prefix: str,
) -> None:
    with MosquittoBroker(tmp_path / "volatile", certs, persistence=False) as volatile:
        filters = Filters(f"{prefix}/A/#")
        session, inbox = sessions(options_for(volatile, certs), filters)
        session.wait_first_connection(DEADLINE_S)
        assert (session.session_present, session.subscribes) == (False, 1)
        session.subscribe([f"{prefix}/B/#"])
        filters.held.append(f"{prefix}/B/#")  # the caller keeps its list in step

        volatile.restart()  # no persistence: the session and its subscriptions are gone
        wait_until(lambda: session.reconnects == 1 and session.subscribed.is_set(), "resubscribe")
        assert (session.session_present, session.subscribes) == (False, 2)
        publish(volatile, certs, (f"{prefix}/A/x", b"a"), (f"{prefix}/B/x", b"b"))
        inbox.wait_for(b"a")
        inbox.wait_for(b"b")


def test_more_filters_than_fit_one_packet(
    broker: MosquittoBroker,
    certs: CertBundle,
    sessions: Callable[..., tuple[MqttSession, Inbox]],
    prefix: str,
) -> None:
    count = 2 * FILTERS_PER_PACKET + 200
    at_connect = Filters(*(f"{prefix}/C{i:05d}/#" for i in range(count)))
    session, inbox = sessions(options_for(broker, certs), at_connect)
    session.wait_first_connection(DEADLINE_S)
    assert session.subscribes == 3  # 500 + 500 + 200

    later = [f"{prefix}/R{i:05d}/#" for i in range(count)]
    session.subscribe(later)
    publish(
        broker,
        certs,
        (f"{prefix}/C00000/x", b"first at connect"),
        (f"{prefix}/C{count - 1:05d}/x", b"last at connect"),
        (f"{prefix}/R00000/x", b"first later"),
        (f"{prefix}/R{count - 1:05d}/x", b"last later"),
    )
    for payload in (b"first at connect", b"last at connect", b"first later", b"last later"):
        inbox.wait_for(payload)

    session.unsubscribe(later)
    publish(broker, certs, (f"{prefix}/R{count - 1:05d}/x", b"gone"), (f"{prefix}/C00001/x", b"m"))
    inbox.wait_for(b"m")
    assert b"gone" not in inbox.payloads()


def test_subscribe_without_a_connection_is_retriable(
    broker: MosquittoBroker,
    certs: CertBundle,
    sessions: Callable[..., tuple[MqttSession, Inbox]],
    prefix: str,
) -> None:
    nobody_listens = options_for(broker, certs, port=free_port())
    session, _ = sessions(nobody_listens, Filters())
    for change in (session.subscribe, session.unsubscribe):
        with pytest.raises(BrokerError, match="not connected to") as raised:
            change([f"{prefix}/A/#"], 1.0)
        assert raised.value.retriable


def test_no_ack_in_time_and_a_connection_lost_before_the_ack_are_retriable(
    broker: MosquittoBroker,
    certs: CertBundle,
    sessions: Callable[..., tuple[MqttSession, Inbox]],
    prefix: str,
) -> None:
    with FaultyProxy(broker.host, broker.port) as proxy:
        session, _ = sessions(options_for(broker, certs, port=proxy.port), Filters())
        session.wait_first_connection(DEADLINE_S)
        proxy.freeze()  # the SUBSCRIBE goes nowhere
        started = time.monotonic()
        with pytest.raises(BrokerError, match="did not acknowledge the subscribe") as raised:
            session.subscribe([f"{prefix}/A/#"], 0.5)
        assert raised.value.retriable
        assert time.monotonic() - started < 3

        errors: list[BrokerError] = []

        def subscribe() -> None:
            try:
                session.subscribe([f"{prefix}/B/#"], DEADLINE_S)
            except BrokerError as exc:
                errors.append(exc)

        waiter = threading.Thread(target=subscribe)
        waiter.start()
        time.sleep(0.3)  # the SUBSCRIBE is queued and stuck in the frozen proxy
        proxy.drop_all()
        waiter.join(DEADLINE_S)
        assert len(errors) == 1
        assert errors[0].retriable
        assert "connection ended before the broker acknowledged" in str(errors[0])


def test_invalid_filters_are_refused_before_sending(
    broker: MosquittoBroker,
    certs: CertBundle,
    sessions: Callable[..., tuple[MqttSession, Inbox]],
    prefix: str,
) -> None:
    # paho itself raises ValueError on these; Mosquitto would hang up on the whole connection.
    session, _ = sessions(options_for(broker, certs), Filters())
    session.wait_first_connection(DEADLINE_S)
    with pytest.raises(BrokerError, match=r"invalid topic filter\(s\) 'a/#/b', 'a/b\+'") as raised:
        session.subscribe([f"{prefix}/ok/#", "a/#/b", "a/b+"])
    assert not raised.value.retriable
    assert session.connected.is_set()


class AccessControlledBroker(MosquittoBroker):
    """Mosquitto with its dynamic security plugin denying ``forbidden/#`` to our client.

    Mosquitto's plain ``acl_file`` never refuses a SUBSCRIBE (it filters at delivery); this
    plugin does, with SUBACK 0x80 (MQTT 3.1.1) or 0x87 (MQTT 5), and UNSUBACK 0x87.
    """

    def _config(self) -> str:
        rules = self._dir / "dynamic-security.json"
        deny = [
            {"acltype": kind, "topic": "forbidden/#", "priority": 1, "allow": False}
            for kind in ("subscribePattern", "unsubscribePattern")
        ]
        everything = {
            "publishClientSend": True,
            "publishClientReceive": True,
            "subscribe": True,
            "unsubscribe": True,
        }
        rules.write_text(
            json.dumps(
                {
                    "defaultACLAccess": everything,
                    "clients": [
                        {"username": self.certs.client_id, "roles": [{"rolename": "limited"}]}
                    ],
                    "groups": [],
                    "roles": [{"rolename": "limited", "acls": deny}],
                }
            )
        )
        return (
            super()._config()
            + f"plugin {DYNAMIC_SECURITY_PLUGIN}\nplugin_opt_config_file {rules}\n"
        )


@pytest.fixture
def guarded(tmp_path: Path, certs: CertBundle) -> Iterator[MosquittoBroker]:
    if not DYNAMIC_SECURITY_PLUGIN.exists():
        pytest.skip(f"Mosquitto's dynamic security plugin is not at {DYNAMIC_SECURITY_PLUGIN}")
    with AccessControlledBroker(tmp_path / "guarded", certs) as running:
        yield running


def test_a_filter_the_broker_refuses_is_named_and_not_retriable(
    guarded: MosquittoBroker,
    certs: CertBundle,
    sessions: Callable[..., tuple[MqttSession, Inbox]],
    prefix: str,
    protocol: str,
) -> None:
    session, inbox = sessions(options_for(guarded, certs, protocol), Filters())
    session.wait_first_connection(DEADLINE_S)
    with pytest.raises(BrokerError, match="refused to subscribe 'forbidden/x/#'") as raised:
        session.subscribe([f"{prefix}/A/#", "forbidden/x/#"])
    assert not raised.value.retriable
    assert f"{prefix}/A/#" not in str(raised.value)
    # What the broker granted in the same call stands.
    publish(guarded, certs, (f"{prefix}/A/x", b"granted"))
    inbox.wait_for(b"granted")
    if protocol == "5":  # MQTT 3.1.1 UNSUBACKs carry no reason: they cannot refuse
        with pytest.raises(BrokerError, match="refused to unsubscribe 'forbidden/x/#'") as raised:
            session.unsubscribe(["forbidden/x/#"])
        assert not raised.value.retriable


def test_a_refused_filter_at_connect_stops_start_up_naming_it(
    guarded: MosquittoBroker,
    certs: CertBundle,
    sessions: Callable[..., tuple[MqttSession, Inbox]],
    prefix: str,
) -> None:
    session, _ = sessions(options_for(guarded, certs), Filters(f"{prefix}/A/#", "forbidden/y"))
    with pytest.raises(BrokerError, match="subscription to 'forbidden/y' \\(0x80") as raised:
        session.wait_first_connection(DEADLINE_S)
    assert not raised.value.retriable
    assert f"{prefix}/A/#" not in str(raised.value)


def test_an_invalid_filter_at_connect_stops_start_up_naming_it(
    broker: MosquittoBroker,
    certs: CertBundle,
    sessions: Callable[..., tuple[MqttSession, Inbox]],
    prefix: str,
) -> None:
    session, _ = sessions(options_for(broker, certs), Filters(f"{prefix}/A/#", f"{prefix}/#/B"))
    with pytest.raises(BrokerError, match="invalid topic filter") as raised:
        session.wait_first_connection(DEADLINE_S)
    assert not raised.value.retriable
    assert f"'{prefix}/#/B'" in str(raised.value)


def test_subscribe_from_the_session_thread_is_a_programming_error(
    broker: MosquittoBroker, certs: CertBundle, prefix: str
) -> None:
    errors: list[Exception] = []

    def on_message(_topic: str, _payload: bytes, _delivery: Delivery) -> None:
        try:
            session.subscribe([f"{prefix}/B/#"])
        except RuntimeError as exc:
            errors.append(exc)

    session = MqttSession(options_for(broker, certs), on_message, filters=Filters(f"{prefix}/#"))
    session.start()
    try:
        session.wait_first_connection(DEADLINE_S)
        publish(broker, certs, (f"{prefix}/A", b"x"))
        wait_until(lambda: bool(errors), "the callback's error")
        assert "another thread" in str(errors[0])
    finally:
        session.stop()


def test_subscription_identifiers_travel_with_each_message(
    tmp_path: Path,
    certs: CertBundle,
    sessions: Callable[..., tuple[MqttSession, Inbox]],
    prefix: str,
) -> None:
    """MQTT 5: the identifier a filter was subscribed with is the one the broker stamps on each
    message it routes through it; subscribing again replaces it, and a session subscribed anew
    after the broker lost it (no persistence here) gets the identifiers back."""
    identifiers = {prefix: 7}

    def identifier_of(topic_filter: str) -> int | None:
        return identifiers.get(topic_filter)

    with MosquittoBroker(tmp_path / "volatile", certs, persistence=False) as volatile:
        filters = Filters(prefix, f"{prefix}/VIN1/#")
        session, inbox = sessions(
            options_for(volatile, certs, "5"), filters, subscription_ids=identifier_of
        )
        session.wait_first_connection(DEADLINE_S)
        assert session.subscribes == 2, "one SUBSCRIBE per identifier"
        publish(volatile, certs, (prefix, b"first"), (f"{prefix}/VIN1/x/get/y", b"v1"))
        inbox.wait_for(b"v1")
        inbox.wait_for(b"first")

        identifiers[prefix] = 9
        session.subscribe([prefix])  # the same filter again: its identifier is replaced
        publish(volatile, certs, (prefix, b"second"))
        inbox.wait_for(b"second")

        identifiers[prefix] = 11
        volatile.restart()  # the session is gone: subscribed again at connect, with 11
        wait_until(lambda: session.reconnects == 1 and session.subscribed.is_set(), "resubscribe")
        publish(volatile, certs, (prefix, b"third"))
        inbox.wait_for(b"third")

    stamped = {payload: d.subscription for _, payload, d in inbox.items}
    assert stamped == {b"first": 7, b"v1": 0, b"second": 9, b"third": 11}


def test_subscription_identifiers_need_mqtt_5(broker: MosquittoBroker, certs: CertBundle) -> None:
    with pytest.raises(ValueError, match="need MQTT 5"):
        MqttSession(
            options_for(broker, certs, "3.1.1"),
            Inbox(),
            filters=Filters(),
            subscription_ids=lambda _: 1,
        )


def test_a_broker_without_subscription_identifiers_stops_the_session_with_the_fix(
    broker: MosquittoBroker, certs: CertBundle
) -> None:
    """Mosquitto supports them, so the CONNACK of a broker that does not is handed to the
    session's handler directly: the session must not go live and must say what to change."""
    session = MqttSession(
        options_for(broker, certs, "5"), Inbox(), filters=Filters(), subscription_ids=lambda _: 1
    )
    connack = Properties(PacketTypes.CONNACK)  # type: ignore[no-untyped-call]
    connack.SubscriptionIdentifierAvailable = 0
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    flags = paho.ConnectFlags(session_present=False)
    session._handle_connect(client, None, flags, ReasonCode(PacketTypes.CONNACK), connack)
    assert not session.connected.is_set()
    refusal = session._subscribe_refusal
    assert refusal is not None
    assert "does not support MQTT 5 subscription identifiers" in refusal
    assert "protocol = '3.1.1'" in refusal
