"""Intake: received message → write-ahead log (group commit) → PUBACK in receipt order → sink.

This is the only place that decides when the broker may forget a message, so its rules are the
product's promise:

* A PUBACK is sent only after the message's log record is durable (fsynced, or written to the
  page cache in ``write`` durability).
* PUBACKs go out in receipt order: messages are logged in the order paho delivered them and acked
  in that same order ([MQTT-4.6.0-2]).
* Acks never wait for Parquet. The broker's in-flight window (20 on Mosquitto by default) would
  otherwise stall the stream for a whole flush interval. The log absorbs the difference.
* When the log holds ``max_log_bytes`` (the sink cannot keep up or cannot write), or the log
  itself cannot be written (disk full), intake stops writing and acking. The broker stops
  sending once its in-flight window is full and keeps the rest queued, so memory stays bounded by
  that window. Intake resumes by itself when the log shrinks or the disk has room again.

paho calls :meth:`Intake.submit` on its network thread; everything else runs on the intake thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ingest.errors import LogError
from ingest.metrics import Metrics
from ingest.mqtt import Delivery
from ingest.wal import LogRecord, WriteAheadLog

log = logging.getLogger("ingest.intake")

# One group commit takes whatever has queued up since the last fsync, up to this many messages:
# large enough to amortise the fsync (~1-5 ms) at 20k msg/s, small enough to keep ack latency low.
MAX_GROUP = 4096
# How often a waiting intake thread re-checks for shutdown.
POLL_S = 0.1
# After the cap is hit, wait until the log is this fraction of the cap before resuming, so intake
# does not flap between paused and running on every released segment.
RESUME_FRACTION = 0.8
# Retry a failed log write (disk full) at most this often.
WRITE_RETRY_MAX_S = 5.0

_Received = tuple[int, str, bytes, Delivery]


@dataclass(frozen=True, slots=True)
class IntakeLimits:
    max_log_bytes: int


class Intake:
    """Owns the write-ahead log's append side and the acknowledgement of every message."""

    def __init__(
        self,
        wal: WriteAheadLog,
        *,
        ack: Callable[[Delivery], bool],
        deliver: Callable[[list[LogRecord]], None],
        limits: IntakeLimits,
        metrics: Metrics,
        now_us: Callable[[], int] = lambda: time.time_ns() // 1000,
    ) -> None:
        self._wal = wal
        self._ack = ack
        self._deliver = deliver
        self._limits = limits
        self._metrics = metrics
        self._now_us = now_us
        self._queue: queue.SimpleQueue[_Received] = queue.SimpleQueue()
        self._accepting = True
        self._paused = False
        self.heartbeat = time.monotonic()

    # -- paho's network thread ------------------------------------------------------------------
    def submit(self, topic: str, payload: bytes, delivery: Delivery) -> None:
        """Queue one received message. Never blocks: paho must keep reading the socket."""
        if not self._accepting:
            # Shutting down: leave it unacknowledged; the broker redelivers it next session.
            return
        self._metrics.messages_received.inc()
        self._metrics.messages_unacked.inc()
        self._queue.put((self._now_us(), topic, payload, delivery))

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
            group = self._take_group()
            if not group:
                if stop.is_set():
                    return
                continue
            if not self._commit(group, stop):
                # Stopped while paused: the group stays unacknowledged and the broker keeps it.
                self._metrics.messages_unacked.dec(len(group))
                return

    def _take_group(self) -> list[_Received]:
        try:
            group = [self._queue.get(timeout=POLL_S)]
        except queue.Empty:
            return []
        get = self._queue.get_nowait
        try:
            while len(group) < MAX_GROUP:
                group.append(get())
        except queue.Empty:
            pass
        return group

    def _commit(self, group: list[_Received], stop: threading.Event) -> bool:
        """Make ``group`` durable, then ack it. False when stopped before it could be logged."""
        entries = [(received_at, topic, payload) for received_at, topic, payload, _ in group]
        first_lsn = self._append_when_possible(entries, stop)
        if first_lsn is None:
            return False
        sent = 0
        for _, _, _, delivery in group:
            if self._ack(delivery):
                sent += 1
        self._metrics.messages_acked.inc(sent)
        self._metrics.messages_unacked.dec(len(group))
        self._deliver(
            [
                LogRecord(first_lsn + offset, received_at, topic, payload)
                for offset, (received_at, topic, payload) in enumerate(entries)
            ]
        )
        self._metrics.log_bytes.set(self._wal.size_bytes)
        self._metrics.log_segments.set(self._wal.segment_count)
        return True

    def _append_when_possible(
        self, entries: list[tuple[int, str, bytes]], stop: threading.Event
    ) -> int | None:
        retry_s = POLL_S
        while not stop.is_set() or not self._paused:
            if self._over_cap():
                self._set_paused(True, f"log holds {self._wal.size_bytes} bytes, cap reached")
                self.heartbeat = time.monotonic()
                if stop.wait(POLL_S):
                    return None
                continue
            try:
                first_lsn, _ = self._wal.append_batch(entries)
            except LogError as exc:
                self._set_paused(True, f"log write failed: {exc}")
                self.heartbeat = time.monotonic()
                if stop.wait(retry_s):
                    return None
                retry_s = min(retry_s * 2, WRITE_RETRY_MAX_S)
                continue
            self._set_paused(False, "")
            return first_lsn
        return None

    def _over_cap(self) -> bool:
        size = self._wal.size_bytes
        limit = self._limits.max_log_bytes
        return size >= (limit * RESUME_FRACTION if self._paused else limit)

    def _set_paused(self, paused: bool, why: str) -> None:
        if paused == self._paused:
            return
        self._paused = paused
        self._metrics.backpressure.set(1 if paused else 0)
        if paused:
            log.warning(
                "acknowledgements paused: %s; the broker keeps unacknowledged messages queued "
                "(make sure its max_queued_messages is large enough)",
                why,
            )
        else:
            log.warning("acknowledgements resumed")
