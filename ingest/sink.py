"""Sink: logged records → decoded, deduplicated rows → Parquet, then the log is released.

Commit protocol for one batch of records ``[first, last]`` (see :mod:`ingest.checkpoint`)::

    checkpoint.begin(first, last)      intent is durable before any file exists
    write telemetry/ and rejected/     files named part-<first>-<last>.parquet, tmp+fsync+rename
    tables.append(first, last, files)  optional (ingest.iceberg): one snapshot per table
    dedupe.record(keys)                message ids remembered with the lsn that first wrote them
    checkpoint.commit(last)            the batch is done
    events.committed(report)           the log's owner deletes segments wholly at or below
                                       ``last`` (SinkMetrics); metrics count the batch

A crash anywhere in there leaves either no intent (nothing was written: replay batches freely) or
an intent, which start-up replays as exactly the same range; the replay first removes whatever
files the interrupted attempt left and then writes the same names again. Dedupe decisions depend
only on keys seen at *smaller* lsns, so a replay decides exactly as the first attempt did.

With table appends (Iceberg), a replayed intent first asks each table whether the interrupted
attempt's append landed. Where it did, that table's files are left as they are (they are complete,
and the table references them: removing and rewriting them would pull them out from under readers)
and not appended again; the other tables' files are rewritten and appended as usual.

The sink never touches the log itself: records come in through :meth:`Sink.submit` (and
:meth:`Sink.replay`), and what follows a commit goes out through :class:`SinkEvents`. So the same
class runs on a thread of the daemon (``[ingest] sink = "thread"``) or in a process of its own
(``"process"``, :mod:`ingest.sink_process`), where the events travel back over a pipe.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import pyarrow as pa

from ingest.batch import Clearances, PendingBatch, dedupe_key
from ingest.checkpoint import Checkpoint, CheckpointStore
from ingest.decode import Decoder
from ingest.dedupe import DedupeIndex
from ingest.errors import IngestError, SinkError
from ingest.metrics import Metrics
from ingest.parquet import PartitionedWriter, WrittenFile
from ingest.testing import faultpoints
from ingest.wal import LogRecord, WriteAheadLog

# What intake hands over per logged group: its first lsn and (received_at_us, topic, payload)
# of each record, in lsn order. Plain tuples: cheap to build on the intake thread and to pickle
# to a sink process.
LoggedGroup = tuple[int, list[tuple[int, str, bytes]]]
# The VINs refused when a group was submitted (None: no clearance gate), per run of records.
_Refusals = tuple[int, frozenset[str] | None]
# A logged group in the sink's queue, with the VINs refused when it was submitted.
_JudgedGroup = tuple[int, list[tuple[int, str, bytes]], frozenset[str] | None]

log = logging.getLogger("ingest.sink")

POLL_S = 0.1
# Records decoded per dedupe-index lookup during replay.
REPLAY_CHUNK = 4096
# Live, groups are gathered into chunks of up to this many records, waiting at most GATHER_S
# for them (see Sink._gather).
GATHER_RECORDS = REPLAY_CHUNK
GATHER_S = 0.05
# The index holds days of ids; pruning it hourly keeps it bounded at negligible cost.
PRUNE_EVERY_S = 3600.0
FLUSH_RETRY_MAX_S = 30.0


class BatchTables(Protocol):
    """Table formats that record each committed batch too (:class:`ingest.iceberg` tables)."""

    def holds(self, table: str, first_lsn: int, last_lsn: int) -> bool:
        """Whether ``table`` already holds exactly this batch (asked for replayed intents)."""

    def append(
        self, first_lsn: int, last_lsn: int, files: Mapping[str, Sequence[WrittenFile]]
    ) -> None:
        """Record the batch's files, per table; a table that holds the batch is skipped."""

    def close(self) -> None:
        """Release connections (the catalog's)."""


@dataclass(frozen=True, slots=True)
class CommitReport:
    """What one committed batch wrote: enough for metrics and for releasing the log."""

    first_lsn: int
    last_lsn: int
    files: tuple[tuple[str, int, int], ...]  # (table, rows, bytes) of each file written
    rejected_by_reason: Mapping[str, int]
    duplicates: int
    unknown_properties: int
    duration_s: float


