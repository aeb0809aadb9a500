"""Adopting a lost replica's session, against a real mutual-TLS Mosquitto.

The "lost replica" is a paho client that joins the shared subscription with a persistent session
and goes away; messages published meanwhile are queued in its session. The adopter must hand every
one of them to the pipeline, record its key before acknowledging it, and leave no session behind.
"""

from __future__ import annotations

import ssl
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ingest.errors import BrokerError
from ingest.mqtt import Delivery, MqttOptions
from ingest.replica.adopt import SessionAdopter, message_key_function
from ingest.testing.broker import MosquittoBroker
from ingest.testing.certs import CertBundle
from ingest.testing.daemon import APP_ID
from ingest.testing.publish import Publisher
from ingest.testing.traffic import stream

SHARED = f"$share/g/live/level13/{APP_ID}/#"


def _options(broker: MosquittoBroker, certs: CertBundle, protocol: str) -> MqttOptions:
    return MqttOptions(
        host=broker.host,
        port=broker.port,
        client_id="lost-replica",
        topic=SHARED,
        ca_file=certs.ca_file,
        cert_file=certs.client_cert,
        key_file=certs.client_key,
        protocol=protocol,  # type: ignore[arg-type]
    )


def _client(
    options: MqttOptions, *, clean: bool
) -> tuple[paho.Client, threading.Event, list[bool]]:
    v5 = options.protocol == "5"
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=options.client_id,
        clean_session=None if v5 else clean,
        protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
    )
    ctx = ssl.create_default_context(cafile=str(options.ca_file))
    ctx.load_cert_chain(str(options.cert_file), str(options.key_file))
    client.tls_set_context(ctx)
    connected = threading.Event()
    present: list[bool] = []

    def on_connect(_c: object, _u: object, flags: paho.ConnectFlags, *_: object) -> None:
        present.append(flags.session_present)
        connected.set()

    client.on_connect = on_connect
    return client, connected, present


def _connect(client: paho.Client, options: MqttOptions, *, clean: bool) -> None:
    if options.protocol == "5":
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 0 if clean else 3600
        client.connect(options.host, options.port, clean_start=clean, properties=props)
    else:
        client.connect(options.host, options.port)


def _leave_a_session(options: MqttOptions, identifier: int | None = None) -> None:
    """Join the shared subscription with a persistent session (MQTT 5: with ``identifier`` as
    its subscription identifier), then disconnect."""
    client, connected, _ = _client(options, clean=False)
    _connect(client, options, clean=False)
    client.loop_start()
    assert connected.wait(10)
    subscribed = threading.Event()
    client.on_subscribe = lambda *_args: subscribed.set()
    properties = None
    if identifier is not None:
        properties = Properties(PacketTypes.SUBSCRIBE)
        properties.SubscriptionIdentifier = identifier
    client.subscribe(options.topic, qos=1, properties=properties)
    assert subscribed.wait(10)
    client.disconnect()
    client.loop_stop()


def _session_left(options: MqttOptions) -> bool:
    client, connected, present = _client(options, clean=False)
    _connect(client, options, clean=False)
    client.loop_start()
    assert connected.wait(10)
    client.disconnect()
    client.loop_stop()
    # That look created a session (clean off) of its own: remove it so the broker stays tidy.
    wipe, wiped, _ = _client(options, clean=True)
    _connect(wipe, options, clean=True)
    wipe.loop_start()
    assert wiped.wait(10)
    wipe.disconnect()
    wipe.loop_stop()
    return present[0]


