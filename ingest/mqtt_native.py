"""A minimal MQTT 3.1.1 receive session reading TLS in large chunks (``[mqtt] client = "native"``).

Why it exists: paho reads the socket a few bytes at a time and handles one packet per
``select()``, and writes every PUBACK as its own TLS record. On one core that caps a paho consumer
at ~20k msg/s (hm-reference.md section 6) and leaves the daemon's pipeline no GIL time. This
session drains whatever TLS records are ready in one go, parses every complete packet in them,
and writes all PUBACKs queued since the last write in one ``send()``.

It is a drop-in for :class:`ingest.mqtt.MqttSession` (same attributes, methods, ``on_state``
events, generations and error messages) for what the daemon uses: MQTT 3.1.1, clean session off,
one QoS 1 subscription, manual PUBACKs in call order, keep-alive pings and reconnect with capped,
fully jittered backoff. MQTT 5 stays with paho. What does not depend on the wire (the reconnect
loop, generations, ``on_state`` events, start/stop/wait) is :class:`ingest.mqtt.SupervisedSession`,
shared with the paho session; this module keeps only the connection itself.

Threads: one daemon thread does all socket I/O. ``ack()`` and ``stop()`` may be called from any
thread; they queue bytes and wake the I/O thread through a socket pair.
"""

from __future__ import annotations

import contextlib
import logging
import math
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Sequence

from ingest.errors import BrokerError, IngestError
from ingest.mqtt import (
    CONNACK_TIMEOUT_S,
    LOOP_TIMEOUT_S,
    SOCKET_TIMEOUT_S,
    STOP_DRAIN_S,
    Delivery,
    MessageHandler,
    MqttOptions,
    MqttSession,
    ReceiveSession,
    StateHandler,
    SubscriptionIds,
    SupervisedSession,
    classify_tls_failure,
    tls_context,
)
from ingest.tls_stream import TlsStream

LOGGER = logging.getLogger("ingest.mqtt")

# Read at most this much per wake-up before parsing: many packets per pass, bounded memory.
READ_BUDGET = 1024 * 1024
# While reading is paused, how often to look whether it may resume.
PAUSED_POLL_S = 0.01
# MQTT 3.1.1 control packet types (high nibble of the first byte).
CONNACK, PUBLISH, PUBACK, SUBACK, PINGRESP = 2, 3, 4, 9, 13
PINGREQ_PACKET = b"\xc0\x00"
DISCONNECT_PACKET = b"\xe0\x00"
SUBSCRIBE_PACKET_ID = 1
# CONNACK return codes (MQTT 3.1.1 table 3.1); only 3 (server unavailable) is worth retrying.
CONNACK_REFUSALS = {
    1: "unacceptable protocol version",
    2: "identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorized",
}
TRANSIENT_RETURN_CODES = frozenset({3})
_PUBACK = struct.Struct(">BBH")
_U16 = struct.Struct(">H")


class ProtocolError(Exception):
    """The broker sent something this client cannot accept; the connection is dropped."""


def connect_packet(client_id: str, keepalive_s: int) -> bytes:
    """CONNECT with clean session off ([MQTT-3.1.2-4]: the broker keeps the session)."""
    ident = client_id.encode()
    body = b"\x00\x04MQTT\x04\x00" + _U16.pack(keepalive_s) + _U16.pack(len(ident)) + ident
    return b"\x10" + encode_length(len(body)) + body


def subscribe_packet(topic: str, packet_id: int = SUBSCRIBE_PACKET_ID) -> bytes:
    encoded = topic.encode()
    body = _U16.pack(packet_id) + _U16.pack(len(encoded)) + encoded + b"\x01"  # QoS 1
    return b"\x82" + encode_length(len(body)) + body


def encode_length(value: int) -> bytes:
    """MQTT's variable byte integer ("remaining length")."""
    out = bytearray()
    while True:
        value, digit = divmod(value, 128)
        out.append(digit | (0x80 if value else 0))
        if not value:
            return bytes(out)