class SinkEvents(Protocol):
    """What the sink reports. Called on the sink's thread; must not raise."""

    def committed(self, report: CommitReport) -> None:
        """A batch is committed: its log records may be released."""

    def flush_failed(self) -> None:
        """A commit attempt failed and will be retried."""

    def took_records(self, count: int) -> None:
        """The sink took ``count`` submitted records off its queue."""

    def oldest_uncommitted(self, age_s: float) -> None:
        """Age of the oldest record received and not committed yet (0: none)."""


class SinkMetrics:
    """:class:`SinkEvents` in the daemon: count in Prometheus, release the log after commits."""

    def __init__(self, metrics: Metrics, wal: WriteAheadLog) -> None:
        self._metrics = metrics
        self._wal = wal

    def committed(self, report: CommitReport) -> None:
        # The batch is committed: a failure here must not fail it (the retry would begin() a
        # batch at or below committed_lsn). What is not released now is after the next commit.
        try:
            self._wal.release_through(report.last_lsn)
        except IngestError as exc:
            log.warning(
                "after committing lsn %d..%d: %s; retried after the next commit",
                report.first_lsn,
                report.last_lsn,
                exc,
            )
        metrics = self._metrics
        for table, rows, size in report.files:
            metrics.rows_written.labels(table).inc(rows)
            metrics.files_committed.labels(table).inc()
            metrics.bytes_written.labels(table).inc(size)
        for reason, count in report.rejected_by_reason.items():
            metrics.messages_rejected.labels(reason).inc(count)
        metrics.duplicates.inc(report.duplicates)
        metrics.unknown_properties.inc(report.unknown_properties)
        metrics.last_commit_time.set(time.time())
        metrics.log_bytes.set(self._wal.size_bytes)
        metrics.log_segments.set(self._wal.segment_count)
        metrics.flush_duration.observe(report.duration_s)

    def flush_failed(self) -> None:
        self._metrics.flush_failures.inc()

    def took_records(self, count: int) -> None:
        pass  # the thread sink counts what it took itself (Sink.queued_records)

    def oldest_uncommitted(self, age_s: float) -> None:
        self._metrics.log_oldest_uncommitted_age.set(age_s)


@dataclass(frozen=True, slots=True)
class FlushPolicy:
    max_rows: int
    max_bytes: int
    max_age_s: float


