"""What the broker offers, asked over one short connection: ``hm-ingest check --broker``.

Which way replicas can split the stream depends on the broker: shared subscriptions (``[replica]
mode = "shared"``) and, for spreading V2 envelopes by VIN (``mode = "vin"``), MQTT 5 with
subscription identifiers. For HM's broker neither is confirmed, so this asks it: an MQTT 5
CONNECT (its CONNACK announces the optional features), then a SUBSCRIBE of the configured topic
(does the ACL let this client read it?) and of the same topic as a shared subscription (the only
sure test: the broker may refuse it although the CONNACK is silent). A broker that refuses MQTT
5 is asked again over MQTT 3.1.1, for the subscriptions.

Harmless next to running daemons: its own client id (``<client_id>-check``), clean start and no
session expiry, so nothing stays on the broker; QoS 0 subscriptions, so it holds nothing the
broker waits for; the shared subscription in a group of its own, so it takes no message from the
daemons' group; it disconnects as soon as the answers are in.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from ingest.config import Settings
from ingest.errors import BrokerError, IngestError
from ingest.mqtt import MqttOptions, classify_tls_failure, manual_ack_client, tls_context
from ingest.preflight import Finding, Level
from ingest.session_options import mqtt_options

# The suffix of the probe's client id: never the daemon's own, whose session it would take over.
CLIENT_ID_SUFFIX = "-check"
# CONNACK reason of a broker that speaks MQTT 3.1.1 only.
UNSUPPORTED_PROTOCOL_VERSION = 0x84
# The CONNACK properties worth reporting: (paho's name, what it means, its value when absent).
CONNACK_FEATURES = (
    ("SharedSubscriptionAvailable", "shared subscriptions", 1),
    ("SubscriptionIdentifierAvailable", "subscription identifiers", 1),
    ("WildcardSubscriptionAvailable", "wildcard subscriptions", 1),
)
LOOP_SLICE_S = 0.05

MqttVersion = Literal["3.1.1", "5"]


@dataclass(frozen=True, slots=True)
class Subscription:
    """A SUBSCRIBE's outcome: granted, or the broker's reason for refusing it."""

    topic_filter: str
    granted: bool
    reason: str


@dataclass(frozen=True, slots=True)
class BrokerReport:
    protocol: MqttVersion  # "5", or "3.1.1" when the broker refused MQTT 5
    client_id: str
    # CONNACK's announcements (MQTT 5): feature → available, and its Maximum QoS (2 if absent).
    features: dict[str, bool] = field(default_factory=dict)
    maximum_qos: int = 2
    subscriptions: tuple[Subscription, ...] = ()

    @property
    def topic(self) -> Subscription:
        return self.subscriptions[0]

    @property
    def shared(self) -> Subscription:
        return self.subscriptions[1]


def probe_broker(options: MqttOptions, *, timeout_s: float = 10.0) -> BrokerReport:
    """Connect, subscribe ``options.topic`` plainly and shared, disconnect; raises BrokerError
    (or CredentialError) when it cannot connect, naming why."""
    probe = replace(options, client_id=options.client_id + CLIENT_ID_SUFFIX)
    group = f"hm-ingest-check-{secrets.token_hex(4)}"
    filters = [probe.topic, f"$share/{group}/{probe.topic}"]
    try:
        return _Probe(probe, "5", timeout_s).run(filters)
    except _Mqtt5Refused:
        return _Probe(probe, "3.1.1", timeout_s).run(filters)


class _Mqtt5Refused(Exception):
    pass


class _Probe:
    """One connection's worth of questions, answered on the caller's thread (paho's loop())."""

    def __init__(self, options: MqttOptions, protocol: MqttVersion, timeout_s: float) -> None:
        self._options = options
        self._protocol = protocol
        self._deadline = time.monotonic() + timeout_s
        self._connack: tuple[ReasonCode, Properties | None] | None = None
        self._subacks: dict[int, list[ReasonCode]] = {}
        self._closed = False  # the broker hung up

    def run(self, filters: Sequence[str]) -> BrokerReport:
        options = replace(self._options, protocol=self._protocol)
        v5 = self._protocol == "5"
        # Clean: MQTT 3.1.1's flag here, MQTT 5's clean start at the first connect (paho's
        # default); its QoS 0 subscriptions leave nothing to acknowledge.
        client = manual_ack_client(options, tls_context(options), clean=True)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        properties = None
        if v5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = 0  # nothing stays on the broker
        try:
            client.connect(options.host, options.port, keepalive=30, properties=properties)
        except (OSError, ValueError) as exc:
            raise classify_tls_failure(options, exc, "") or BrokerError(
                f"cannot connect to {options.host}:{options.port}: {exc}", retriable=True
            ) from exc
        try:
            connack = self._await_connack(client)
            mids = [self._subscribe(client, f) for f in filters]
            acks = [self._await_suback(client, mid) for mid in mids]
        finally:
            client.disconnect()
            client.loop(LOOP_SLICE_S)
        return BrokerReport(
            protocol=self._protocol,
            client_id=options.client_id,
            features=_features(connack),
            maximum_qos=int(getattr(connack, "MaximumQoS", 2)),
            subscriptions=tuple(
                Subscription(f, not ack.is_failure, str(ack))
                for f, ack in zip(filters, acks, strict=True)
            ),
        )

    def _subscribe(self, client: paho.Client, topic_filter: str) -> int:
        rc, mid = client.subscribe(topic_filter, qos=0)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise BrokerError(
                f"the connection closed before the SUBSCRIBE of {topic_filter!r} went out "
                f"({paho.error_string(rc)})",
                retriable=True,
            )
        return mid

    def _await_connack(self, client: paho.Client) -> Properties | None:
        try:
            self._loop_until(client, lambda: self._connack is not None, "CONNACK")
        except BrokerError:
            if self._protocol == "5" and self._closed:
                # Some 3.1.1-only brokers hang up on an MQTT 5 CONNECT instead of answering.
                raise _Mqtt5Refused from None
            raise
        assert self._connack is not None
        reason, connack = self._connack
        if reason.is_failure:
            if reason.value == UNSUPPORTED_PROTOCOL_VERSION and self._protocol == "5":
                raise _Mqtt5Refused
            raise BrokerError(
                f"the broker refused the connection of client id {self._options.client_id!r}: "
                f"CONNACK {reason.value:#04x} ({reason}); HM's broker may accept only the "
                "certificate's own client id, which the check does not use so as not to take "
                "over a running daemon's session",
                retriable=False,
            )
        return connack

    def _await_suback(self, client: paho.Client, mid: int) -> ReasonCode:
        self._loop_until(client, lambda: mid in self._subacks, f"SUBACK of packet {mid}")
        return self._subacks[mid][0]

    def _loop_until(self, client: paho.Client, done: Callable[[], bool], what: str) -> None:
        while not done():
            if time.monotonic() > self._deadline:
                raise BrokerError(
                    f"no {what} from {self._options.host}:{self._options.port} in time",
                    retriable=True,
                )
            rc = client.loop(LOOP_SLICE_S)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS and not done():
                self._closed = True
                raise BrokerError(
                    f"the connection to {self._options.host}:{self._options.port} closed while "
                    f"waiting for its {what} ({paho.error_string(rc)}); a broker that rejects "
                    "the client certificate hangs up like this (the other checks above test "
                    "the files, not whether the broker accepts them)",
                    retriable=True,
                )

    # -- paho callbacks ---------------------------------------------------------------------

    def _on_connect(
        self,
        _client: paho.Client,
        _userdata: Any,
        _flags: paho.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._connack = (reason, properties)

    def _on_subscribe(
        self,
        _client: paho.Client,
        _userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        _properties: Properties | None,
    ) -> None:
        self._subacks[mid] = reasons


def _features(connack: Properties | None) -> dict[str, bool]:
    if connack is None:
        return {}
    return {
        meaning: getattr(connack, name, absent) != 0 for name, meaning, absent in CONNACK_FEATURES
    }


def broker_findings(settings: Settings, *, timeout_s: float = 10.0) -> Iterator[Finding]:
    """``hm-ingest check --broker``: what the broker answered, against what the settings need."""
    mqtt = settings.mqtt
    try:
        report = probe_broker(mqtt_options(settings), timeout_s=timeout_s)
    except IngestError as exc:
        yield Finding(Level.ERROR, "mqtt.host", str(exc))
        return
    yield Finding(
        Level.OK,
        "mqtt.host",
        f"{mqtt.host}:{mqtt.port} answered over MQTT {report.protocol} (client id "
        f"{report.client_id!r}, nothing left on the broker)",
    )
    topic = report.topic
    if topic.granted:
        yield Finding(
            Level.OK, "mqtt.topic", f"the broker lets this client read {topic.topic_filter}"
        )
    else:
        yield Finding(
            Level.ERROR,
            "mqtt.topic",
            f"the broker refused a subscription to {topic.topic_filter} ({topic.reason}): check "
            "[mqtt] app_id and topic, and that the application's certificate may read it",
        )
    if report.protocol != "5":
        level = Level.ERROR if mqtt.protocol == "5" else Level.OK
        yield Finding(
            level,
            "mqtt.protocol",
            "the broker speaks MQTT 3.1.1 only"
            + ("; set [mqtt] protocol = '3.1.1'" if level == Level.ERROR else "")
            + ": V2 envelopes cannot be spread over VIN-sharded replicas",
        )
    elif report.maximum_qos < 1:
        yield Finding(
            Level.ERROR,
            "mqtt.protocol",
            "the broker's CONNACK caps QoS at 0: messages would not be redelivered after a crash",
        )
    else:
        yield _identifiers_finding(settings, report)
    yield _shared_finding(settings, report)


def _identifiers_finding(settings: Settings, report: BrokerReport) -> Finding:
    available = report.features.get("subscription identifiers", True)
    if available:
        return Finding(
            Level.OK,
            "mqtt.protocol",
            "MQTT 5 with subscription identifiers: VIN-sharded replicas can spread V2 envelopes "
            "by VIN ([mqtt] protocol = '5')",
        )
    return Finding(
        Level.ERROR if settings.spreads_envelopes else Level.OK,
        "mqtt.protocol",
        "MQTT 5 without subscription identifiers: VIN-sharded replicas cannot spread V2 "
        "envelopes" + ("; set [mqtt] protocol = '3.1.1'" if settings.spreads_envelopes else ""),
    )


def _shared_finding(settings: Settings, report: BrokerReport) -> Finding:
    shared = report.shared
    needed = settings.replica.enabled and not settings.replica.vin_sharded
    if shared.granted:
        return Finding(
            Level.OK,
            "replica.mode",
            "shared subscriptions work: replicas can split the stream with [replica] mode = "
            "'shared'",
        )
    return Finding(
        Level.ERROR if needed else Level.OK,
        "replica.mode",
        f"the broker refused a shared subscription ({shared.reason}): several replicas need "
        "[replica] mode = 'vin' (docs/scaling.md)",
    )
