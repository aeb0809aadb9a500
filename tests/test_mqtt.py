"""MqttSession against a real Mosquitto: delivery, manual acks, persistent sessions, TLS errors."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from ingest.app import Daemon
from ingest.config import Settings
from ingest.errors import BrokerError, CredentialError
from ingest.mqtt import (
    CAUSE_SESSION_PRESENT,
    CAUSE_STOPPING,
    Delivery,
    MqttOptions,
    ReceiveSession,
    is_connection_loss,
    probe_tls12,
)
from ingest.mqtt_native import NativeMqttSession, make_session
from ingest.testing import CertBundle, MosquittoBroker, Publisher, publish_lines
from ingest.testing.broker import free_port
from ingest.testing.daemon import (
    APP_ID,
    DaemonProcess,
    daemon_config,
    wait_for,
    wait_ready,
    write_toml,
)
from ingest.testing.traffic import stream
from tests.daemon_support import message_ids

DEADLINE_S = 15.0
# An MQTT 3.1.1 CONNECT: protocol "MQTT" level 4, flags 0x02 (clean session), keepalive 30 s,
# client id "" (allowed with clean session [MQTT-3.1.3-7]).
RAW_CONNECT = bytes([0x10, 12, 0, 4]) + b"MQTT" + bytes([4, 0x02, 0, 30, 0, 0])
CONNACK_ACCEPTED = bytes([0x20, 2, 0, 0])


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.01)


class Inbox:
    """Collects deliveries; optionally acks each one as it arrives (like a pipeline would later)."""

    def __init__(self) -> None:
        self.items: list[tuple[str, bytes, Delivery]] = []
        self._lock = threading.Lock()
        self.auto_ack: ReceiveSession | None = None
        self.ack_results: list[bool] = []

    def __call__(self, topic: str, payload: bytes, delivery: Delivery) -> None:
        with self._lock:
            self.items.append((topic, payload, delivery))
        if self.auto_ack is not None:
            self.ack_results.append(self.auto_ack.ack(delivery))

    def payloads(self) -> list[bytes]:
        with self._lock:
            return [p for _, p, _ in self.items]

    def wait_for(self, payload: bytes) -> Delivery:
        wait_until(lambda: payload in self.payloads(), f"payload {payload!r}")
        with self._lock:
            return next(d for _, p, d in self.items if p == payload)


# Every session test runs against paho (both protocols) and the native 3.1.1 client.
@pytest.fixture(params=["paho-3.1.1", "paho-5", "native-3.1.1"])
def flavour(request: pytest.FixtureRequest) -> tuple[str, str]:
    client, protocol = str(request.param).split("-")
    return client, protocol


@pytest.fixture
def protocol(flavour: tuple[str, str]) -> str:
    return flavour[1]


@pytest.fixture
def client(flavour: tuple[str, str]) -> str:
    return flavour[0]


@pytest.fixture
def prefix() -> str:
    return f"test/{uuid.uuid4().hex[:10]}"


@pytest.fixture
def make_options(
    broker: MosquittoBroker, certs: CertBundle, protocol: str, prefix: str
) -> Callable[..., MqttOptions]:
    client_id = f"ingest-{uuid.uuid4().hex[:10]}"

    def make(**overrides: Any) -> MqttOptions:
        base = MqttOptions(
            host=broker.host,
            port=broker.port,
            client_id=client_id,
            topic=f"{prefix}/#",
            ca_file=certs.ca_file,
            cert_file=certs.client_cert,
            key_file=certs.client_key,
            protocol=protocol,  # type: ignore[arg-type]
            reconnect_min_s=0.05,
            reconnect_max_s=0.5,
        )
        return dataclasses.replace(base, **overrides)

    return make


@pytest.fixture
def sessions(client: str) -> Iterator[Callable[..., ReceiveSession]]:
    """Creates sessions and stops every one of them after the test."""
    made: list[ReceiveSession] = []

    def make(options: MqttOptions, inbox: Inbox, *, start: bool = True) -> ReceiveSession:
        session = make_session(options, inbox, client=client)
        made.append(session)
        if start:
            session.start()
        return session

    yield make
    for session in made:
        session.stop()


def publish(broker: MosquittoBroker, certs: CertBundle, topic: str, payloads: list[bytes]) -> None:
    publish_lines(broker, certs, [(topic, p) for p in payloads])


def test_receives_published_qos1_messages_in_order(
    broker: MosquittoBroker,
    certs: CertBundle,
    make_options: Callable[..., MqttOptions],
    sessions: Callable[..., ReceiveSession],
    prefix: str,
) -> None:
    inbox = Inbox()
    session = sessions(make_options(), inbox)
    # Acking as messages arrive matters: Mosquitto sends at most max_inflight_messages (20)
    # unacknowledged PUBLISHes, so a consumer waiting for all 50 before acking would stall.
    inbox.auto_ack = session
    session.wait_first_connection(DEADLINE_S)
    assert session.session_present is False
    assert session.subscribes == 1

    payloads = [f"m{i}".encode() for i in range(50)]
    publish(broker, certs, f"{prefix}/a", payloads)
    wait_until(lambda: len(inbox.items) == len(payloads), "50 messages")

    assert inbox.payloads() == payloads  # one topic, QoS 1: broker keeps order [MQTT-4.6.0-5]
    assert {t for t, _, _ in inbox.items} == {f"{prefix}/a"}
    assert all(d.qos == 1 and d.generation == 1 for _, _, d in inbox.items)
    assert inbox.ack_results == [True] * 50


def test_binary_payloads_and_many_topics_via_paho_publisher(
    broker: MosquittoBroker,
    certs: CertBundle,
    make_options: Callable[..., MqttOptions],
    sessions: Callable[..., ReceiveSession],
    prefix: str,
) -> None:
    inbox = Inbox()
    session = sessions(make_options(), inbox)
    inbox.auto_ack = session
    session.wait_first_connection(DEADLINE_S)
    sent = [(f"{prefix}/vin{i}/odometer", bytes([i, 10, 0, 255])) for i in range(20)]
    with Publisher(broker, certs) as pub:
        assert pub.publish_many(sent) == 20
    wait_until(lambda: len(inbox.items) == 20, "20 messages")
    assert sorted((t, p) for t, p, _ in inbox.items) == sorted(sent)
    assert all(isinstance(p, bytes) for p in inbox.payloads())


def test_unacked_messages_are_redelivered_to_the_same_client_id_and_acked_ones_are_not(
    broker: MosquittoBroker,
    certs: CertBundle,
    make_options: Callable[..., MqttOptions],
    sessions: Callable[..., ReceiveSession],
    prefix: str,
) -> None:
    options = make_options()
    first_inbox = Inbox()
    first = sessions(options, first_inbox)
    first.wait_first_connection(DEADLINE_S)
    payloads = [f"m{i}".encode() for i in range(10)]
    publish(broker, certs, f"{prefix}/a", payloads)
    wait_until(lambda: len(first_inbox.items) == 10, "10 messages")
    for _, _, delivery in first_inbox.items[:5]:
        assert first.ack(delivery)
    first.stop()  # DISCONNECT is queued behind the five PUBACKs

    second_inbox = Inbox()
    second = sessions(options, second_inbox)
    second.wait_first_connection(DEADLINE_S)
    assert second.session_present is True
    # Redeliveries come first on reconnect [MQTT-4.4.0-1]; a marker published now comes after
    # them, so once it arrives nothing else is on its way.
    publish(broker, certs, f"{prefix}/a", [b"marker"])
    second_inbox.wait_for(b"marker")
    assert second_inbox.payloads() == [*payloads[5:], b"marker"]


def test_session_present_skips_subscribe(
    broker: MosquittoBroker,
    certs: CertBundle,
    make_options: Callable[..., MqttOptions],
    sessions: Callable[..., ReceiveSession],
    prefix: str,
) -> None:
    options = make_options()
    first = sessions(options, Inbox())
    first.wait_first_connection(DEADLINE_S)
    assert first.subscribes == 1
    first.stop()

    inbox = Inbox()
    second = sessions(options, inbox)
    second.wait_first_connection(DEADLINE_S)
    assert second.session_present is True
    assert second.subscribes == 0  # the broker kept the subscription with the session
    publish(broker, certs, f"{prefix}/b", [b"still subscribed"])
    inbox.wait_for(b"still subscribed")


def test_no_session_on_reconnect_resubscribes(
    tmp_path: Path,
    certs: CertBundle,
    make_options: Callable[..., MqttOptions],
    sessions: Callable[..., ReceiveSession],
    prefix: str,
) -> None:
    with MosquittoBroker(tmp_path / "volatile", certs, persistence=False) as volatile:
        inbox = Inbox()
        session = sessions(make_options(port=volatile.port), inbox)
        session.wait_first_connection(DEADLINE_S)
        assert session.subscribes == 1

        volatile.restart()  # no persistence: the session and its subscription are gone
        wait_until(lambda: session.reconnects == 1 and session.subscribed.is_set(), "resubscribe")
        assert session.session_present is False
        assert session.subscribes == 2
        publish(volatile, certs, f"{prefix}/c", [b"after resubscribe"])
        inbox.wait_for(b"after resubscribe")


def test_ack_from_an_older_connection_is_refused(
    broker: MosquittoBroker,
    certs: CertBundle,
    make_options: Callable[..., MqttOptions],
    sessions: Callable[..., ReceiveSession],
    prefix: str,
) -> None:
    inbox = Inbox()
    session = sessions(make_options(), inbox)
    session.wait_first_connection(DEADLINE_S)
    publish(broker, certs, f"{prefix}/a", [b"one"])
    old = inbox.wait_for(b"one")
    assert old.generation == 1

    broker.restart()  # SIGTERM saves the session with "one" still in flight
    wait_until(lambda: len(inbox.items) == 2, "redelivery after reconnect")
    _, payload, new = inbox.items[1]
    assert payload == b"one"
    assert new.generation == 2
    assert session.session_present is True

    assert session.ack(old) is False  # its mid may name another message on this connection
    assert session.ack(new) is True
    assert session.ack(Delivery(generation=new.generation, mid=new.mid, qos=0)) is False


def test_ack_after_stop_is_refused(
    broker: MosquittoBroker,
    certs: CertBundle,
    make_options: Callable[..., MqttOptions],
    sessions: Callable[..., ReceiveSession],
    prefix: str,
) -> None:
    inbox = Inbox()
    session = sessions(make_options(), inbox)
    session.wait_first_connection(DEADLINE_S)
    publish(broker, certs, f"{prefix}/a", [b"x"])
    delivery = inbox.wait_for(b"x")
    session.stop()
    assert not session.connected.is_set()
    assert session.ack(delivery) is False


def raw_connect(
    broker: MosquittoBroker,
    certs: CertBundle,
    cert: Path | None,
    key: Path | None,
    max_tls: ssl.TLSVersion | None = None,
) -> bytes | str:
    """TLS handshake plus an MQTT CONNECT; the broker's first 4 bytes, or why it failed."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(certs.ca_file)
    if max_tls is not None:
        ctx.maximum_version = max_tls
    if cert is not None and key is not None:
        ctx.load_cert_chain(cert, key)
    try:
        with (
            socket.create_connection((broker.host, broker.port), timeout=5) as raw,
            ctx.wrap_socket(raw, server_hostname=broker.host) as tls,
        ):
            tls.sendall(RAW_CONNECT)
            return tls.recv(4)
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"


