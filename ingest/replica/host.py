"""Hosting a lost replica's MQTT session (VIN-sharded mode) until the replica returns.

Why hosting and not adopting. In shared mode a lost replica's session is drained and deleted
(:mod:`ingest.replica.adopt`): the broker spreads new messages over the live members anyway. In
VIN-sharded mode nobody else subscribes the lost replica's VINs, so its session must live on: a
:class:`SessionHost` connects with the lost replica's client id and clean session off, feeds every
message into our own intake (channel-tagged, so intake's acks come back here), keeps the
session's subscriptions in step (:meth:`SessionHost.subscribe`, :meth:`SessionHost.unsubscribe`),
and hands the session back when the replica returns (:meth:`SessionHost.release`).

The durability promise. Before the broker may forget a message (our PUBACK), its dedupe key is in
the coordination database as taken from that replica: intake logs the message, calls
:meth:`SessionHost.ack`, and one flusher thread records the keys of everything acked so far in one
``record_keys`` call, *then* queues their PUBACKs in the same (receipt) order. A returning replica
loads those keys before replaying its own log, so a message it had logged but not acknowledged
(and which the broker therefore redelivered to us) is written once, not twice. If recording
fails, nothing of that batch is acknowledged and hosting ends.

No reconnect. On any connection loss hosting ends (``ended`` says why) and the session is not
reconnected: the usual cause is the returning replica connecting with its own client id, which
takes the session over, and reconnecting would only pull it back and forth. The caller starts a
new host if it still should host.

Threads: the session thread (paho, :class:`ingest.mqtt.MqttSession`) receives; intake's thread
calls :meth:`ack`, which only queues; the flusher records keys and queues PUBACKs; any other
thread calls the rest.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

from ingest.errors import BrokerError
from ingest.mqtt import (
    FILTER_ACK_TIMEOUT_S,
    Delivery,
    MessageHandler,
    MqttOptions,
    MqttSession,
    SubscriptionIds,
    is_connection_loss,
)
from ingest.replica.adopt import KeyOf, LoggedBefore, logged_by_earlier_holder

log = logging.getLogger("ingest.replica.host")

# How often wait_connected() looks whether hosting ended before the connection was ready.
WAIT_SLICE_S = 0.05
# Whatever time a stop() has left, the session gets at least this long to write its DISCONNECT.
MIN_DISCONNECT_S = 1.0


class SessionHost:
    """Hosts one lost replica's persistent session: its messages into our intake, keys first."""

    def __init__(
        self,
        options: MqttOptions,
        *,
        replica: str,
        channel: int,
        submit: MessageHandler,
        key_of: KeyOf,
        record_keys: Callable[[list[str]], None],
        filters: Callable[[], Sequence[str]],
        subscription_ids: SubscriptionIds | None = None,
        logged_before: LoggedBefore | None = None,
    ) -> None:
        """``options`` carry the lost replica's client id; ``filters`` what its session should
        hold (subscribed only if the broker no longer has the session), ``subscription_ids``
        the identifier of each (its V2 envelope rule); ``logged_before`` which keys an earlier
        holder of the session recorded (:func:`ingest.replica.adopt.logged_by_earlier_holder`)."""
        self.replica = replica
        self._submit = submit
        self._key_of = key_of
        self._record_keys = record_keys
        self._logged_before = logged_before
        self._session = MqttSession(
            options,
            self._on_message,
            on_state=self._on_state,
            filters=filters,
            channel=channel,
            subscription_ids=subscription_ids,
        )
        # Guards everything below; _changed is notified whenever _durable, _keys or _ended move.
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        # (generation, packet id) -> dedupe key of each message handed to intake, until its PUBACK
        # is queued. Keyed by generation too: a packet id names another message on a new
        # connection (the host never reconnects, but the session's generations say so anyway).
        self._keys: dict[tuple[int, int], str] = {}
        self._durable: deque[Delivery] = deque()  # acked by intake, keys not yet recorded
        self._ended: str | None = None
        # record_keys failed: nothing more is acknowledged. (After a connection loss keys are
        # still recorded: those messages are in our log, and the key lets their next holder
        # skip the redelivery.)
        self._keys_failed = False
        self._refused = False  # the broker or our credentials refused us for good
        # release() or stop() began: new messages stay unacknowledged in the session for its
        # next holder, instead of going into a pipeline that may not get to acknowledge them.
        self._holding_back = False
        self._closing = False  # stop() began: ack() takes nothing more
        self._flusher: threading.Thread | None = None
        self.messages = 0  # messages handed to intake
        # Of them, redeliveries an earlier holder had logged: acknowledged, not logged again.
        self.logged_before = 0

    # -- lifecycle (caller's thread) ----------------------------------------------------------

    def start(self) -> None:
        """Connect as the lost replica (clean session off). Raises CredentialError."""
        self._session.start()
        self._flusher = threading.Thread(
            target=self._flush_until_closed, name=f"ingest-host-{self.replica}", daemon=True
        )
        self._flusher.start()

    def wait_connected(self, timeout_s: float) -> bool:
        """Whether the broker still had the session, once connected and subscribed.

        Raises BrokerError if that does not happen within ``timeout_s`` or hosting ends first
        (retriable unless the broker or our credentials refuse us for good); the session is then
        stopped, so it cannot connect later behind the caller's back.
        """
        deadline = time.monotonic() + timeout_s
        subscribed = self._session.subscribed
        # In slices: a connection lost before the subscription completes ends hosting, and
        # nothing sets ``subscribed`` after that.
        while not subscribed.wait(WAIT_SLICE_S):
            if self._ended is not None or time.monotonic() >= deadline:
                break
        ended = self._ended
        if ended is None and subscribed.is_set():
            return bool(self._session.session_present)
        why = ended or (
            f"not connected within {timeout_s:g} s; last error: "
            f"{self._session.last_error or 'none'}"
        )
        self._end(why)
        self._session.stop()
        raise BrokerError(
            f"cannot host replica {self.replica}'s session: {why}", retriable=not self._refused
        )

    @property
    def ended(self) -> str | None:
        """Why hosting ended by itself (connection lost or taken over, keys not recorded)."""
        return self._ended

    def release(self, timeout_s: float = 30.0) -> None:
        """Hand the session back without losing or repeating a message, then disconnect.

        New messages are held back (left unacknowledged in the session for the replica); every
        message already handed to intake is waited for until its key is recorded and its
        PUBACK queued; then :meth:`stop` disconnects. Raises BrokerError (retriable) when
        hosting has ended or that takes longer than ``timeout_s``; call :meth:`stop` then.
        """
        deadline = time.monotonic() + timeout_s
        with self._changed:
            self._holding_back = True
            while self._keys and self._ended is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BrokerError(
                        f"replica {self.replica}'s session not handed back: {len(self._keys)} "
                        f"message(s) intake took are still unacknowledged after {timeout_s:g} s",
                        retriable=True,
                    )
                self._changed.wait(remaining)
            if self._ended is not None:
                raise BrokerError(
                    f"replica {self.replica}'s session not handed back cleanly: hosting ended "
                    f"({self._ended})",
                    retriable=True,
                )
        self.stop(max(deadline - time.monotonic(), MIN_DISCONNECT_S))

    def stop(self, timeout_s: float = 5.0) -> None:
        """Flush what intake acked already, DISCONNECT cleanly (the session stays), join threads.

        Messages intake has not acked by now stay unacknowledged: the broker redelivers them to
        the session's next holder. :meth:`release` waits for them instead.
        """
        deadline = time.monotonic() + timeout_s
        with self._changed:
            self._holding_back = True
            self._closing = True
            self._changed.notify_all()
        if self._flusher is not None:
            self._flusher.join(timeout_s)
            if self._flusher.is_alive():
                log.warning(
                    "replica %s's key flusher still busy %.1f s after stop()",
                    self.replica,
                    timeout_s,
                )
        # After the flusher: the DISCONNECT is queued behind the PUBACKs it queued.
        self._session.stop(max(deadline - time.monotonic(), MIN_DISCONNECT_S))

    # -- subscriptions (any thread but the session's) ------------------------------------------

    def subscribe(self, filters: Sequence[str], timeout_s: float = FILTER_ACK_TIMEOUT_S) -> None:
        """Add ``filters`` to the hosted session; see :meth:`MqttSession.subscribe`."""
        self._session.subscribe(filters, timeout_s)

    def unsubscribe(self, filters: Sequence[str], timeout_s: float = FILTER_ACK_TIMEOUT_S) -> None:
        """Remove ``filters`` from the hosted session; see :meth:`MqttSession.unsubscribe`."""
        self._session.unsubscribe(filters, timeout_s)

    # -- intake thread --------------------------------------------------------------------------

    def ack(self, delivery: Delivery) -> bool:
        """Intake logged ``delivery`` durably: queue it to have its key recorded, then its PUBACK.

        Never waits for the database. False when there is nothing to acknowledge (QoS 0), keys
        cannot be recorded or the host is stopping (the message then stays in the session).
        """
        if delivery.qos == 0:
            return False
        with self._changed:
            if self._closing or self._keys_failed:
                return False
            if (delivery.generation, delivery.mid) not in self._keys:
                return False  # not ours, or acked twice
            self._durable.append(delivery)
            self._changed.notify_all()
        return True

    # -- flusher thread -------------------------------------------------------------------------

    def _flush_until_closed(self) -> None:
        while True:
            with self._changed:
                while not self._durable and not self._closing:
                    self._changed.wait()
                if not self._durable:
                    return  # closing, and everything acked is flushed
                batch = self._take_batch()
                keys = [self._keys[(d.generation, d.mid)] for d in batch]
            if batch and not self._flush(batch, keys):
                return

    def _take_batch(self) -> list[Delivery]:
        """What intake acked so far, each delivery once (an ack repeated is not a new message).

        Caller holds the lock."""
        batch: list[Delivery] = []
        seen: set[tuple[int, int]] = set()
        while self._durable:
            delivery = self._durable.popleft()
            ident = (delivery.generation, delivery.mid)
            if ident in self._keys and ident not in seen:
                seen.add(ident)
                batch.append(delivery)
        return batch

    def _flush(self, batch: list[Delivery], keys: list[str]) -> bool:
        """Record ``keys``, then queue the PUBACKs of ``batch`` in order. False: hosting ended."""
        try:
            # In the coordination database before the broker may forget the message.
            self._record_keys(keys)
        except Exception as exc:
            with self._changed:
                self._keys_failed = True
            self._end(f"recording {len(keys)} dedupe key(s) failed: {exc}")
            log.exception(
                "hosting replica %s's session stops: its dedupe keys cannot be recorded, so "
                "nothing more is acknowledged (the broker keeps those messages in the session)",
                self.replica,
            )
            self._session.stop()
            return False
        for delivery in batch:
            # False once the connection is gone: the broker then keeps the message, and the key
            # just recorded makes its next holder skip it (we logged it already).
            self._session.ack(delivery)
        with self._changed:
            for delivery in batch:
                self._keys.pop((delivery.generation, delivery.mid), None)
            self._changed.notify_all()
        return True

    # -- session thread -------------------------------------------------------------------------

    def _on_message(self, topic: str, payload: bytes, delivery: Delivery) -> None:
        # At receipt, not at ack: intake hands back only the Delivery, and the key is due
        # before the PUBACK.
        key = self._key_of(topic, payload) if delivery.qos else None
        with self._changed:
            if self._holding_back or self._ended is not None:
                return  # stays unacknowledged in the session for its next holder
            if key is not None:
                self._keys[(delivery.generation, delivery.mid)] = key
            self.messages += 1
        if key is not None:
            delivery = logged_by_earlier_holder(self._logged_before, self.replica, key, delivery)
            if delivery.logged_elsewhere:
                self.logged_before += 1
        self._submit(topic, payload, delivery)

    def _on_state(self, state: str, cause: str) -> None:
        if is_connection_loss(state, cause):
            self._end(
                f"connection lost ({cause}: {self._session.last_error}); the replica may have "
                "taken its session back"
            )
            # On the session thread this only ends it, after this callback: no reconnect.
            self._session.stop()
        elif state == "failed":
            self._refused = True
            self._end(f"could not connect: {self._session.last_error}")

    def _end(self, why: str) -> None:
        with self._changed:
            if self._ended is not None:
                return
            self._ended = why
            self._changed.notify_all()
        log.warning("hosting replica %s's session ended: %s", self.replica, why)
