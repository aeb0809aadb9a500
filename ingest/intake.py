"""Intake: received message → write-ahead log (group commit) → PUBACK in receipt order → sink.

This is the only place that decides when the broker may forget a message, so its rules are the
product's promise:

* A PUBACK is sent only after the message's log record is durable (fsynced, or written to the
  page cache in ``write`` durability).
* PUBACKs go out in receipt order: messages are logged in the order paho delivered them and acked
  in that same order ([MQTT-4.6.0-2]).
* Acks never wait for Parquet. The broker's in-flight window (20 on Mosquitto by default) would
  otherwise stall the stream for a whole flush interval. The log absorbs the difference.
* When the log holds ``max_log_bytes`` of records the sink has not committed yet (it cannot keep
  up or cannot write), or the log itself cannot be written (disk full), intake stops writing and
  acking. The broker stops
  sending once its in-flight window is full and keeps the rest queued, so memory stays bounded by
  that window. Intake resumes by itself when the log shrinks or the disk has room again.

paho calls :meth:`Intake.submit` on its network thread; everything else runs on the intake thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

from ingest.errors import LogError
from ingest.metrics import Metrics
from ingest.mqtt import Delivery
from ingest.wal import HEADER, WriteAheadLog

log = logging.getLogger("ingest.intake")

# One group commit takes whatever has queued up since the last fsync, up to this many messages:
# large enough to amortise the fsync (~1-5 ms) at 20k msg/s, small enough to keep ack latency low.
MAX_GROUP = 4096
# A group waits for more messages while they keep coming: it closes once it holds the broker's
# in-flight window (the broker sends no more until they are acknowledged), LINGER_S after its
# first message, when nothing arrived for IDLE_GAP_S, or at MAX_GROUP. Every group costs the same
# fsync, wake-ups and PUBACK write however small it is: at 5,000 msg/s spread evenly, groups of
# whatever arrived during the previous fsync (~0.15 ms here) held 1-2 messages, and the daemon's
# own process used 43 % of a core instead of 20 %. The idle gap bounds what a window set too
# large costs: each window of the broker's then waits IDLE_GAP_S for messages that cannot come.
LINGER_S = 0.005
IDLE_GAP_S = 0.002
# Mosquitto's max_inflight_messages by default (MQTT 3.1.1; under MQTT 5 the Receive Maximum).
DEFAULT_WINDOW = 20
_NOT_WAITING = 1 << 62
# What closed a group: it held the broker's window, LINGER_S passed, IDLE_GAP_S passed without a
# message, or it held MAX_GROUP.
GroupClosedBy = Literal["window", "linger", "idle", "max"]
# How often a waiting intake thread re-checks for shutdown.
POLL_S = 0.1
# After the cap is hit, wait until the log is this fraction of the cap before resuming, so intake
# does not flap between paused and running on every released segment.
RESUME_FRACTION = 0.8
# Received messages waiting for the intake thread at which the receiver stops reading the socket.
RECEIVE_BACKLOG = 2 * MAX_GROUP
# Records handed to the sink and not yet taken by it at which logging waits (four full groups):
# records wait in the sink's queue as Python objects (~1.8x their payload), so a deep queue is
# only memory.
SINK_BACKLOG_RECORDS = 4 * MAX_GROUP
# Payload the sink may hold queued beyond one full batch before acks pause (see IntakeLimits).
SINK_QUEUE_BYTES = 16 * 1024 * 1024
# Retry a failed log write (disk full) at most this often.
WRITE_RETRY_MAX_S = 5.0
# Pausing is ordinary flow control while the sink works through a backlog: it can pause and resume
# several times a second. The log names a pause at most this often, with how many it left out.
PAUSE_LOG_INTERVAL_S = 60.0

_Received = tuple[int, str, bytes, Delivery]
# keep([(topic, payload, delivery), ...]): for each received message, False when another
# session logs it (intake thread; ingest.replica.handover).
Keep = Callable[[list[tuple[str, bytes, Delivery]]], list[bool]]


@dataclass(frozen=True, slots=True)
class IntakeLimits:
    # Log bytes of records the sink has not committed yet ([state] log_max_bytes).
    max_log_bytes: int
    # Payload bytes handed to the sink and not committed yet. Those records sit in the sink's
    # memory (its queue and pending batch) as well as in the log, so this bounds the daemon's
    # memory when it receives faster than the sink commits. None: only the log cap applies.
    max_pending_payload_bytes: int | None = None

    @classmethod
    def sized(cls, *, max_log_bytes: int, flush_bytes: int) -> IntakeLimits:
        """Limits for a sink that commits at ``flush_bytes`` of payload ([output] flush_bytes).

        The sink needs room for one full batch to commit by size; what it holds beyond that is
        only a queue, which SINK_QUEUE_BYTES bounds.
        """
        return cls(max_log_bytes, flush_bytes + SINK_QUEUE_BYTES)


class Intake:
    """Owns the write-ahead log's append side and the acknowledgement of every message."""

    def __init__(
        self,
        wal: WriteAheadLog,
        *,
        ack: Callable[[Delivery], bool],
        deliver: Callable[[int, list[tuple[int, str, bytes]]], None],
        limits: IntakeLimits,
        metrics: Metrics,
        committed_lsn: Callable[[], int],
        sink_backlog: Callable[[], int] | None = None,
        keep: Keep | None = None,
        window: int = DEFAULT_WINDOW,
        now_us: Callable[[], int] = lambda: time.time_ns() // 1000,
    ) -> None:
        """``deliver(first_lsn, entries)`` hands each logged group to the sink (records
        ``first_lsn``, ``first_lsn + 1``, ...: ``(received_at_us, topic, payload)`` each);
        ``committed_lsn`` reads the sink's last committed LSN, ``sink_backlog`` how many delivered
        records the sink has not taken yet (both may be called from any thread); ``keep`` says
        which messages of a group are this daemon's to log at all (a V2 envelope of a VIN
        another replica owns is not, nor a message another replica claimed during a handover:
        they are acknowledged in their turn, unlogged); ``window`` is how many unacknowledged
        messages the broker sends before it waits for PUBACKs (see LINGER_S)."""
        self._wal = wal
        self._window = window
        self._keep = keep
        self._ack = ack
        self._deliver = deliver
        self._limits = limits
        self._metrics = metrics
        self._now_us = now_us
        self._queue: queue.SimpleQueue[_Received] = queue.SimpleQueue()
        # While a group waits for the rest of the broker's window: how many more messages fill
        # it, and the event submit() sets when they are queued (see _wait_for_window).
        self._missing = _NOT_WAITING
        self._window_full = threading.Event()
        self._groups_closed_by = {
            reason: metrics.intake_groups.labels(reason) for reason in get_args(GroupClosedBy)
        }
        self._accepting = True
        self._paused = False
        self._pause_logged_at: float | None = None  # monotonic time of the last pause logged
        self._pauses_not_logged = 0
        self._pause_is_logged = False  # the current pause was logged: log its end too
        self.heartbeat = time.monotonic()
        # The last append's failure (disk full, I/O error) while it persists: readiness shows it.
        self.last_write_error: str | None = None
        self._committed_lsn = committed_lsn
        self._sink_backlog = sink_backlog
        # (last lsn, frame bytes, payload bytes) of each logged group the sink has not committed
        # yet. The caps count these, not the log's size on disk: the active segment also holds
        # committed records until it is full and released, which would make the cap fire early.
        self._uncommitted: deque[tuple[int, int, int]] = deque()
        self._uncommitted_bytes = 0
        self._pending_payload_bytes = 0
        logged_through = wal.next_lsn - 1
        if logged_through > committed_lsn():
            # Replayed at start-up but not committed yet. Their exact size is not at hand; the
            # log's size bounds it from above until the sink commits past them.
            size = wal.size_bytes
            self._uncommitted.append((logged_through, size, size))
            self._uncommitted_bytes = self._pending_payload_bytes = size

    # -- paho's network thread ------------------------------------------------------------------
    def submit(self, topic: str, payload: bytes, delivery: Delivery) -> None:
        """Queue one received message. Never blocks: the receive thread must keep reading.

        Metrics are counted per group on the intake thread, not here: each Prometheus update
        takes a lock, and this runs once per message on the thread that holds the GIL most.
        """
        if not self._accepting:
            # Shutting down: leave it unacknowledged; the broker redelivers it next session.
            return
        queued = self._queue
        queued.put((self._now_us(), topic, payload, delivery))
        if queued.qsize() >= self._missing:
            self._window_full.set()

    def receive_backlog_full(self) -> bool:
        """True while RECEIVE_BACKLOG messages wait to be logged: the receiver should stop reading.

        Any thread. Without this, a receiver faster than the pipeline would queue the broker's
        whole backlog here (Mosquitto keeps sending past its in-flight window).
        """
        return self._queue.qsize() >= RECEIVE_BACKLOG

    def close(self) -> None:
        """Stop accepting messages; :meth:`run` then logs and acks what it already holds."""
        self._accepting = False

    @property
    def paused(self) -> bool:
        return self._paused

    # -- the intake thread ------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Log, ack and hand over messages until ``stop`` is set and the queue is drained."""
        while True:
            self.heartbeat = time.monotonic()
            group, closed_by = self._take_group()
            if not group:
                if stop.is_set():
                    return
                continue
            self._groups_closed_by[closed_by].inc()
            self._metrics.messages_received.inc(len(group))
            self._metrics.messages_unacked.inc(len(group))
            if not self._commit(group, stop):
                # Stopped while paused: the group stays unacknowledged and the broker keeps it.
                self._metrics.messages_unacked.dec(len(group))
                return

    def _take_group(self) -> tuple[list[_Received], GroupClosedBy]:
        """The next group (see LINGER_S), and what closed it; ([], "max") after POLL_S idle."""
        try:
            group = [self._queue.get(timeout=POLL_S)]
        except queue.Empty:
            return [], "max"
        closes_at = time.monotonic() + LINGER_S
        get = self._queue.get_nowait
        while len(group) < MAX_GROUP:
            try:
                group.append(get())
                continue
            except queue.Empty:
                pass
            if len(group) >= self._window:
                return group, "window"  # the broker sends no more before these are acked
            left = closes_at - time.monotonic()
            if left <= 0:
                return group, "linger"
            if not self._wait_for_window(self._window - len(group), min(IDLE_GAP_S, left)):
                # Nothing came: the broker is idle, or waits for these PUBACKs (a window
                # smaller than the setting: groups closed this way at one size say so).
                return group, "idle"
        return group, "max"

    def _wait_for_window(self, missing: int, timeout_s: float) -> bool:
        """Wait until ``missing`` more messages are queued, or ``timeout_s``; False when none
        came. Not a wait on the queue itself: that would wake this thread once per message."""
        self._window_full.clear()
        self._missing = missing  # submit() sets _window_full once this many are queued
        if self._queue.qsize() < missing:
            self._window_full.wait(timeout_s)
        self._missing = _NOT_WAITING
        return self._queue.qsize() > 0

    def _commit(self, group: list[_Received], stop: threading.Event) -> bool:
        """Make ``group`` durable, then ack it. False when stopped before it could be logged."""
        if self._keep is None:
            entries = [
                (received_at, topic, payload)
                for received_at, topic, payload, delivery in group
                if not delivery.logged_elsewhere
            ]
        else:
            entries = self._kept(group)
        first_lsn = self._append_when_possible(entries, stop) if entries else 0
        if first_lsn is None:
            return False
        sent = 0
        for _, _, _, delivery in group:
            if self._ack(delivery):
                sent += 1
        self._metrics.messages_acked.inc(sent)
        self._metrics.messages_unacked.dec(len(group))
        # As plain tuples: the sink builds its records on its own thread (or process).
        if entries:
            self._deliver(first_lsn, entries)
        self._metrics.log_bytes.set(self._wal.size_bytes)
        self._metrics.log_segments.set(self._wal.segment_count)
        return True

    def _kept(self, group: list[_Received]) -> list[tuple[int, str, bytes]]:
        """The entries of ``group`` this daemon logs; the others are acknowledged unlogged."""
        keep = self._keep
        assert keep is not None
        group = [entry for entry in group if not entry[3].logged_elsewhere]
        try:
            kept = keep([(topic, payload, delivery) for _, topic, payload, delivery in group])
        except Exception:
            # A doubt keeps the messages: a duplicate can be removed, a loss cannot.
            log.exception("cannot tell which of %d received messages are ours: logged", len(group))
            kept = [True] * len(group)
        return [
            (received_at, topic, payload)
            for (received_at, topic, payload, _), ours in zip(group, kept, strict=True)
            if ours
        ]

    @property
    def uncommitted_bytes(self) -> int:
        """Log bytes of records not yet committed by the sink. Intake thread only."""
        self._settle()
        return self._uncommitted_bytes

    @property
    def pending_payload_bytes(self) -> int:
        """Payload bytes of records the sink holds uncommitted. Intake thread only."""
        self._settle()
        return self._pending_payload_bytes

    def _settle(self) -> None:
        committed = self._committed_lsn()
        pending = self._uncommitted
        while pending and pending[0][0] <= committed:
            _, frames, payload = pending.popleft()
            self._uncommitted_bytes -= frames
            self._pending_payload_bytes -= payload

    def _count_logged(self, last_lsn: int, entries: list[tuple[int, str, bytes]]) -> None:
        # The frame sizes the log wrote (topics are ASCII in HM's scheme, so len() is their UTF-8
        # length; a non-ASCII topic is undercounted by a few bytes, which the cap can afford).
        payload = sum(len(p) for _, _, p in entries)
        size = payload + sum(HEADER.size + len(topic) for _, topic, _ in entries)
        self._uncommitted.append((last_lsn, size, payload))
        self._uncommitted_bytes += size
        self._pending_payload_bytes += payload

    def _append_when_possible(
        self, entries: list[tuple[int, str, bytes]], stop: threading.Event
    ) -> int | None:
        retry_s = POLL_S
        while not stop.is_set() or not self._paused:
            why = self._cap_reached()
            if why is not None:
                self._set_paused(True, why)
                self.heartbeat = time.monotonic()
                if stop.wait(POLL_S):
                    return None
                continue
            try:
                first_lsn, last_lsn = self._wal.append_batch(entries)
            except LogError as exc:
                self.last_write_error = str(exc)
                self._set_paused(True, f"log write failed: {exc}", flow_control=False)
                self.heartbeat = time.monotonic()
                if stop.wait(retry_s):
                    return None
                retry_s = min(retry_s * 2, WRITE_RETRY_MAX_S)
                continue
            self.last_write_error = None
            self._count_logged(last_lsn, entries)
            self._set_paused(False, "")
            return first_lsn
        return None

    def _cap_reached(self) -> str | None:
        """Why logging must wait (a cap is reached), or None. Paused, it waits for 80 %."""
        scale = RESUME_FRACTION if self._paused else 1.0
        size = self.uncommitted_bytes
        if size >= self._limits.max_log_bytes * scale:
            return f"log holds {size} uncommitted bytes, cap reached"
        if self._sink_backlog is not None:
            queued = self._sink_backlog()
            if queued >= SINK_BACKLOG_RECORDS:
                return f"the sink has {queued} records queued: it is behind"
        limit = self._limits.max_pending_payload_bytes
        if limit is not None and self._pending_payload_bytes >= limit * scale:
            return (
                f"the sink holds {self._pending_payload_bytes} payload bytes not yet committed "
                f"(limit {limit}): it is behind"
            )
        return None

    def _set_paused(self, paused: bool, why: str, *, flow_control: bool = True) -> None:
        """Pause or resume acks. A pause for ``flow_control`` (a cap reached) is logged at most
        every PAUSE_LOG_INTERVAL_S; any other (the log unwritable) is always logged."""
        if paused == self._paused:
            return
        self._paused = paused
        self._metrics.backpressure.set(1 if paused else 0)
        if not paused:
            if self._pause_is_logged:
                self._pause_is_logged = False
                log.info("acknowledgements resumed")
            return
        now = time.monotonic()
        logged_at = self._pause_logged_at
        if flow_control and logged_at is not None and now - logged_at < PAUSE_LOG_INTERVAL_S:
            self._pauses_not_logged += 1
            return
        left_out = self._pauses_not_logged
        log.warning(
            "acknowledgements paused: %s; the broker keeps unacknowledged messages queued "
            "(make sure its max_queued_messages is large enough)%s",
            why,
            f"; {left_out} more pause(s) since the last such line, not logged" if left_out else "",
        )
        self._pause_logged_at = now
        self._pauses_not_logged = 0
        self._pause_is_logged = True