@pytest.mark.parametrize("max_tls", [None, ssl.TLSVersion.TLSv1_2], ids=["tls1.3", "tls1.2"])
def test_broker_refuses_clients_without_a_certificate_it_trusts(
    broker: MosquittoBroker, certs: CertBundle, max_tls: ssl.TLSVersion | None
) -> None:
    # The control: the same path with the right certificate gets a CONNACK "accepted".
    assert raw_connect(broker, certs, certs.client_cert, certs.client_key, max_tls) == (
        CONNACK_ACCEPTED
    )
    refused = {
        "no certificate": raw_connect(broker, certs, None, None, max_tls),
        "other CA": raw_connect(
            broker, certs, certs.other_client_cert, certs.other_client_key, max_tls
        ),
        "expired": raw_connect(
            broker, certs, certs.expired_client_cert, certs.expired_client_key, max_tls
        ),
    }
    for case, answer in refused.items():
        assert answer in (b"",) or isinstance(answer, str), f"{case}: broker answered {answer!r}"


def test_wrong_ca_file_fails_start_up_naming_the_file(
    make_options: Callable[..., MqttOptions],
    sessions: Callable[..., ReceiveSession],
    certs: CertBundle,
) -> None:
    session = sessions(make_options(ca_file=certs.other_ca_file), Inbox())
    with pytest.raises(CredentialError, match="server certificate not trusted by") as info:
        session.wait_first_connection(DEADLINE_S)
    assert str(certs.other_ca_file) in str(info.value)
    assert not session.connected.is_set()


