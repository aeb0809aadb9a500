"""The receive session: one persistent, mutual-TLS, QoS 1 MQTT subscription with manual PUBACKs.

Why paho and not aiomqtt: aiomqtt acknowledges every PUBLISH as it enters its in-memory queue, so
a crash loses what the application never saw (hm-reference.md section 6). Here nothing is
acknowledged until the pipeline calls :meth:`MqttSession.ack` after its durable write.

Threads. One daemon thread owns the paho client and does all socket I/O: it connects, runs
``client.loop()``, and reconnects with capped, fully jittered exponential backoff. ``ack()`` and
``stop()`` may be called from any thread; they only queue packets, and the loop thread writes them.

Filters. A session subscribes the topic filters ``filters()`` returns (by default just
``options.topic``) whenever the broker has no session for it, and :meth:`MqttSession.subscribe` /
:meth:`MqttSession.unsubscribe` change them at runtime (VIN-sharded replicas). Those calls block
the caller until the broker acknowledged every filter; the packets are still written by the loop
thread.

Generations. Every successful CONNACK starts a new *generation*. A :class:`Delivery` names the
generation it arrived on; after a reconnect the same packet identifier may name a different
message, so an ack for an old generation is refused, the broker redelivers that message
([MQTT-4.4.0-1]) and the pipeline deduplicates it on ``message_id``.
"""

from __future__ import annotations

import logging
import math
import random
import re
import socket
import ssl
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from ingest.errors import BrokerError, CredentialError, IngestError

LOGGER = logging.getLogger("ingest.mqtt")

# TCP connect + TLS handshake happen inside paho's blocking reconnect(); this bounds them, and with
# them how long stop() can wait while a connection attempt is under way.
SOCKET_TIMEOUT_S = 5.0
# Wait for CONNACK once CONNECT is sent; a broker that never answers is a failed attempt.
CONNACK_TIMEOUT_S = 10.0
# select() timeout in the loop. ack() and stop() wake it at once through paho's socket pair; this
# only bounds how late keepalive checks run and how long a stop() during CONNECT takes to be seen.
LOOP_TIMEOUT_S = 0.5
# After the DISCONNECT: how long to wait for the broker to close the connection (see
# _close_after_the_broker).
STOP_DRAIN_S = 1.0
# Bytes read (and dropped) per recv() while waiting for the broker to close.
DRAIN_READ_BYTES = 65536
# Topic filters per SUBSCRIBE / UNSUBSCRIBE packet. A replica may own thousands of VINs; one packet
# each would cost a round trip per VIN, one packet for all of them could pass the broker's maximum
# packet size (500 filters of ~60 bytes is ~30 kB).
FILTERS_PER_PACKET = 500
# How long subscribe() and unsubscribe() wait for the broker's acknowledgements by default.
FILTER_ACK_TIMEOUT_S = 10.0

# CONNACK reasons that describe the broker's state, not ours: retry them even at start-up.
# 0x80 unspecified, 0x88 server unavailable, 0x89 server busy, 0x97 quota exceeded,
# 0x9F connection rate exceeded (MQTT 5.0 table 3-1; paho maps 3.1.1 return code 3 to 0x88).
TRANSIENT_CONNACK = frozenset({0x80, 0x88, 0x89, 0x97, 0x9F})

# OpenSSL alert names by which a broker rejects the client certificate, with what each means.
CLIENT_CERT_ALERTS = {
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "has expired (or is not yet valid)",
    "TLSV1_ALERT_UNKNOWN_CA": "is not signed by a CA the broker trusts",
    "SSLV3_ALERT_BAD_CERTIFICATE": "was rejected as bad",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "has been revoked",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "was not accepted",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "is of a type the broker does not support",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "was not sent, and the broker requires one",
    "TLSV1_ALERT_ACCESS_DENIED": "was refused access",
}
NOT_TLS_REASONS = frozenset(
    {"WRONG_VERSION_NUMBER", "TLSV1_ALERT_PROTOCOL_VERSION", "UNSUPPORTED_PROTOCOL"}
)
# OpenSSL verify codes for a certificate that does not name the host we dialled.
HOSTNAME_MISMATCH_CODES = frozenset({62, 64})
_SSL_REASON = re.compile(r"\[SSL: ([A-Z0-9_]+)\]")


@dataclass(frozen=True, slots=True)
class MqttOptions:
    host: str
    port: int
    client_id: str
    topic: str
    ca_file: Path
    cert_file: Path
    key_file: Path
    protocol: Literal["3.1.1", "5"] = "3.1.1"
    keepalive_s: float = 30.0
    session_expiry_s: int = 7 * 86400  # MQTT 5 only
    receive_maximum: int = 100  # MQTT 5 only
    verify_hostname: bool = True
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 60.0


class Delivery(NamedTuple):
    """Identifies one received PUBLISH for acknowledgement.

    A NamedTuple rather than a frozen dataclass: one is made per message on the receive thread,
    and a tuple is built about twice as fast, time that thread holds the GIL for.
    """

    generation: int  # connection generation it arrived on
    mid: int
    qos: int
    # Which session it came from: 0 is the daemon's own; a replica adopting a lost replica's
    # session (ingest.replica.adopt) tags its deliveries so the PUBACK goes back the same way.
    channel: int = 0
    # MQTT 5 Subscription Identifier of the subscription that matched, 0 for none. VIN-sharded
    # replicas subscribe the V2 topic with one naming the rule that says which envelopes are
    # theirs (ingest.replica.envelopes): it is fixed when the broker routes the message, so a
    # message decided late (a backlog) is judged by the rule of its publication.
    subscription: int = 0
    # The broker's DUP flag: sent before on an earlier connection of this session, unacked.
    redelivered: bool = False
    # Set by the holder of a lost replica's session (ingest.replica.host, .adopt) for a
    # redelivery an earlier holder already logged: acknowledged in its turn, never logged again.
    logged_elsewhere: bool = False