class NativeMqttSession(SupervisedSession):
    """A persistent QoS 1 subscription whose PUBACKs the caller sends, in receipt order."""

    def __init__(
        self,
        options: MqttOptions,
        on_message: MessageHandler,
        *,
        on_state: StateHandler | None = None,
        pause_reading: Callable[[], bool] | None = None,
    ) -> None:
        """``pause_reading`` (any thread may be asked): True while the consumer of ``on_message``
        is full; the socket is then not read, which holds the broker back through TCP."""
        if options.protocol != "3.1.1":
            raise BrokerError(
                f'[mqtt] client = "native" speaks MQTT 3.1.1 only, not {options.protocol}; '
                'set [mqtt] protocol = "3.1.1" or [mqtt] client = "paho"',
                retriable=False,
            )
        # A plain lock (ack() takes it per message); it also guards _outgoing and _woken.
        super().__init__(options, on_message, on_state=on_state, lock=threading.Lock())
        self._pause_reading = pause_reading
        self._outgoing = bytearray()  # PUBACKs queued by ack(), written by the I/O thread
        self._woken = False  # a wake byte is in flight since the I/O thread last took _outgoing
        self._ctx: ssl.SSLContext | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    # -- public API (as MqttSession; start, stop and wait_first_connection are shared) -------

    def ack(self, delivery: Delivery) -> bool:
        """Queue the PUBACK for ``delivery`` if it arrived on the current connection."""
        if delivery.qos == 0:
            return False  # QoS 0 has no acknowledgement
        with self._lock:
            if delivery.generation != self._live_generation or not self._live_generation:
                return False
            # [MQTT-4.6.0-2] PUBACKs leave in the order of these calls: one buffer, one writer.
            self._outgoing += _PUBACK.pack(0x40, 2, delivery.mid)
            if self._woken:
                return True
            self._woken = True
        self._wake()
        return True

    # -- SupervisedSession hooks --------------------------------------------------------------

    def _prepare(self) -> None:
        self._ctx = tls_context(self._options)

    def _interrupt(self) -> None:
        # The I/O thread wakes, writes the queued PUBACKs, then DISCONNECT (_Connection.disconnect).
        self._wake()

    def _drop_pending(self) -> None:
        self._outgoing.clear()  # PUBACKs for a dead connection mean nothing to the next

    def _release(self) -> None:
        self._wake_r.close()
        self._wake_w.close()

    # -- session thread ---------------------------------------------------------------------

    def _wake(self) -> None:
        # BlockingIOError: the pair is full, so a wake is pending anyway. OSError: closed.
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\x00")

    def _connect_and_serve(self) -> tuple[bool, str, IngestError | None]:
        """One connection from attempt to loss: (accepted by the broker, cause, fatal error)."""
        opts = self._options
        assert self._ctx is not None
        try:
            raw = socket.create_connection((opts.host, opts.port), SOCKET_TIMEOUT_S)
        except OSError as exc:
            return False, f"{type(exc).__name__}: {exc}", None
        try:
            stream = TlsStream(
                raw,
                self._ctx,
                server_hostname=opts.host if opts.verify_hostname else None,
                timeout_s=SOCKET_TIMEOUT_S,
            )
            stream.handshake()
        except (OSError, ValueError) as exc:
            raw.close()
            return False, f"{type(exc).__name__}: {exc}", classify_tls_failure(opts, exc, "")
        connection = _Connection(self, stream)
        try:
            return connection.serve()
        except Exception as exc:
            return connection.accepted, self._internal_error(exc), None
        finally:
            self._mark_down()
            stream.close()

    def _reading_paused(self) -> bool:
        return self._pause_reading is not None and self._pause_reading()

    def _take_outgoing(self) -> bytes:
        with self._lock:
            data = bytes(self._outgoing)
            self._outgoing.clear()
            self._woken = False
        return data