class Pipeline:
    """Stands in for intake: 'logs' each message and acks it from another thread, in order."""

    def __init__(self) -> None:
        self.received: list[tuple[str, bytes]] = []
        self.subscriptions: set[int] = set()  # the deliveries' subscription identifiers
        self.recorded: list[str] = []
        self.acked_after_record = True
        self.adopter: SessionAdopter | None = None

    def submit(self, topic: str, payload: bytes, delivery: Delivery) -> None:
        assert delivery.channel == 7
        self.received.append((topic, payload))
        self.subscriptions.add(delivery.subscription)
        adopter = self.adopter
        assert adopter is not None
        threading.Timer(0.01, adopter.ack, (delivery,)).start()

    def record(self, keys: list[str]) -> None:
        self.recorded.extend(keys)


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_adopter_takes_every_queued_message_records_its_key_and_deletes_the_session(
    broker: MosquittoBroker, certs: CertBundle, protocol: str
) -> None:
    options = _options(broker, certs, protocol)
    # MQTT 5: the lost session subscribed with an identifier (a VIN-sharded replica's envelope
    # rule); each delivery must carry it, so intake judges the envelope by that rule.
    identifier = 16385 if protocol == "5" else None
    _leave_a_session(options, identifier)
    messages = list(stream(APP_ID, 300, vehicles=40, seed=3))
    with Publisher(broker, certs) as publisher:
        publisher.publish_many([(m.topic, m.payload) for m in messages])

    pipeline = Pipeline()
    adopter = SessionAdopter(
        options,
        replica="lost",
        channel=7,
        submit=pipeline.submit,
        key_of=message_key_function(APP_ID, 1 << 20),
        record_keys=pipeline.record,
        keep_claim=lambda: True,
        quiet_s=0.5,
    )
    pipeline.adopter = adopter
    report = adopter.run()

    assert report.session_present
    assert report.messages == 300
    assert sorted(p for _, p in pipeline.received) == sorted(m.payload for m in messages)
    assert pipeline.subscriptions == {identifier or 0}
    # The sink keys V1/V2 messages by message_id: those are what a returning replica skips.
    assert sorted(pipeline.recorded) == sorted(m.message_id for m in messages)
    assert not _session_left(options)
    # Nothing was left queued either: a new member of the group gets only new messages.


def test_adopting_a_session_that_is_gone_finds_nothing(
    broker: MosquittoBroker, certs: CertBundle
) -> None:
    options = _options(broker, certs, "3.1.1")
    adopter = SessionAdopter(
        options,
        replica="never-was",
        channel=1,
        submit=lambda *_: pytest.fail("no message expected"),
        key_of=message_key_function(APP_ID, 1 << 20),
        record_keys=lambda _keys: None,
        keep_claim=lambda: True,
    )
    report = adopter.run()
    assert not report.session_present
    assert report.messages == 0


def test_losing_the_drain_claim_stops_the_adoption_and_keeps_the_session(
    broker: MosquittoBroker, certs: CertBundle
) -> None:
    options = _options(broker, certs, "3.1.1")
    _leave_a_session(options)
    with Publisher(broker, certs) as publisher:
        publisher.publish_many([(m.topic, m.payload) for m in stream(APP_ID, 20, seed=5)])
    adopter = SessionAdopter(
        options,
        replica="lost",
        channel=1,
        submit=lambda *_: None,  # never acked: the claim check comes first
        key_of=message_key_function(APP_ID, 1 << 20),
        record_keys=lambda _keys: None,
        keep_claim=lambda: False,
    )
    started = time.monotonic()
    with pytest.raises(BrokerError, match="drain claim on replica lost lost"):
        adopter.run()
    assert time.monotonic() - started < 10
    # The unacknowledged messages are still the lost replica's: its session was not deleted.
    assert _session_left(options)


def test_key_of_matches_the_sink_for_a_payload_without_message_id(tmp_path: Path) -> None:
    del tmp_path
    key_of = message_key_function(APP_ID, 1 << 20)
    key = key_of(f"live/level13/{APP_ID}/X/diagnostics/get/odometer", b"not json")
    assert key.startswith("content:")
    assert key == key_of(f"live/level13/{APP_ID}/X/diagnostics/get/odometer", b"not json")