def test_expired_client_certificate_fails_start_up(
    make_options: Callable[..., MqttOptions],
    sessions: Callable[..., ReceiveSession],
    certs: CertBundle,
) -> None:
    options = make_options(cert_file=certs.expired_client_cert, key_file=certs.expired_client_key)
    session = sessions(options, Inbox())
    with pytest.raises(CredentialError, match="expired") as info:
        session.wait_first_connection(DEADLINE_S)
    assert str(certs.expired_client_cert) in str(info.value)


def test_client_certificate_from_another_ca_fails_start_up(
    make_options: Callable[..., MqttOptions],
    sessions: Callable[..., ReceiveSession],
    certs: CertBundle,
) -> None:
    options = make_options(cert_file=certs.other_client_cert, key_file=certs.other_client_key)
    session = sessions(options, Inbox())
    with pytest.raises(CredentialError, match="not signed by a CA the broker trusts"):
        session.wait_first_connection(DEADLINE_S)


def test_key_that_does_not_match_the_certificate_fails_at_start(
    make_options: Callable[..., MqttOptions],
    sessions: Callable[..., ReceiveSession],
    certs: CertBundle,
) -> None:
    session = sessions(make_options(key_file=certs.other_client_key), Inbox(), start=False)
    with pytest.raises(CredentialError, match="does not match certificate"):
        session.start()


