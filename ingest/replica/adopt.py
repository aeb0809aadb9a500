"""Adopting a lost replica's MQTT session: its queued messages into our pipeline, then wipe it.

Why this exists. Replicas share the stream through a shared subscription, and each keeps a
persistent session. Mosquitto (like the MQTT 5 text allows) goes on handing an *offline* member its
share of new messages, queued in that member's session. A replica that dies for good would take
1/N of the stream with it until someone else empties its session. The leader does that here:

1. connect with the lost replica's client id and ``clean session`` off: the broker hands over the
   session, with every message queued for it and every unacknowledged in-flight one;
2. UNSUBSCRIBE the shared topic at once, so the broker stops queuing new messages there (they go
   to the live members);
3. feed every message into our own intake like any other (logged durably before its PUBACK), with
   one extra step before each PUBACK: its dedupe key is recorded in the coordination database as
   *adopted from* that replica. If the lost replica comes back, it loads those keys into its own
   dedupe index before replaying its log, so a message it had logged but not yet acknowledged when
   it died (and which the broker therefore redelivered to us) is written once, not twice;
4. once nothing has arrived for ``quiet_s`` and every message is acknowledged, disconnect, then
   connect once more with ``clean session`` on, which deletes the session on the broker.

The broker ends our connection if the lost replica reconnects meanwhile (same client id); its
unacknowledged messages then go back to it, and :meth:`SessionAdopter.run` raises so the caller
retries later. The coordination database keeps that from happening in practice: a replica does
not join while a drain claim on it is held (see :mod:`ingest.replica.coordination`).
"""

from __future__ import annotations

import logging
import math
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from ingest.batch import dedupe_key
from ingest.decode import Decoder
from ingest.errors import BrokerError, IngestError
from ingest.mqtt import (
    SOCKET_TIMEOUT_S,
    Delivery,
    MessageHandler,
    MqttOptions,
    manual_ack_client,
    matched_subscription,
    tls_context,
)
from ingest.wal import LogRecord

log = logging.getLogger("ingest.replica.adopt")

LOOP_S = 0.05
CONNACK_TIMEOUT_S = 10.0
# Renew the drain claim at least this often while draining.
KEEP_CLAIM_EVERY_S = 1.0

# The dedupe key the sink will give a message (ingest.batch.dedupe_key): computed here because
# it must be recorded before the PUBACK, which the sink comes long after.
KeyOf = Callable[[str, bytes], str]
# Which of these keys an earlier holder of the session recorded as adopted, i.e. logged
# (Coordinator.adopted_among for the lost replica).
LoggedBefore = Callable[[list[str]], set[str]]


def logged_by_earlier_holder(
    logged_before: LoggedBefore | None, replica: str, key: str, delivery: Delivery
) -> Delivery:
    """``delivery``, marked ``logged_elsewhere`` when it is a redelivery (DUP) of a message an
    earlier holder of ``replica``'s session logged and recorded but whose PUBACK never reached
    the broker (its connection ended first): logging it again would write it twice.

    Only redeliveries are asked about (at most the broker's in-flight window per connection).
    When the database cannot answer, the message is logged: a duplicate can be removed, a loss
    cannot.
    """
    if not delivery.redelivered or logged_before is None:
        return delivery
    try:
        if key in logged_before([key]):
            return delivery._replace(logged_elsewhere=True)
    except IngestError as exc:
        log.warning(
            "cannot tell whether a redelivered message of replica %s's session was logged by "
            "its previous holder (%s): logged again",
            replica,
            exc,
        )
    return delivery


@dataclass(frozen=True, slots=True)
class AdoptionReport:
    replica: str
    session_present: bool
    messages: int
    seconds: float