class _Connection:
    """One TLS connection's I/O loop: CONNECT, SUBSCRIBE when needed, PUBLISHes in, PUBACKs out."""

    def __init__(self, session: NativeMqttSession, stream: TlsStream) -> None:
        self.session = session
        self.options = session._options
        self.stream = stream
        self.accepted = False
        self.keepalive = math.ceil(self.options.keepalive_s)  # [MQTT-3.1.2.10] whole seconds
        self.rest = b""
        self.generation = 0
        self.last_in = self.last_out = time.monotonic()
        self.ping_sent = False
        self.refusal: tuple[str, IngestError | None] | None = None

    # -- the loop -----------------------------------------------------------------------------

    def serve(self) -> tuple[bool, str, IngestError | None]:
        session = self.session
        # Plain descriptors: select() on them is what the loop does most.
        stream_fd = self.stream.raw.fileno()
        wake_fd = session._wake_r.fileno()
        try:
            self.send(connect_packet(self.options.client_id, self.keepalive))
            connack_deadline = time.monotonic() + CONNACK_TIMEOUT_S
            while True:
                if session._stop.is_set():
                    self.disconnect()
                    return self.accepted, "stopped", None
                # Paused, the socket is left unread: TCP's window fills and the broker stops
                # sending. Mosquitto 2.0.11 does not hold back for unacked messages alone.
                # CONNACK and SUBACK are read regardless: the session must come up first.
                reading = not session.subscribed.is_set() or not session._reading_paused()
                watch = [stream_fd, wake_fd] if reading else [wake_fd]
                timeout = LOOP_TIMEOUT_S if reading else PAUSED_POLL_S
                ready, _, _ = select.select(watch, [], [], timeout)
                if wake_fd in ready:
                    self.drain_wake()
                if reading and stream_fd in ready and self.read() is None:
                    return self.lost("connection closed by the broker")
                if self.refusal is not None:
                    cause, fatal = self.refusal
                    return self.accepted, cause, fatal
                outgoing = session._take_outgoing()
                if outgoing:
                    self.send(outgoing)
                now = time.monotonic()
                if not self.accepted and now > connack_deadline:
                    return False, f"no CONNACK within {CONNACK_TIMEOUT_S:g} s", None
                if not reading:
                    self.keep_alive_unread(now)
                elif self.accepted and self.keepalive_expired(now):
                    return self.lost(f"no answer to PINGREQ within {self.keepalive} s")
        except ssl.SSLError as exc:
            return self.failed(exc, f"{type(exc).__name__}: {exc}")
        except (OSError, ProtocolError) as exc:
            return self.lost(f"{type(exc).__name__}: {exc}")

    def read(self) -> int | None:
        """Read what is ready and handle every complete packet; None once the broker closed."""
        received = self.stream.read(READ_BUDGET)
        if received:
            self.last_in = time.monotonic()
            self.handle(received)
        if self.stream.closed:
            return None
        return len(received)

    def handle(self, received: bytes) -> None:
        """Parse every complete packet in ``rest + received``; keep the partial tail."""
        data = self.rest + received if self.rest else received
        end_of_data = len(data)
        pos = 0
        deliver = self.session._on_message
        generation = self.generation
        while pos + 2 <= end_of_data:
            first = data[pos]
            # Remaining length: 1 to 4 bytes of 7 bits each, least significant first.
            length = 0
            shift = 0
            index = pos + 1
            while True:
                if index >= end_of_data:
                    self.rest = data[pos:]
                    return
                digit = data[index]
                index += 1
                length |= (digit & 0x7F) << shift
                if digit < 0x80:
                    break
                shift += 7
                if shift > 21:
                    raise ProtocolError("remaining length longer than 4 bytes")
            end = index + length
            if end > end_of_data:
                break
            kind = first >> 4
            if kind == PUBLISH:
                qos = (first >> 1) & 3
                topic_end = index + 2 + ((data[index] << 8) | data[index + 1])
                try:
                    topic = data[index + 2 : topic_end].decode()
                except UnicodeDecodeError:
                    raise ProtocolError("PUBLISH topic is not UTF-8") from None
                if qos == 1:
                    mid = (data[topic_end] << 8) | data[topic_end + 1]
                    payload_at = topic_end + 2
                elif qos == 0:
                    mid = 0
                    payload_at = topic_end
                else:
                    raise ProtocolError("QoS 2 PUBLISH on a QoS 1 subscription")
                try:
                    deliver(topic, data[payload_at:end], Delivery(generation, mid, qos))
                except Exception:
                    # Not acknowledged: the broker redelivers it after the next reconnect.
                    LOGGER.exception("message handler failed for mid %d on %s", mid, topic)
            else:
                self.control(kind, data[index:end])
                generation = self.generation  # a CONNACK starts a generation mid-chunk
            pos = end
        self.rest = data[pos:]

    def control(self, kind: int, body: bytes) -> None:
        if kind == PINGRESP:
            self.ping_sent = False
        elif kind == CONNACK:
            self.connack(body)
        elif kind == SUBACK:
            self.suback(body)
        elif kind != PUBACK:
            raise ProtocolError(f"unexpected packet type {kind}")

    def connack(self, body: bytes) -> None:
        if len(body) != 2:
            raise ProtocolError(f"CONNACK of {len(body)} bytes")
        session_present, code = bool(body[0] & 1), body[1]
        if code:
            name = CONNACK_REFUSALS.get(code, "unknown")
            cause = f"broker refused the connection: CONNACK return code {code} ({name})"
            fatal = None
            if code not in TRANSIENT_RETURN_CODES:
                fatal = BrokerError(
                    f"{cause}; check that [mqtt] client_id {self.options.client_id!r} belongs to "
                    f"certificate {self.options.cert_file}",
                    retriable=False,
                )
            self.refusal = (cause, fatal)
            return
        self.accepted = True
        session = self.session
        session._go_live(session_present, "3.1.1 native")
        self.generation = session._generation
        if session_present:
            # The broker kept our subscription with the session [MQTT-3.1.2-4].
            session._mark_subscribed()
            return
        # No session (first start, or the broker lost it): subscribe again.
        self.send(subscribe_packet(self.options.topic))
        session.subscribes += 1

    def suback(self, body: bytes) -> None:
        if len(body) < 3:
            raise ProtocolError(f"SUBACK of {len(body)} bytes")
        if body[2] == 0x80:
            cause = (
                f"broker refused the subscription to {self.options.topic!r} (0x80 failure); "
                "check [mqtt] topic and app_id"
            )
            LOGGER.error("%s", cause)
            self.disconnect()
            self.refusal = (cause, BrokerError(cause, retriable=False))
            return
        self.session._mark_subscribed()

    # -- writes, keep-alive, endings ---------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.stream.send(data)
        self.last_out = time.monotonic()

    def keepalive_expired(self, now: float) -> bool:
        """Ping after a quiet keep-alive interval; expired when that ping goes unanswered."""
        if now - self.last_out < self.keepalive and now - self.last_in < self.keepalive:
            return False
        if self.ping_sent:
            return True
        self.send(PINGREQ_PACKET)
        self.ping_sent = True
        self.last_in = now
        return False

    def keep_alive_unread(self, now: float) -> None:
        """While reading is paused: ping so the broker keeps us, without awaiting the answer."""
        if now - self.last_out >= self.keepalive:
            self.send(PINGREQ_PACKET)
        self.last_in = now  # the keep-alive clock restarts when reading resumes
        self.ping_sent = False

    def drain_wake(self) -> None:
        try:
            while self.session._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def disconnect(self) -> None:
        """Write queued PUBACKs, then DISCONNECT, and wait (STOP_DRAIN_S) for the broker to close.

        Closing at once could reset the connection while PUBLISHes are still arriving, and a
        reset may discard the PUBACKs just written: they would only be redelivered, but why.
        """
        try:
            self.send(self.session._take_outgoing() + DISCONNECT_PACKET)
            deadline = time.monotonic() + STOP_DRAIN_S
            while (left := deadline - time.monotonic()) > 0:
                select.select([self.stream.raw], [], [], left)
                self.stream.read(READ_BUDGET)  # anything arriving now stays unacked
                if self.stream.closed:
                    break
        except (OSError, ValueError):
            pass  # the broker may close first; the session is kept either way
        if self.accepted:
            self.session._report_stopping()

    def lost(self, detail: str) -> tuple[bool, str, IngestError | None]:
        if self.accepted:
            cause = f"connection lost: {detail}"
            self.session._report_loss(detail, "connection_lost", last_error=cause)
            return True, cause, None
        return (False, *self.session._closed_before_connack(detail))

    def failed(self, exc: ssl.SSLError, detail: str) -> tuple[bool, str, IngestError | None]:
        """A TLS error: under TLS 1.3 a rejected client certificate surfaces at the first read."""
        if not self.accepted:
            fatal = classify_tls_failure(self.options, exc, detail)
            if fatal is not None:
                return False, f"connection closed before CONNACK: {detail}", fatal
        return self.lost(detail)