class Sink:
    """Runs on its own thread; the intake thread feeds it through :meth:`submit`."""

    def __init__(
        self,
        *,
        checkpoints: CheckpointStore,
        dedupe: DedupeIndex,
        telemetry: PartitionedWriter,
        rejected: PartitionedWriter,
        decoder: Decoder,
        policy: FlushPolicy,
        events: SinkEvents,
        tables: BatchTables | None = None,
    ) -> None:
        self._checkpoints = checkpoints
        self._dedupe = dedupe
        self._telemetry = telemetry
        self._rejected = rejected
        self._decoder = decoder
        self._policy = policy
        self._events = events
        self._clearances: Clearances | None = None
        self._tables = tables
        self._queue: queue.SimpleQueue[_JudgedGroup] = queue.SimpleQueue()
        self._submitted_records = 0
        self._taken_records = 0
        self._carried: _JudgedGroup | None = None  # taken off the queue, next chunk's first
        self._batch: PendingBatch | None = None
        self.committed_lsn = 0
        self.heartbeat = time.monotonic()
        self.last_error: str | None = None
        self._last_prune = 0.0

    def set_clearances(self, clearances: Clearances | None) -> None:
        """Judge each message's VIN by ``clearances`` from now on (None: let every VIN through)."""
        self._clearances = clearances

    def close(self) -> None:
        """Release what the sink holds open besides the log and index (the tables' catalog)."""
        if self._tables is not None:
            self._tables.close()

    # -- start-up ---------------------------------------------------------------------------------
    def replay(self, checkpoint: Checkpoint, records: Iterable[LogRecord]) -> int:
        """Re-process ``records`` (the log from ``checkpoint.committed_lsn + 1`` on), before live
        traffic starts.

        A pending intent is replayed as exactly its range and committed; later records start the
        next batch, which then continues with live traffic. Returns the number of records replayed.
        """
        self.committed_lsn = checkpoint.committed_lsn
        for root_writer in (self._telemetry, self._rejected):
            removed = root_writer.remove_temporaries()
            if removed:
                log.info("removed %d temporary file(s) left by an interrupted write", removed)
        replayed = 0
        pending = checkpoint.pending
        chunk: list[LogRecord] = []
        for record in records:
            if not replayed and record.lsn != checkpoint.committed_lsn + 1:
                # LSNs are consecutive from the checkpoint on: a gap means logged (and so
                # acknowledged) records are gone. Replaying from here would lose them silently.
                raise SinkError(
                    f"the log resumes at lsn {record.lsn} but everything after lsn "
                    f"{checkpoint.committed_lsn} must still be in it: records "
                    f"{checkpoint.committed_lsn + 1}..{record.lsn - 1} are missing; restore the "
                    f"log folder from a backup, or accept the loss by moving the checkpoint on",
                    retriable=False,
                )
            chunk.append(record)
            replayed += 1
            if pending is not None and record.lsn == pending.last_lsn:
                self._add_chunk(chunk)
                chunk = []
                self._flush_until_done(replaying_intent=True, stop=None)
                pending = None
            elif len(chunk) >= REPLAY_CHUNK:
                self._add_chunk(chunk)
                chunk = []
                if pending is None and self._due():
                    self._flush_until_done(replaying_intent=False, stop=None)
        self._add_chunk(chunk)
        if pending is not None:
            raise SinkError(
                f"checkpoint names a pending batch {pending.first_lsn}..{pending.last_lsn} but the "
                f"log ends before it; the log folder was truncated or replaced",
                retriable=False,
            )
        if replayed:
            log.info("replayed %d logged record(s) after lsn %d", replayed, self.committed_lsn)
        return replayed

    def commit_pending(self) -> None:
        """Commit the batch replay left open (a sink handing over to another one, say)."""
        self._flush_until_done(replaying_intent=False, stop=None)

    # -- intake thread ----------------------------------------------------------------------------
    def submit(self, first_lsn: int, entries: list[tuple[int, str, bytes]]) -> None:
        """Hand over one logged group: records ``first_lsn``, ``first_lsn + 1``, ... in order.

        The group is judged by the clearance state of now, not of when the sink gets to it: a
        revocation that lands while the group waits in the queue (or in a gathered chunk) does
        not reach back to messages received before it.
        """
        clearances = self._clearances
        refused = clearances.refused_vins if clearances is not None else None
        self._submitted_records += len(entries)
        self._queue.put((first_lsn, entries, refused))

    @property
    def queued_records(self) -> int:
        """Logged records handed over but not yet taken up: intake pauses when too many wait."""
        # Each counter has one writer (intake's thread, the sink's): a stale read is only a
        # moment late.
        return self._submitted_records - self._taken_records

    # -- sink thread ------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Decode and commit until ``stop`` is set, then drain the queue and commit the rest."""
        while True:
            self.heartbeat = time.monotonic()
            records, refusals = self._gather()
            if not records and stop.is_set():
                self._flush_until_done(replaying_intent=False, stop=None)
                return
            self._add_chunk(records, refusals)
            if self._due():
                self._flush_until_done(replaying_intent=False, stop=stop)
                if self._batch is not None:
                    # Stopped while the output was unwritable: what is pending stays in the log
                    # for the next start. Taking more records would extend the batch whose
                    # intent is already recorded, which begin() refuses.
                    return
            self._publish_age()

    def _gather(self) -> tuple[list[LogRecord], list[_Refusals]]:
        """The next submitted groups as one chunk of records ([] after POLL_S without any), with
        the clearance state each group was submitted under (:meth:`submit`).

        Waits up to GATHER_S after the first group for more, while the chunk holds fewer than
        GATHER_RECORDS (a group that would take it past them waits for the next chunk: decoded
        messages are held per chunk, and a draining daemon's groups are full already). At a few
        thousand messages a second intake hands over a group every few milliseconds; taken one
        by one, each group paid a dedupe-index query and the hand-over's fixed costs. The wait
        delays nothing but the batch (acks were sent at logging).
        """
        group = self._carried
        self._carried = None
        if group is None:
            try:
                group = self._queue.get(timeout=POLL_S)
            except queue.Empty:
                return [], []
        records = _records(group[0], group[1])
        refusals = [(len(group[1]), group[2])]
        deadline = time.monotonic() + GATHER_S
        while len(records) < GATHER_RECORDS:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                group = self._queue.get(timeout=remaining)
            except queue.Empty:
                break
            if len(records) + len(group[1]) > GATHER_RECORDS:
                self._carried = group
                break
            records += _records(group[0], group[1])
            refusals.append((len(group[1]), group[2]))
        self._taken_records += len(records)
        self._events.took_records(len(records))
        return records, refusals

    def _due(self) -> bool:
        batch = self._batch
        if batch is None:
            return False
        policy = self._policy
        return (
            batch.telemetry.rows >= policy.max_rows
            or batch.payload_bytes >= policy.max_bytes
            or time.monotonic() - batch.opened_at >= policy.max_age_s
        )

    def _publish_age(self) -> None:
        batch = self._batch
        age = 0.0
        if batch is not None:
            age = max(0.0, time.time() - batch.oldest_received_us / 1e6)
        self._events.oldest_uncommitted(age)

    def _add_chunk(self, records: list[LogRecord], refusals: list[_Refusals] | None = None) -> None:
        """Decode ``records`` and add them to the pending batch, dropping repeated messages.

        A message is a repeat when its key was seen at a smaller lsn: earlier in this batch, or in
        an earlier committed batch (the dedupe index, asked once per chunk). ``refusals``: the
        refused VINs for each run of records, in order (see :meth:`submit`); None: the clearance
        state of now for all (replay).
        """
        if not records:
            return
        decode = self._decoder.decode
        decoded = [decode(r.topic, r.payload, r.received_at_us) for r in records]
        keys = [dedupe_key(d, r) for d, r in zip(decoded, records, strict=True)]
        repeats = self._dedupe.duplicates(list(zip(keys, (r.lsn for r in records), strict=True)))
        if refusals is None:
            clearances = self._clearances
            refusals = [(len(records), None if clearances is None else clearances.refused_vins)]
        position = 0
        for count, refused in refusals:
            for index in range(position, position + count):
                record = records[index]
                self._open_batch(record).add(
                    record,
                    decoded[index],
                    keys[index],
                    repeat=record.lsn in repeats,
                    refused=refused,
                )
            position += count

    def _open_batch(self, record: LogRecord) -> PendingBatch:
        """The batch ``record`` extends (a new one when none is open), checking contiguity."""
        batch = self._batch
        if batch is None:
            batch = self._batch = PendingBatch(
                first_lsn=record.lsn, oldest_received_us=record.received_at_us
            )
        elif record.lsn != batch.last_lsn + 1:
            raise SinkError(
                f"log records out of order: lsn {record.lsn} after {batch.last_lsn}",
                retriable=False,
            )
        batch.last_lsn = record.lsn
        batch.payload_bytes += len(record.payload)
        return batch

    def _flush_until_done(self, *, replaying_intent: bool, stop: threading.Event | None) -> None:
        """Commit the pending batch, retrying with backoff while the output cannot be written."""
        batch = self._batch
        if batch is None:
            return
        retry_s = 1.0
        while True:
            try:
                self._commit(batch, replaying_intent=replaying_intent)
            except IngestError as exc:
                # Not only SinkError (Parquet): the checkpoint and the dedupe index live on a disk
                # that can fill up too (LogError, retriable). Every step of _commit may be
                # repeated: begin() accepts the same intent again, files are overwritten under the
                # same names, record() keeps the earliest lsn.
                if not exc.retriable:
                    raise
                self.last_error = str(exc)
                self._events.flush_failed()
                log.warning(
                    "flush of lsn %d..%d failed, retrying in %.1f s: %s",
                    batch.first_lsn,
                    batch.last_lsn,
                    retry_s,
                    exc,
                )
                self.heartbeat = time.monotonic()
                if stop is not None and stop.wait(retry_s):
                    # Shutting down with the output unwritable: the records stay in the log and
                    # are replayed at the next start; nothing was acknowledged that is not logged.
                    return
                if stop is None:
                    time.sleep(retry_s)
                retry_s = min(retry_s * 2, FLUSH_RETRY_MAX_S)
                continue
            self.last_error = None
            self._batch = None
            return

    def _commit(self, batch: PendingBatch, *, replaying_intent: bool) -> None:
        started = time.perf_counter()
        first, last = batch.first_lsn, batch.last_lsn
        self._checkpoints.begin(first, last)
        outputs: list[tuple[PartitionedWriter, pa.Table, str, str | None]] = [
            (self._telemetry, batch.telemetry.table(), "timestamp", "received_at"),
            (self._rejected, batch.rejected.table(), "received_at", None),
        ]
        held = self._tables_holding(first, last) if replaying_intent else set()
        if replaying_intent:
            self._remove_range(first, last, keep=held)
        by_table: dict[str, list[WrittenFile]] = {}
        for writer, rows, date_column, fallback in outputs:
            if writer.table in held:
                continue
            by_table[writer.table] = writer.write(
                rows,
                first_lsn=first,
                last_lsn=last,
                date_column=date_column,
                fallback_date_column=fallback,
            )
        written = [file for files in by_table.values() for file in files]
        if faultpoints.ACTIVE:
            faultpoints.hit("sink.files_written")
        if self._tables is not None:
            # After the files (the tables reference them), before the batch is committed: a
            # crash in between replays the intent, and holds() keeps it from a second append.
            self._tables.append(first, last, by_table)
        self._dedupe.record([(key, lsn, batch.seen_at_us[key]) for key, lsn in batch.seen.items()])
        if faultpoints.ACTIVE:
            faultpoints.hit("sink.dedupe_recorded")
        self._checkpoints.commit(last)
        self.committed_lsn = last
        if faultpoints.ACTIVE:
            faultpoints.hit("sink.committed")
        # The batch is committed: nothing below may fail the commit, or the retry would begin()
        # a batch at or below committed_lsn. What is not done now is done after the next commit.
        try:
            self._prune_dedupe_index()
        except IngestError as exc:
            log.warning(
                "after committing lsn %d..%d: %s; retried after the next commit", first, last, exc
            )
        self._events.committed(
            CommitReport(
                first_lsn=first,
                last_lsn=last,
                files=tuple((writer_table(file), file.rows, file.bytes) for file in written),
                rejected_by_reason=dict(batch.rejected_by_reason),
                duplicates=batch.duplicates,
                unknown_properties=batch.unknown_properties,
                duration_s=time.perf_counter() - started,
            )
        )

    def _prune_dedupe_index(self) -> None:
        """Forget message ids past the retention, at most every PRUNE_EVERY_S.

        Only here, right after a commit: pruning while an intent is pending could change the
        decisions its replay makes (see :mod:`ingest.dedupe`).
        """
        now = time.monotonic()
        if now - self._last_prune < PRUNE_EVERY_S:
            return
        self._last_prune = now
        removed = self._dedupe.prune(time.time_ns() // 1000)
        if removed:
            log.info("dedupe index: forgot %d message id(s) past retention", removed)

    def _tables_holding(self, first: int, last: int) -> set[str]:
        """The output tables whose table-format append of this batch landed before a crash."""
        tables = self._tables
        if tables is None:
            return set()
        names = (self._telemetry.table, self._rejected.table)
        held = {name for name in names if tables.holds(name, first, last)}
        if held:
            log.info(
                "replayed lsn %d..%d is already in table(s) %s: kept as written, not appended",
                first,
                last,
                ", ".join(sorted(held)),
            )
        return held

    def _remove_range(self, first: int, last: int, *, keep: set[str]) -> None:
        """Delete the files an interrupted attempt at this exact range may have left."""
        for writer in (self._telemetry, self._rejected):
            if writer.table not in keep:
                writer.remove_batch(first, last)  # local folder or object store alike


def writer_table(file: WrittenFile) -> str:
    """The table a written file belongs to (``<root>/<table>/date=.../part-...``)."""
    return file.path.parent.parent.name


def _records(first_lsn: int, entries: list[tuple[int, str, bytes]]) -> list[LogRecord]:
    return [
        LogRecord(first_lsn + offset, received_at_us, topic, payload)
        for offset, (received_at_us, topic, payload) in enumerate(entries)
    ]