@pytest.mark.parametrize("verify_hostname", [True, False])
def test_hostname_mismatch(
    tmp_path: Path,
    certs: CertBundle,
    make_options: Callable[..., MqttOptions],
    sessions: Callable[..., ReceiveSession],
    verify_hostname: bool,
) -> None:
    with MosquittoBroker(
        tmp_path / "wrong-host",
        certs,
        server_cert=certs.wrong_host_server_cert,
        server_key=certs.wrong_host_server_key,
    ) as wrong:
        options = make_options(port=wrong.port, verify_hostname=verify_hostname)
        session = sessions(options, Inbox())
        if verify_hostname:
            with pytest.raises(CredentialError, match="hostname mismatch"):
                session.wait_first_connection(DEADLINE_S)
        else:
            session.wait_first_connection(DEADLINE_S)  # the CA still vouches for the broker


def test_unreachable_broker_times_out_with_a_retriable_error(
    make_options: Callable[..., MqttOptions],
    sessions: Callable[..., ReceiveSession],
) -> None:
    session = sessions(make_options(port=free_port()), Inbox())
    with pytest.raises(BrokerError, match="ConnectionRefusedError") as info:
        session.wait_first_connection(1.0)
    assert info.value.retriable
    started = time.monotonic()
    session.stop(timeout_s=5.0)  # interrupts the backoff wait
    assert time.monotonic() - started < 2.0


def test_delivery_resumes_after_broker_crash_and_restart(
    client: str,
    broker: MosquittoBroker,
    certs: CertBundle,
    make_options: Callable[..., MqttOptions],
    sessions: Callable[..., ReceiveSession],
    prefix: str,
) -> None:
    states: list[tuple[str, str]] = []
    inbox = Inbox()
    session = make_session(
        make_options(), inbox, on_state=lambda s, d: states.append((s, d)), client=client
    )
    inbox.auto_ack = session
    session.start()
    try:
        session.wait_first_connection(DEADLINE_S)
        publish(broker, certs, f"{prefix}/a", [b"before"])
        inbox.wait_for(b"before")

        broker.kill()
        wait_until(lambda: not session.connected.is_set(), "disconnect noticed")
        broker.restart()
        # Whether the session survived depends on the last autosave; either way we subscribe.
        wait_until(session.subscribed.is_set, "reconnect and subscription")
        publish(broker, certs, f"{prefix}/a", [b"after"])
        inbox.wait_for(b"after")
        assert session.reconnects == 1
        assert ("connected", "no_session") in states
        assert ("disconnected", "connection_lost") in states
        assert [s for s, _ in states].count("connected") == 2
    finally:
        session.stop()
    assert states[-2:] == [("disconnected", "stopping"), ("stopped", "")]