# Until ingest/config.py has an ``[mqtt] client`` setting, the choice comes from this variable. Not
# an HM_INGEST_* name: those must name a known setting.
def make_session(
    options: MqttOptions,
    on_message: MessageHandler,
    *,
    on_state: StateHandler | None = None,
    pause_reading: Callable[[], bool] | None = None,
    client: str = "paho",
    filters: Callable[[], Sequence[str]] | None = None,
    subscription_ids: SubscriptionIds | None = None,
) -> ReceiveSession:
    """The receive session ``[mqtt] client`` names: ``paho`` (default) or ``native``.

    Only the native session honours ``pause_reading``: paho reads whenever the socket is ready.
    Only paho takes ``filters`` (subscribed at connect instead of ``options.topic``, and
    changeable while it runs) and ``subscription_ids`` (MQTT 5).
    """
    if client == "native":
        if filters is not None or subscription_ids is not None:
            raise ValueError("the native session subscribes options.topic only; use paho")
        return NativeMqttSession(
            options, on_message, on_state=on_state, pause_reading=pause_reading
        )
    if client == "paho":
        return MqttSession(
            options,
            on_message,
            on_state=on_state,
            filters=filters,
            subscription_ids=subscription_ids,
        )
    raise ValueError(f'unknown MQTT client {client!r}; use "paho" or "native"')