class SessionAdopter:
    """Drains one lost replica's session into our intake. :meth:`run` blocks; use a thread."""

    def __init__(
        self,
        options: MqttOptions,
        *,
        replica: str,
        channel: int,
        submit: MessageHandler,
        key_of: KeyOf,
        record_keys: Callable[[list[str]], None],
        keep_claim: Callable[[], bool],
        logged_before: LoggedBefore | None = None,
        receive_backlog_full: Callable[[], bool] = lambda: False,
        quiet_s: float = 1.0,
        stop: threading.Event | None = None,
    ) -> None:
        """``options`` carry the lost replica's client id and the shared topic it subscribed."""
        self.replica = replica
        self._options = options
        self._channel = channel
        self._submit = submit
        self._key_of = key_of
        self._record_keys = record_keys
        self._keep_claim = keep_claim
        self._logged_before = logged_before
        self._backlog_full = receive_backlog_full
        self._quiet_s = quiet_s
        self._stop = stop or threading.Event()
        # mid -> dedupe key of messages handed to intake and not acknowledged yet (session thread)
        self._outstanding: dict[int, str] = {}
        # Deliveries intake has made durable, waiting for their keys to be recorded (any thread).
        self._durable: deque[Delivery] = deque()
        self._messages = 0
        self._last_message_at = time.monotonic()
        self._connack: tuple[bool, ReasonCode] | None = None
        self._unsubscribed = False
        self._lost: str | None = None

    # -- intake thread ----------------------------------------------------------------------

    def ack(self, delivery: Delivery) -> bool:
        """Intake logged ``delivery`` durably: its key is recorded, then the PUBACK is sent."""
        self._durable.append(delivery)
        return True

    # -- the drain (caller's thread) --------------------------------------------------------

    def run(self) -> AdoptionReport:
        started = time.monotonic()
        ctx = tls_context(self._options)
        client = self._connect(ctx, clean=False)
        try:
            session_present = self._await_connack(client)
            if session_present:
                client.unsubscribe(self._options.topic)
                self._drain(client)
        finally:
            # Also on failure: a clean DISCONNECT leaves what is unacknowledged in the session.
            self._disconnect(client)
        # Connecting with clean session on deletes what is left of the session on the broker.
        wipe = self._connect(ctx, clean=True)
        self._await_connack(wipe)
        self._disconnect(wipe)
        report = AdoptionReport(
            self.replica, session_present, self._messages, time.monotonic() - started
        )
        log.info(
            "adopted the session of replica %s: %d message(s) in %.1f s (session present: %s); "
            "session deleted on the broker",
            self.replica,
            report.messages,
            report.seconds,
            session_present,
        )
        return report

    def _drain(self, client: paho.Client) -> None:
        next_claim = time.monotonic() + KEEP_CLAIM_EVERY_S
        while True:
            if self._stop.is_set():
                raise BrokerError(
                    f"adoption of replica {self.replica} interrupted by shutdown; "
                    "its session is left on the broker and adopted later",
                    retriable=True,
                )
            self._flush_acks(client)
            if self._backlog_full():
                # Stop reading while intake is full; keep our PUBACKs and keepalive going.
                rc = client.loop_write()
                if rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                    rc = client.loop_misc()
                time.sleep(LOOP_S)
            else:
                rc = client.loop(LOOP_S)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or self._lost is not None:
                raise BrokerError(
                    f"lost the connection while adopting replica {self.replica}'s session "
                    f"({self._lost or paho.error_string(rc)}); retried later",
                    retriable=True,
                )
            now = time.monotonic()
            if now >= next_claim:
                if not self._keep_claim():
                    raise BrokerError(
                        f"drain claim on replica {self.replica} lost; stopping the adoption",
                        retriable=True,
                    )
                next_claim = now + KEEP_CLAIM_EVERY_S
            if (
                self._unsubscribed
                and not self._outstanding
                and not self._durable
                and now - self._last_message_at >= self._quiet_s
            ):
                return

    def _flush_acks(self, client: paho.Client) -> None:
        if not self._durable:
            return
        deliveries = []
        while self._durable:
            deliveries.append(self._durable.popleft())
        keys = [self._outstanding[d.mid] for d in deliveries if d.mid in self._outstanding]
        # Durable in the coordination database before the broker may forget the message.
        self._record_keys(keys)
        for delivery in deliveries:
            if self._outstanding.pop(delivery.mid, None) is not None:
                client.ack(delivery.mid, delivery.qos)

    # -- paho plumbing ----------------------------------------------------------------------

    def _connect(self, ctx: ssl.SSLContext, *, clean: bool) -> paho.Client:
        """A client with the lost replica's id, its CONNECT sent; the CONNACK is awaited apart."""
        opts = self._options
        client = manual_ack_client(opts, ctx, clean=clean)
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        client.on_unsubscribe = self._on_unsubscribe
        client.on_disconnect = self._on_disconnect
        keepalive = math.ceil(opts.keepalive_s)
        self._connack = None
        self._lost = None
        try:
            if opts.protocol == "5":
                props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                # Expiry 0 with clean start: the session ends with this connection.
                props.SessionExpiryInterval = 0 if clean else opts.session_expiry_s
                props.ReceiveMaximum = opts.receive_maximum
                client.connect(opts.host, opts.port, keepalive, clean_start=clean, properties=props)
            else:
                client.connect(opts.host, opts.port, keepalive)
        except (OSError, ValueError) as exc:
            raise BrokerError(
                f"cannot connect to adopt replica {self.replica}'s session: {exc}", retriable=True
            ) from exc
        return client

    def _await_connack(self, client: paho.Client) -> bool:
        deadline = time.monotonic() + CONNACK_TIMEOUT_S
        while self._connack is None:
            rc = client.loop(LOOP_S)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or time.monotonic() > deadline:
                raise BrokerError(
                    f"no CONNACK while adopting replica {self.replica}'s session "
                    f"({self._lost or paho.error_string(rc)})",
                    retriable=True,
                )
        session_present, reason = self._connack
        if reason.is_failure:
            raise BrokerError(
                f"broker refused the adoption of replica {self.replica}'s session: {reason}",
                retriable=True,
            )
        return session_present

    def _disconnect(self, client: paho.Client) -> None:
        client.disconnect()
        deadline = time.monotonic() + SOCKET_TIMEOUT_S
        while client.socket() is not None and time.monotonic() < deadline:
            if client.loop(LOOP_S) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break

    def _on_connect(
        self,
        _client: paho.Client,
        _userdata: Any,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        _props: Properties | None,
    ) -> None:
        self._connack = (flags.session_present, reason)

    def _on_unsubscribe(
        self,
        _client: paho.Client,
        _userdata: Any,
        _mid: int,
        _reasons: list[ReasonCode],
        _props: Properties | None,
    ) -> None:
        self._unsubscribed = True

    def _on_disconnect(
        self,
        _client: paho.Client,
        _userdata: Any,
        _flags: paho.DisconnectFlags,
        reason: ReasonCode,
        _props: Properties | None,
    ) -> None:
        self._lost = str(reason)

    def _on_message(self, _client: paho.Client, _userdata: Any, message: paho.MQTTMessage) -> None:
        payload = bytes(message.payload)
        if message.qos == 0:
            return  # nothing queued for us is QoS 0 (we subscribed with QoS 1)
        key = self._key_of(message.topic, payload)
        self._outstanding[message.mid] = key
        self._messages += 1
        self._last_message_at = time.monotonic()
        # With its subscription identifier: a V2 envelope queued for a retired VIN-sharded
        # replica is then kept only if that replica's rule gave it the envelope.
        delivery = Delivery(
            1,
            message.mid,
            message.qos,
            self._channel,
            matched_subscription(message),
            bool(message.dup),
        )
        delivery = logged_by_earlier_holder(self._logged_before, self.replica, key, delivery)
        self._submit(message.topic, payload, delivery)


def message_key_function(app_id: str | None, max_payload_bytes: int) -> KeyOf:
    """``key_of`` for :class:`SessionAdopter`: the sink's dedupe key, from topic and payload."""
    decoder = Decoder(app_id=app_id, max_payload_bytes=max_payload_bytes)

    def key_of(topic: str, payload: bytes) -> str:
        decoded = decoder.decode(topic, payload, 0)
        return dedupe_key(decoded, LogRecord(0, 0, topic, payload))

    return key_of