# Called on the session's network thread; must not block (it holds up every later message).
MessageHandler = Callable[[str, bytes, Delivery], None]
# The MQTT 5 Subscription Identifier to subscribe a topic filter with, or None for none.
SubscriptionIds = Callable[[str], int | None]
# on_state(state, cause), on the session thread. state: connecting, connected, disconnected,
# failed, stopped. cause is a short token from a fixed set (safe as a metric label): connected ->
# session_present | no_session; disconnected -> server_disconnect | connection_lost | stopping;
# failed -> credential | broker; otherwise "". The full text is in last_error and the log.
StateHandler = Callable[[str, str], None]
CAUSE_SESSION_PRESENT = "session_present"  # connected: the broker kept our session
CAUSE_NO_SESSION = "no_session"  # connected: a new session (first start, or the broker lost it)
# disconnected because stop() was called: deliberate, so not a connection loss or a reconnect.
CAUSE_STOPPING = "stopping"


class ReceiveSession(Protocol):
    """What the daemon uses of a receive session: :class:`MqttSession` or the native one."""

    connected: threading.Event
    subscribed: threading.Event
    session_present: bool | None
    reconnects: int
    subscribes: int
    last_error: str | None

    def start(self) -> None: ...
    def ack(self, delivery: Delivery) -> bool: ...
    def stop(self, timeout_s: float = 5.0) -> None: ...
    def wait_first_connection(self, timeout_s: float) -> None: ...


class FilterSession(Protocol):
    """A session whose topic filters change at runtime (VIN-sharded replicas)."""

    def subscribe(
        self, filters: Sequence[str], timeout_s: float = FILTER_ACK_TIMEOUT_S
    ) -> None: ...
    def unsubscribe(
        self, filters: Sequence[str], timeout_s: float = FILTER_ACK_TIMEOUT_S
    ) -> None: ...


def is_connection_loss(state: str, cause: str) -> bool:
    """Whether an on_state event is a disconnect the session will reconnect from."""
    return state == "disconnected" and cause != CAUSE_STOPPING


def tls_context(options: MqttOptions) -> ssl.SSLContext:
    """Client context for mutual TLS; raises CredentialError naming the file and the fix."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = options.verify_hostname
    try:
        ctx.load_verify_locations(cafile=str(options.ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise CredentialError(
            f"cannot load CA file {options.ca_file}: {_reason(exc)}; set [mqtt] ca_file to "
            "<client-id>-ca_certificates.pem from HM's console"
        ) from exc
    try:
        ctx.load_cert_chain(certfile=str(options.cert_file), keyfile=str(options.key_file))
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            problem = f"private key {options.key_file} does not match certificate"
        else:
            problem = f"cannot load client certificate or key ({_reason(exc)}) from"
        raise CredentialError(
            f"{problem} {options.cert_file}; set [mqtt] cert_file and key_file to "
            "<client-id>-certificate.pem.crt and <client-id>-private.pem.key from HM's console"
        ) from exc
    except OSError as exc:
        raise CredentialError(
            f"cannot read client certificate {options.cert_file} or key {options.key_file}: "
            f"{exc.strerror or exc}"
        ) from exc
    return ctx


def _reason(exc: BaseException) -> str:
    return str(getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc)


def classify_tls_failure(
    options: MqttOptions, exc: BaseException | None, text: str
) -> IngestError | None:
    """The error to stop start-up with when a failure will not fix itself, else None (retry)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        if exc.verify_code in HOSTNAME_MISMATCH_CODES:
            return CredentialError(
                f"hostname mismatch: the broker's certificate does not name {options.host} "
                f"({exc.verify_message}); set [mqtt] host to a name in that certificate"
            )
        return CredentialError(
            f"server certificate not trusted by {options.ca_file}: {exc.verify_message}; "
            "set [mqtt] ca_file to <client-id>-ca_certificates.pem from HM's console"
        )
    reason = exc.reason if isinstance(exc, ssl.SSLError) else None
    if reason is None and (found := _SSL_REASON.search(text)):
        # TLS 1.3: the broker checks our certificate after the handshake, so its alert only
        # surfaces on the first read inside paho, which logs it rather than raising.
        reason = found.group(1)
    if reason in CLIENT_CERT_ALERTS:
        return CredentialError(
            f"the broker rejected client certificate {options.cert_file}: it "
            f"{CLIENT_CERT_ALERTS[reason]} (TLS alert {reason}); use the certificate and key "
            f"HM's console issued for client id {options.client_id!r}"
        )
    if reason in NOT_TLS_REASONS:
        return BrokerError(
            f"TLS handshake with {options.host}:{options.port} failed ({reason}): is it a TLS "
            "listener? HM's brokers use port 8883",
            retriable=False,
        )
    return None