def test_stop_while_connected_is_prompt_and_joins_the_thread(
    make_options: Callable[..., MqttOptions],
    sessions: Callable[..., ReceiveSession],
) -> None:
    session = sessions(make_options(), Inbox())
    session.wait_first_connection(DEADLINE_S)
    started = time.monotonic()
    session.stop()
    assert time.monotonic() - started < 1.0  # woken through paho's socket pair, not a timeout
    assert not session.connected.is_set()
    assert session._thread is not None
    assert not session._thread.is_alive()


def test_tls12_probe_names_why_the_broker_hangs_up(
    make_options: Callable[..., MqttOptions], certs: CertBundle
) -> None:
    # Used when a TLS 1.3 rejection reaches paho as a bare EOF, with no alert to classify.
    assert probe_tls12(make_options()) is None
    foreign = probe_tls12(
        make_options(cert_file=certs.other_client_cert, key_file=certs.other_client_key)
    )
    assert isinstance(foreign, CredentialError)
    assert str(certs.other_client_cert) in str(foreign)
    expired = probe_tls12(
        make_options(cert_file=certs.expired_client_cert, key_file=certs.expired_client_key)
    )
    assert isinstance(expired, CredentialError)
    assert "expired" in str(expired)


# -- the daemon's session metrics (fed by on_state) ------------------------------------------------


def test_only_an_unplanned_disconnect_counts_as_a_connection_loss() -> None:
    assert is_connection_loss("disconnected", "connection_lost")
    assert is_connection_loss("disconnected", "server_disconnect")
    assert not is_connection_loss("disconnected", CAUSE_STOPPING)
    assert not is_connection_loss("connected", CAUSE_SESSION_PRESENT)


async def test_daemon_reports_session_present_and_no_reconnect_for_a_clean_stop(
    broker: MosquittoBroker, certs: CertBundle, tmp_path: Path
) -> None:
    settings = Settings.model_validate(daemon_config(broker, certs, tmp_path))

    async def one_run() -> CollectorRegistry:
        registry = CollectorRegistry()
        daemon = Daemon(settings, registry=registry)
        task = asyncio.create_task(daemon.run())
        try:
            await asyncio.wait_for(daemon.started.wait(), DEADLINE_S)
            assert registry.get_sample_value("hm_ingest_mqtt_connected") == 1
        finally:
            daemon.shutdown.set()
        assert await asyncio.wait_for(task, DEADLINE_S) == 0
        return registry

    first = await one_run()
    assert first.get_sample_value("hm_ingest_mqtt_session_present") == 0  # a new session
    second = await one_run()
    assert second.get_sample_value("hm_ingest_mqtt_session_present") == 1  # kept by the broker
    for registry in (first, second):
        assert registry.get_sample_value("hm_ingest_mqtt_connected") == 0
        reconnects = [
            s
            for metric in registry.collect()
            if metric.name == "hm_ingest_mqtt_reconnects"
            for s in metric.samples
            if s.name == "hm_ingest_mqtt_reconnects_total"
        ]
        assert reconnects == [], f"a clean stop counted as a reconnect: {reconnects}"


def test_keepalive_pings_hold_an_idle_connection(
    make_options: Callable[..., MqttOptions],
    sessions: Callable[..., ReceiveSession],
    broker: MosquittoBroker,
    certs: CertBundle,
    prefix: str,
) -> None:
    # Mosquitto drops a client that sends nothing for 1.5 keep-alive intervals.
    inbox = Inbox()
    session = sessions(make_options(keepalive_s=1.0), inbox)
    session.wait_first_connection(DEADLINE_S)
    time.sleep(3.5)
    assert session.connected.is_set()
    assert session.reconnects == 0
    publish(broker, certs, f"{prefix}/idle", [b"still there"])
    inbox.wait_for(b"still there")


# -- each client through the daemon ----------------------------------------------------------------