def probe_tls12(options: MqttOptions) -> IngestError | None:
    """Repeat the handshake capped at TLS 1.2 to learn why the broker hung up.

    Under TLS 1.3 the broker checks our certificate after the handshake; its alert usually reaches
    paho's first read, but not always: with Mosquitto 2.0.11 / OpenSSL 3.0 we saw a rejected
    certificate end in a bare EOF. Under TLS 1.2 the check is inside the handshake and the alert
    names the cause. Used only before the first successful connection, to turn "connection
    closed" into a message an operator can act on.
    """
    ctx = tls_context(options)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    try:
        with (
            socket.create_connection((options.host, options.port), SOCKET_TIMEOUT_S) as raw,
            # TLS 1.2 checks the client certificate before Finished: a rejection raises here.
            ctx.wrap_socket(raw, server_hostname=options.host),
        ):
            pass
    except (OSError, ValueError) as exc:
        return classify_tls_failure(options, exc, str(exc))
    return None


def manual_ack_client(options: MqttOptions, ctx: ssl.SSLContext, *, clean: bool) -> paho.Client:
    """A paho client whose PUBACKs the caller sends and which never reconnects by itself.

    Reconnecting is the caller's (with jitter, and with generations for acks). ``clean`` is the
    3.1.1 clean-session flag; MQTT 5 takes clean start (and the session expiry) at connect.
    """
    v5 = options.protocol == "5"
    client = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=options.client_id,
        clean_session=None if v5 else clean,
        protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
        reconnect_on_failure=False,
        manual_ack=True,
    )
    client.tls_set_context(ctx)
    if not options.verify_hostname:
        client.tls_insecure_set(True)  # else paho runs its own hostname check as well
    client.connect_timeout = SOCKET_TIMEOUT_S
    client.on_socket_register_write = _written_by_the_loop_thread
    client.on_socket_close = _close_after_the_broker
    return client


def _close_after_the_broker(_client: paho.Client, _userdata: Any, sock: Any) -> None:
    """Hands the connection over cleanly before paho closes the socket (right after it wrote a
    DISCONNECT, or when the connection is lost).

    Closing a socket that holds bytes we have not read (PUBLISHes the broker sent meanwhile:
    paho reads one packet per loop) makes the kernel answer with a TCP reset instead of a FIN,
    and a reset discards whatever a busy broker has not read yet: the DISCONNECT and the PUBACKs
    just before it. Mosquitto then logs "disconnected: Protocol error" (its TLS read failed) and
    redelivers the messages whose PUBACKs it lost to the session's next holder; replicas
    stopping or handing a hosted session back under a stream showed it. So: end our side after
    everything written (FIN), then read and drop until the broker closes, at most STOP_DRAIN_S,
    as the native client does (ingest.mqtt_native). A connection already gone ends at the first
    read.
    """
    if not isinstance(sock, socket.socket):  # paho's websocket wrapper, which we never use
        return
    try:
        # On a TLS socket this ends the TLS layer too: what is read from here on is dropped.
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + STOP_DRAIN_S
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            if not sock.recv(DRAIN_READ_BYTES):
                return  # the broker closed: it has read everything we wrote
    except OSError:
        pass  # reset, timed out or never connected: paho closes the socket either way


def _written_by_the_loop_thread(_client: paho.Client, _userdata: Any, _sock: Any) -> None:
    """Keeps paho from writing on the thread that queues a packet.

    Without an ``on_socket_register_write`` callback, paho writes a packet queued from another
    thread (a PUBACK from intake or a host's flusher, a DISCONNECT from stop()) straight away on
    that thread, while the session thread may be writing too; a TLS socket can take part of a
    packet, and two writers could then interleave bytes of different packets. With the callback
    paho only queues the packet and wakes the session thread's select(), which writes
    everything, in queue order.
    """


class SupervisedSession(ABC):
    """What both receive sessions share: the session thread's reconnect loop and its bookkeeping.

    It owns the public ``start()``, ``stop()`` and ``wait_first_connection()``, the capped, fully
    jittered backoff, connection generations, the ``connected``/``subscribed`` events and the
    ``on_state`` events. A subclass supplies the connection itself: :meth:`_prepare` (load the
    credentials, on the caller's thread), :meth:`_connect_and_serve` (one connection from attempt
    to loss, on the session thread) and, where it needs them, the hooks below.
    """

    def __init__(
        self,
        options: MqttOptions,
        on_message: MessageHandler,
        *,
        on_state: StateHandler | None,
        lock: AbstractContextManager[bool],
    ) -> None:
        self._options = options
        self._on_message = on_message
        self._on_state = on_state
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.session_present: bool | None = None
        self.reconnects = 0  # successful connections after the first
        self.subscribes = 0  # SUBSCRIBE packets sent (only when the broker had no session)
        self.last_error: str | None = None
        # Guards _generation and _live_generation against ack(), and what _drop_pending() clears.
        self._lock = lock
        self._generation = 0
        self._live_generation = 0  # generation of the open connection; 0 while down
        self._stop = threading.Event()
        self._ready_or_failed = threading.Event()
        self._fatal: IngestError | None = None
        self._started_ok = False
        self._thread: threading.Thread | None = None

    # -- public API -------------------------------------------------------------------------

    def start(self) -> None:
        """Load the credentials and start the session thread. Raises CredentialError."""
        if self._thread is not None:
            raise RuntimeError(f"{type(self).__name__}.start() called twice")
        self._prepare()
        self._thread = threading.Thread(target=self._run, name="ingest-mqtt", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Disconnect cleanly (the broker keeps the session) and join the thread.

        Called on the session thread itself (from an ``on_state`` callback) it only tells the
        thread to end once the callback returns: a thread cannot join itself.
        """
        self._stop.set()
        self._interrupt()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                LOGGER.warning("MQTT session thread still running %.1f s after stop()", timeout_s)

    def wait_first_connection(self, timeout_s: float) -> None:
        """Return once connected and subscribed; raise if that fails for good or takes too long."""
        if self._thread is None:
            raise RuntimeError("call start() before wait_first_connection()")
        self._ready_or_failed.wait(timeout_s)
        if self._fatal is not None:
            raise self._fatal
        if not self.subscribed.is_set():
            raise BrokerError(
                f"no MQTT session with {self._options.host}:{self._options.port} within "
                f"{timeout_s:g} s; last error: {self.last_error or 'none'}"
            )

    # -- what a subclass supplies -----------------------------------------------------------

    @abstractmethod
    def _prepare(self) -> None:
        """Load credentials and build what the session thread needs (caller's thread)."""

    @abstractmethod
    def _connect_and_serve(self) -> tuple[bool, str, IngestError | None]:
        """One connection from attempt to loss: (accepted by the broker, cause, fatal error)."""

    def _interrupt(self) -> None:  # noqa: B027 (optional hook: nothing to do by default)
        """Called by stop() after setting _stop: make the session thread notice it soon."""

    def _drop_pending(self) -> None:  # noqa: B027 (optional hook: nothing to do by default)
        """Called under _lock whenever the generation changes: forget per-connection output."""

    def _release(self) -> None:  # noqa: B027 (optional hook: nothing to do by default)
        """Called on the session thread as it ends, before the "stopped" event."""

    # -- session thread ---------------------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        try:
            while not self._stop.is_set():
                self._state("connecting", "")
                accepted, cause, fatal = self._connect_and_serve()
                if self._stop.is_set():
                    break
                if accepted:  # backoff restarts after the broker accepted us
                    failures = 0
                self.last_error = cause
                if fatal is not None and not self._started_ok:
                    LOGGER.error("MQTT start-up failed: %s", fatal)
                    self._fatal = fatal
                    self._state(
                        "failed", "credential" if isinstance(fatal, CredentialError) else "broker"
                    )
                    self._ready_or_failed.set()
                    return
                cap = min(
                    self._options.reconnect_max_s, self._options.reconnect_min_s * 2**failures
                )
                delay = random.uniform(0, cap)  # noqa: S311 - jitter, not cryptography
                failures += 1
                LOGGER.warning(
                    "MQTT reconnect attempt %d in %.2f s; cause: %s", failures, delay, cause
                )
                self._stop.wait(delay)
        finally:
            self._mark_down()
            self._release()
            self._state("stopped", "")

    def _internal_error(self, exc: Exception) -> str:
        """Log a bug in the connection loop; the cause to reconnect with."""
        # A bug here must not end a daemon that runs for weeks: the caller drops the connection
        # (unacked messages come back) and reconnects through the normal backoff.
        LOGGER.exception("MQTT session loop failed; reconnecting")
        return f"internal error: {type(exc).__name__}: {exc}"

    def _closed_before_connack(self, detail: str) -> tuple[str, IngestError | None]:
        """Cause and fatal error (if it will not fix itself) of a close before CONNACK."""
        cause = f"connection closed before CONNACK: {detail}"
        fatal = classify_tls_failure(self._options, None, detail)
        if fatal is None and not self._started_ok:
            fatal = probe_tls12(self._options)
        return cause, fatal

    # -- bookkeeping ------------------------------------------------------------------------

    def _mark_down(self) -> None:
        with self._lock:
            self._live_generation = 0
            self._drop_pending()
        self.connected.clear()
        self.subscribed.clear()

    def _go_live(self, session_present: bool, protocol_label: str) -> None:
        """A CONNACK accepted us: start a new generation and report "connected"."""
        with self._lock:
            self._generation += 1
            self._live_generation = self._generation
            self._drop_pending()
        self.reconnects = self._generation - 1
        self.session_present = session_present
        self.connected.set()
        LOGGER.info(
            "MQTT connected to %s:%d as %r (MQTT %s, generation %d, session present: %s)",
            self._options.host,
            self._options.port,
            self._options.client_id,
            protocol_label,
            self._generation,
            session_present,
        )
        self._state("connected", CAUSE_SESSION_PRESENT if session_present else CAUSE_NO_SESSION)

    def _mark_subscribed(self) -> None:
        self.subscribed.set()
        self._started_ok = True
        self._ready_or_failed.set()

    def _report_stopping(self) -> None:
        LOGGER.info("MQTT disconnected (stopping)")
        self._mark_down()
        self._state("disconnected", CAUSE_STOPPING)

    def _report_loss(self, detail: str, cause: str, *, last_error: str) -> None:
        """A live connection ended without stop(): log it and report ``disconnected``."""
        LOGGER.warning(
            "MQTT disconnected from %s:%d: %s", self._options.host, self._options.port, detail
        )
        self._mark_down()
        self.last_error = last_error
        self._state("disconnected", cause)

    def _state(self, state: str, cause: str) -> None:
        if self._on_state is None:
            return
        try:
            self._on_state(state, cause)
        except Exception:
            LOGGER.exception("on_state callback failed for state %r", state)


def invalid_filters(filters: Sequence[str]) -> list[str]:
    """The filters MQTT does not allow (section 4.7.1): paho raises on them, a broker hangs up."""
    return [f for f in filters if not _valid_filter(f)]


def _valid_filter(topic_filter: str) -> bool:
    if not topic_filter or "\0" in topic_filter or len(topic_filter.encode()) > 65535:
        return False
    levels = topic_filter.split("/")
    for index, level in enumerate(levels):
        if len(level) > 1 and ("+" in level or "#" in level):
            return False  # a wildcard must be a whole level [MQTT-4.7.1-2], [MQTT-4.7.1-3]
        if level == "#" and index != len(levels) - 1:
            return False  # "#" only as the last level [MQTT-4.7.1-2]
    return True


def _describe(filters: Sequence[str], limit: int = 5) -> str:
    """Filters for a message: a long list is cut short, with the count."""
    return _first_few([repr(f) for f in filters[:limit]], len(filters))


def _describe_refused(refused: Sequence[tuple[str, ReasonCode]], limit: int = 5) -> str:
    named = [f"{f!r} ({reason.value:#04x} {reason})" for f, reason in refused[:limit]]
    return _first_few(named, len(refused))


def _first_few(named: list[str], total: int) -> str:
    listed = ", ".join(named)
    return listed if total <= len(named) else f"{listed} and {total - len(named)} more"


@dataclass(eq=False)
class _FilterRequest:
    """One subscribe() or unsubscribe() call, or the subscription at connect, while acks are due.

    Its packets are in ``MqttSession._in_flight`` by packet id; every field is guarded by the
    session's lock, and ``done`` is set (under it) once nothing more will come.
    """

    verb: Literal["subscribe", "unsubscribe"]
    at_connect: bool = False
    waiting: set[int] = field(default_factory=set)  # packet ids not acknowledged yet
    refused: list[tuple[str, ReasonCode]] = field(default_factory=list)  # filter, why
    lost: str | None = None  # why the acknowledgements will never come
    done: threading.Event = field(default_factory=threading.Event)


class MqttSession(SupervisedSession):
    """A persistent QoS 1 subscription whose PUBACKs the caller sends, in receipt order."""

    def __init__(
        self,
        options: MqttOptions,
        on_message: MessageHandler,
        *,
        on_state: StateHandler | None = None,
        filters: Callable[[], Sequence[str]] | None = None,
        channel: int = 0,
        subscription_ids: SubscriptionIds | None = None,
    ) -> None:
        """``filters`` gives what to subscribe when the broker has no session (default: just
        ``options.topic``); ``channel`` is stamped on every :class:`Delivery` so the caller can
        route its ack back to this session; ``subscription_ids`` (MQTT 5) names the identifier
        each filter is subscribed with, and every Delivery then carries the one that matched."""
        if subscription_ids is not None and options.protocol != "5":
            raise ValueError("subscription identifiers need MQTT 5 ([mqtt] protocol = '5')")
        # Re-entrant: if paho ever ran a callback synchronously inside client.ack(), _mark_down()
        # on the same thread must not deadlock.
        super().__init__(options, on_message, on_state=on_state, lock=threading.RLock())
        self._filters = filters if filters is not None else lambda: [options.topic]
        self._channel = channel
        self._subscription_ids = subscription_ids
        # SUBSCRIBE / UNSUBSCRIBE packets awaiting their ack: packet id -> (request, its filters).
        self._in_flight: dict[int, tuple[_FilterRequest, Sequence[str]]] = {}
        self._accepted = False  # a CONNACK accepted us since the session thread last looked
        self._attempt_error: str | None = None  # paho's last error line in this attempt
        self._connack_refusal: ReasonCode | None = None
        self._subscribe_refusal: str | None = None
        self._client: paho.Client | None = None

    # -- public API (start, stop and wait_first_connection are SupervisedSession's) ----------

    def ack(self, delivery: Delivery) -> bool:
        """Send the PUBACK for ``delivery`` if it arrived on the current connection."""
        if delivery.qos == 0:
            return False  # QoS 0 has no acknowledgement
        with self._lock:
            client = self._client
            if client is None or delivery.generation != self._live_generation:
                return False
            # [MQTT-4.6.0-2] PUBACKs go out in the order of these calls: paho appends to one queue.
            return client.ack(delivery.mid, delivery.qos) == MQTTErrorCode.MQTT_ERR_SUCCESS

    def subscribe(self, filters: Sequence[str], timeout_s: float = FILTER_ACK_TIMEOUT_S) -> None:
        """Subscribe ``filters`` (QoS 1) now; return once the broker granted every one.

        Any thread but the session thread (a callback would wait for itself). Raises BrokerError:
        retriable when not connected, when the connection ends first or on timeout (subscribing
        again is harmless); not retriable when a filter is invalid or the broker refused one.
        """
        self._change_filters("subscribe", filters, timeout_s)

    def unsubscribe(self, filters: Sequence[str], timeout_s: float = FILTER_ACK_TIMEOUT_S) -> None:
        """Unsubscribe ``filters`` now; return once the broker acknowledged. Raises as subscribe.

        Unsubscribing a filter the session does not hold is not an error (MQTT 5 answers 0x11).
        """
        self._change_filters("unsubscribe", filters, timeout_s)

    def _change_filters(
        self, verb: Literal["subscribe", "unsubscribe"], filters: Sequence[str], timeout_s: float
    ) -> None:
        wanted = list(filters)
        if not wanted:
            return
        if self._thread is threading.current_thread():
            raise RuntimeError(
                f"MqttSession.{verb}() called on the session thread, which would have to read "
                "the acknowledgement it waits for; call it from another thread"
            )
        invalid = invalid_filters(wanted)
        if invalid:
            raise BrokerError(
                f"cannot {verb} invalid topic filter(s) {_describe(invalid)}: '+' and '#' must "
                "fill a whole level and '#' must be the last one",
                retriable=False,
            )
        request = _FilterRequest(verb)
        with self._lock:
            client = self._client
            if client is None or not self._live_generation:
                raise BrokerError(
                    f"cannot {verb} {_describe(wanted)}: not connected to "
                    f"{self._options.host}:{self._options.port} "
                    f"({self.last_error or 'connecting'}); retry once connected",
                    retriable=True,
                )
            self._send_filters(client, request, wanted)
        self._await_filter_acks(request, wanted, timeout_s)

    def _send_filters(
        self, client: paho.Client, request: _FilterRequest, filters: Sequence[str]
    ) -> None:
        """Queue ``request``'s packets for the loop thread to write. Caller holds _lock.

        Under the lock, so no ack is handled before its packet id is registered (the loop thread
        may write the packet and read the ack before paho's call even returns here).
        """
        for chunk, identifier in self._packets(request.verb, filters):
            if request.verb == "subscribe":
                rc, mid = client.subscribe(
                    [(f, 1) for f in chunk], properties=_subscribe_properties(identifier)
                )
            else:
                rc, mid = client.unsubscribe(list(chunk))
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
                # The socket closed under us; on_disconnect and a reconnect follow.
                self._forget(request)
                request.lost = f"the connection closed ({paho.error_string(rc)})"
                request.done.set()
                return
            request.waiting.add(mid)
            self._in_flight[mid] = (request, chunk)

    def _packets(
        self, verb: str, filters: Sequence[str]
    ) -> Iterator[tuple[Sequence[str], int | None]]:
        """``filters`` in packets of at most FILTERS_PER_PACKET, each with its subscription
        identifier: one SUBSCRIBE carries one identifier for all of its filters."""
        ids = self._subscription_ids
        if verb != "subscribe" or ids is None:
            groups: dict[int | None, list[str]] = {None: list(filters)}
        else:
            groups = {}
            for topic_filter in filters:
                groups.setdefault(ids(topic_filter), []).append(topic_filter)
        for identifier, members in groups.items():
            for start in range(0, len(members), FILTERS_PER_PACKET):
                yield members[start : start + FILTERS_PER_PACKET], identifier

    def _await_filter_acks(
        self, request: _FilterRequest, filters: Sequence[str], timeout_s: float
    ) -> None:
        verb = request.verb
        if not request.done.wait(timeout_s):
            with self._lock:
                self._forget(request)
                timed_out = not request.done.is_set()  # the last ack may have come meanwhile
            if timed_out:
                raise BrokerError(
                    f"the broker did not acknowledge the {verb} of {_describe(filters)} within "
                    f"{timeout_s:g} s; it may or may not have applied it: retry",
                    retriable=True,
                )
        if request.lost is not None:
            raise BrokerError(
                f"{verb} of {_describe(filters)} not confirmed: {request.lost}; retry once "
                "reconnected",
                retriable=True,
            )
        if request.refused:
            raise BrokerError(
                f"the broker refused to {verb} {_describe_refused(request.refused)}; check "
                f"that the broker's ACL lets client id {self._options.client_id!r} {verb} them",
                retriable=False,
            )

    def _forget(self, request: _FilterRequest) -> None:
        """Stop waiting for ``request``'s acks (a late one is then ignored). Caller holds _lock."""
        for mid in request.waiting:
            self._in_flight.pop(mid, None)

    def _drop_pending(self) -> None:
        # The connection changed: acks still due for the old one will never come.
        for request, _ in self._in_flight.values():
            request.lost = request.lost or "the connection ended before the broker acknowledged"
            request.done.set()
        self._in_flight.clear()

    # -- client set-up ----------------------------------------------------------------------

    def _prepare(self) -> None:
        self._client = self._make_client(tls_context(self._options))

    def _interrupt(self) -> None:
        with self._lock:
            live = self._client if self._live_generation else None
        if live is not None:
            # Queues DISCONNECT and wakes the loop's select(); the loop thread writes it. Called
            # outside the lock: paho may run callbacks that take it. If the connection drops
            # meanwhile, the loop thread sees _stop and ends anyway.
            live.disconnect()

    def _make_client(self, ctx: ssl.SSLContext) -> paho.Client:
        opts = self._options
        v5 = opts.protocol == "5"
        client = manual_ack_client(opts, ctx, clean=False)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_subscribe = self._handle_subscribe
        client.on_unsubscribe = self._handle_unsubscribe
        client.on_message = self._handle_message
        # With no write callback paho writes a packet queued from another thread (ack, stop)
        # from that thread, racing the loop thread on one TLS socket. Setting one makes paho only
        # queue the packet and wake select(), so the loop thread does all I/O.
        client.on_socket_register_write = _no_op_socket_callback
        client.enable_logger(self._paho_logger())
        keepalive = math.ceil(opts.keepalive_s)  # [MQTT-3.1.2.10] keep alive is whole seconds
        if v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho: no hints
            # Without a non-zero expiry an MQTT 5 session ends with the connection.
            props.SessionExpiryInterval = opts.session_expiry_s
            # Caps unacknowledged PUBLISHes in flight to us; overrides max_inflight_messages.
            props.ReceiveMaximum = opts.receive_maximum
            client.connect_async(
                opts.host, opts.port, keepalive, clean_start=False, properties=props
            )
        else:
            client.connect_async(opts.host, opts.port, keepalive)
        return client

    def _paho_logger(self) -> logging.Logger:
        # paho formats a DEBUG line per PUBLISH for its logger. A private, unregistered logger at
        # ERROR drops those at the level check; its errors (the only place a TLS alert read after
        # the handshake appears) are remembered here and still reach "ingest.mqtt.paho".
        capture = logging.Logger("ingest.mqtt.paho", logging.ERROR)
        capture.parent = logging.getLogger("ingest.mqtt.paho")
        capture.addHandler(_RememberError(self))
        return capture

    # -- session thread ---------------------------------------------------------------------

    def _connect_and_serve(self) -> tuple[bool, str, IngestError | None]:
        client = self._client
        assert client is not None
        cause, fatal = self._attempt(client)
        # paho's on_connect reports acceptance; take it for this attempt.
        accepted, self._accepted = self._accepted, False
        return accepted, cause, fatal

    def _attempt(self, client: paho.Client) -> tuple[str, IngestError | None]:
        """One connection from attempt to loss. Returns its cause and a fatal error if any."""
        # Before paho's reconnect() clears its outgoing queue: an ack that passed the generation
        # check has been queued already (and is dropped with the dead connection); later ones fail.
        self._mark_down()
        self._attempt_error = None
        self._connack_refusal = None
        self._subscribe_refusal = None
        try:
            client.reconnect()  # TCP connect, TLS handshake, CONNECT queued
        # ssl.SSLError is an OSError; ssl.CertificateError (paho's own hostname check) a ValueError.
        except (OSError, ValueError) as exc:
            return f"{type(exc).__name__}: {exc}", classify_tls_failure(self._options, exc, "")
        try:
            return self._serve(client)
        except Exception as exc:
            return self._internal_error(exc), None

    def _serve(self, client: paho.Client) -> tuple[str, IngestError | None]:
        connack_deadline = time.monotonic() + CONNACK_TIMEOUT_S
        ever_live = False
        while True:
            rc = client.loop(LOOP_TIMEOUT_S)
            ever_live = ever_live or self.connected.is_set()
            if self._stop.is_set():
                self._drain_disconnect(client)
                return "stopped", None
            if self._subscribe_refusal is not None:
                self._drain_disconnect(client)
                return self._subscribe_refusal, BrokerError(
                    self._subscribe_refusal, retriable=False
                )
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return self._loss_cause(rc, ever_live)
            if not ever_live and time.monotonic() > connack_deadline:
                return f"no CONNACK within {CONNACK_TIMEOUT_S:g} s", None

    def _loss_cause(self, rc: MQTTErrorCode, ever_live: bool) -> tuple[str, IngestError | None]:
        refusal = self._connack_refusal
        if refusal is not None:
            cause = (
                f"broker refused the connection: CONNACK reason {refusal.value:#04x} ({refusal})"
            )
            if refusal.value in TRANSIENT_CONNACK:
                return cause, None
            return cause, BrokerError(
                f"{cause}; check that [mqtt] client_id {self._options.client_id!r} belongs to "
                f"certificate {self._options.cert_file}",
                retriable=False,
            )
        detail = self._attempt_error or paho.error_string(rc)
        if ever_live:
            return f"connection lost: {detail}", None
        return self._closed_before_connack(detail)

    def _drain_disconnect(self, client: paho.Client) -> None:
        # stop() queued DISCONNECT if connected; otherwise it is queued here. The loop then writes
        # it (behind any PUBACKs already queued) and paho closes the socket.
        if client.socket() is not None:
            client.disconnect()
        deadline = time.monotonic() + STOP_DRAIN_S
        while client.socket() is not None and time.monotonic() < deadline:
            if client.loop(LOOP_TIMEOUT_S) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break

    # -- paho callbacks (all on the session thread) -----------------------------------------

    def _handle_connect(
        self,
        client: paho.Client,
        _userdata: Any,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        _props: Properties | None,
    ) -> None:
        if reason.is_failure:
            self._connack_refusal = reason
            return
        if self._subscription_ids is not None and not _subscription_ids_available(_props):
            # A SUBSCRIBE with an identifier would be a protocol error to such a broker.
            self._subscribe_refusal = (
                f"the broker at {self._options.host}:{self._options.port} does not support MQTT 5 "
                "subscription identifiers, which VIN-sharded replicas need to spread V2 envelopes "
                "by VIN; set [mqtt] protocol = '3.1.1' (one replica then takes every V2 envelope)"
            )
            LOGGER.error("%s", self._subscribe_refusal)
            return
        self._accepted = True
        self._go_live(flags.session_present, self._options.protocol)
        if flags.session_present:
            # The broker kept our subscription with the session [MQTT-3.1.2-4]; its queued
            # messages and unacknowledged in-flight ones follow without a SUBSCRIBE.
            self._mark_subscribed()
            return
        # No session (first start, or the broker lost it): paho does not resubscribe by itself.
        self._subscribe_at_connect(client, list(self._filters()))

    def _subscribe_at_connect(self, client: paho.Client, filters: list[str]) -> None:
        if not filters:
            self._mark_subscribed()  # nothing assigned yet; subscribe() adds filters later
            return
        invalid = invalid_filters(filters)
        if invalid:
            self._refuse_subscription(
                f"cannot subscribe invalid topic filter(s) {_describe(invalid)}"
            )
            return
        request = _FilterRequest("subscribe", at_connect=True)
        with self._lock:
            self._send_filters(client, request, filters)
        self.subscribes += len(request.waiting)

    def _refuse_subscription(self, problem: str) -> None:
        """The subscription at connect failed: _serve ends the connection (fatal at start-up)."""
        self._subscribe_refusal = (
            f"{problem}; check [mqtt] topic and app_id, and that the broker's ACL lets client "
            f"id {self._options.client_id!r} subscribe them"
        )
        LOGGER.error("%s", self._subscribe_refusal)

    def _handle_subscribe(
        self,
        _client: paho.Client,
        _userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        _props: Properties | None,
    ) -> None:
        self._filters_acknowledged(mid, reasons)

    def _handle_unsubscribe(
        self,
        _client: paho.Client,
        _userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        _props: Properties | None,
    ) -> None:
        # MQTT 3.1.1 UNSUBACKs carry no reason codes (paho gives []): they cannot fail.
        self._filters_acknowledged(mid, reasons)

    def _filters_acknowledged(self, mid: int, reasons: list[ReasonCode]) -> None:
        """A SUBACK or UNSUBACK: note what it refused and finish its request if it was the last."""
        with self._lock:
            entry = self._in_flight.pop(mid, None)
            if entry is None:
                return  # its caller timed out and stopped waiting
            request, chunk = entry
            # One reason code per filter, in the packet's order [MQTT-3.8.4-6], [MQTT-3.11.3-1].
            request.refused.extend(
                (topic_filter, reason)
                for topic_filter, reason in zip(chunk, reasons, strict=False)
                if reason.is_failure
            )
            request.waiting.discard(mid)
            if request.waiting:
                return
            request.done.set()
        if request.at_connect:
            if request.refused:
                self._refuse_subscription(
                    f"broker refused the subscription to {_describe_refused(request.refused)}"
                )
            else:
                self._mark_subscribed()

    def _handle_disconnect(
        self,
        _client: paho.Client,
        _userdata: Any,
        flags: paho.DisconnectFlags,
        reason: ReasonCode,
        _props: Properties | None,
    ) -> None:
        was_live = self._live_generation != 0
        self._mark_down()
        if not was_live:
            return  # a failed attempt: the session thread logs it with its cause
        if self._stop.is_set():
            self._report_stopping()
            return
        from_server = flags.is_disconnect_packet_from_server
        by = "broker sent DISCONNECT" if from_server else "connection lost"
        detail = f"{by}: {reason}" + (f" ({self._attempt_error})" if self._attempt_error else "")
        self._report_loss(
            detail, "server_disconnect" if from_server else "connection_lost", last_error=detail
        )

    def _handle_message(
        self, _client: paho.Client, _userdata: Any, message: paho.MQTTMessage
    ) -> None:
        if self._subscription_ids is None and not message.dup:
            delivery = Delivery(self._live_generation, message.mid, message.qos, self._channel)
        else:
            delivery = Delivery(
                self._live_generation,
                message.mid,
                message.qos,
                self._channel,
                matched_subscription(message) if self._subscription_ids is not None else 0,
                bool(message.dup),
            )
        # paho hands over a bytearray sliced from the packet buffer; bytes() is the one copy the
        # handler's immutable type costs: ~100 ns for 1.5 kB, against ~50 us per message in paho.
        try:
            self._on_message(message.topic, bytes(message.payload), delivery)
        except Exception:
            # Not acknowledged: the broker redelivers it after the next reconnect.
            LOGGER.exception("message handler failed for mid %d on %s", message.mid, message.topic)


def _subscribe_properties(identifier: int | None) -> Properties | None:
    if identifier is None:
        return None
    props = Properties(PacketTypes.SUBSCRIBE)  # type: ignore[no-untyped-call]  # paho: no hints
    props.SubscriptionIdentifier = identifier
    return props


def _subscription_ids_available(connack: Properties | None) -> bool:
    """CONNACK's Subscription Identifiers Available; absent means yes (MQTT 5, 3.2.2.3.12)."""
    return getattr(connack, "SubscriptionIdentifierAvailable", 1) != 0


def matched_subscription(message: paho.MQTTMessage) -> int:
    """The Subscription Identifier a PUBLISH carries (the lowest, if several matched), or 0."""
    props = getattr(message, "properties", None)
    identifiers = getattr(props, "SubscriptionIdentifier", None) if props is not None else None
    if not identifiers:
        return 0
    # paho keeps a repeatable property as a list.
    return min(identifiers) if isinstance(identifiers, list) else int(identifiers)


class _RememberError(logging.Handler):
    """Keeps paho's last error line for the attempt in progress (socket and TLS read errors)."""

    def __init__(self, session: MqttSession) -> None:
        super().__init__(logging.ERROR)
        self._session = session

    def emit(self, record: logging.LogRecord) -> None:
        self._session._attempt_error = record.getMessage()


def _no_op_socket_callback(_client: paho.Client, _userdata: Any, _sock: Any) -> None:
    """The loop thread polls the socket itself; see ``on_socket_register_write`` above."""