# The rest of the daemon-level suite runs the default (auto: native for 3.1.1); this one runs
# both clients and paho under MQTT 5, which auto picks for protocol 5.
@pytest.mark.parametrize(
    ("client", "protocol", "banner"),
    [
        ("native", "3.1.1", "MQTT 3.1.1 native"),
        ("paho", "3.1.1", "(MQTT 3.1.1, generation"),
        ("auto", "5", "(MQTT 5, generation"),
    ],
)
def test_daemon_sigkill_mid_stream_loses_and_duplicates_nothing(
    broker: MosquittoBroker,
    certs: CertBundle,
    tmp_path: Path,
    client: str,
    protocol: str,
    banner: str,
) -> None:
    # PUBACKs only after the log write: a daemon killed at any moment loses nothing, and what the
    # broker redelivers is deduplicated.
    messages = list(stream(APP_ID, 6000, seed=21))
    tree = daemon_config(
        broker,
        certs,
        tmp_path,
        overrides={
            "output": {"flush_age_s": 0.3},
            "mqtt": {"client": client, "protocol": protocol},
        },
    )
    daemon = DaemonProcess(write_toml(tree, tmp_path / "c.toml"), tmp_path / "daemon.log")
    daemon.start()
    wait_ready(tree)
    publisher = Publisher(broker, certs, timeout_s=300)
    publisher.connect()
    try:
        for start in range(0, len(messages), 1500):
            publisher.publish_many((m.topic, m.payload) for m in messages[start : start + 1500])
            time.sleep(0.3)
            daemon.kill()  # mid-receive, mid-log or mid-commit
            daemon.start()
        expected = {m.message_id for m in messages}
        output = tmp_path / "data"
        wait_for(lambda: set(message_ids(output)) >= expected, 120, "every message committed")
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(60) == 0, daemon.log_text()[-3000:]
    finally:
        publisher.close()
        daemon.kill()
    counts = message_ids(output)
    assert set(counts) == expected
    assert max(counts.values()) == 1, "a message was written twice"
    assert banner in daemon.log_text()


@pytest.mark.parametrize("flavour", [("native", "3.1.1")])
def test_native_session_stops_reading_while_the_consumer_is_full(
    broker: MosquittoBroker,
    certs: CertBundle,
    make_options: Callable[..., MqttOptions],
    prefix: str,
) -> None:
    full = threading.Event()
    full.set()
    inbox = Inbox()
    session = NativeMqttSession(make_options(), inbox, pause_reading=full.is_set)
    inbox.auto_ack = session
    session.start()
    try:
        session.wait_first_connection(DEADLINE_S)  # CONNACK and SUBACK are read regardless
        publish(broker, certs, f"{prefix}/p", [b"held back"])
        time.sleep(1.0)
        assert inbox.payloads() == [], "read while the consumer said it was full"
        full.clear()
        inbox.wait_for(b"held back")
        assert session.reconnects == 0
    finally:
        session.stop()


def test_stop_under_a_stream_ends_with_a_clean_disconnect(
    broker: MosquittoBroker,
    certs: CertBundle,
    make_options: Callable[..., MqttOptions],
    sessions: Callable[..., ReceiveSession],
    prefix: str,
) -> None:
    """Stopped while the broker is still sending, the session's DISCONNECT reaches the broker.

    Closing a socket that holds unread bytes makes the kernel reset the connection, and a reset
    discards what the broker has not read yet: the DISCONNECT and the last PUBACKs. Mosquitto
    then logs the TLS read failure as "disconnected: Protocol error" and redelivers the
    messages whose PUBACKs it lost to the session's next holder.
    """
    options = make_options()
    inbox = Inbox()
    session = sessions(options, inbox)
    inbox.auto_ack = session
    session.wait_first_connection(DEADLINE_S)
    flooding = threading.Event()
    flooding.set()

    def flood() -> None:
        with Publisher(broker, certs) as publisher:
            batch = [(f"{prefix}/flood", b"x" * 500)] * 200
            while flooding.is_set():
                publisher.publish_many(batch)

    publisher_thread = threading.Thread(target=flood, daemon=True)
    publisher_thread.start()
    assert broker.pid is not None
    try:
        wait_until(lambda: len(inbox.payloads()) >= 2000, "the stream to reach the session")
        # A broker too busy to read at once (as under a fleet's load): the session's last
        # PUBACKs, its DISCONNECT and how it closes all arrive before the broker reads them.
        stopping = threading.Thread(target=session.stop)
        os.kill(broker.pid, signal.SIGSTOP)
        try:
            stopping.start()
            time.sleep(0.2)
        finally:
            os.kill(broker.pid, signal.SIGCONT)
        stopping.join(DEADLINE_S)
    finally:
        flooding.clear()
        publisher_thread.join(DEADLINE_S)
    ended = f"Client {options.client_id} disconnected"
    wait_until(lambda: ended in broker.log_text(), "the broker to log the session's end")
    lines = [line for line in broker.log_text().splitlines() if ended in line]
    assert lines[-1].endswith(f"{ended}."), lines[-1]
