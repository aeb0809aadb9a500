"""How logged groups reach the sink: gathered into chunks by the sink, and held and sent on
together by the daemon's side of a sink process (fewer dedupe queries, pickles and pipe writes
per message at a few thousand messages a second)."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from ingest import sink as sink_module
from ingest import sink_process as sink_process_module
from ingest.batch import REJECTED_NOT_CLEARED
from ingest.checkpoint import CheckpointStore
from ingest.decode import Decoder
from ingest.dedupe import DedupeIndex
from ingest.metrics import Metrics
from ingest.parquet import PartitionedWriter
from ingest.schemas import REJECTED, TELEMETRY
from ingest.sink import FlushPolicy, Sink, SinkEvents, SinkMetrics
from ingest.sink_process import SinkProcess
from ingest.testing.accounting import tally
from ingest.testing.daemon import APP_ID, wait_for
from ingest.testing.traffic import stream, v1_message
from ingest.wal import WriteAheadLog
from tests.daemon_support import read_table

DEADLINE_S = 30.0


class _TakenRecords(SinkMetrics):
    def __init__(self, metrics: Metrics, wal: WriteAheadLog) -> None:
        super().__init__(metrics, wal)
        self.taken: list[int] = []

    def took_records(self, count: int) -> None:
        self.taken.append(count)


def _sink(tmp_path: Path, wal: WriteAheadLog, events: SinkEvents) -> Sink:
    return Sink(
        checkpoints=CheckpointStore(tmp_path / "checkpoint.json"),
        dedupe=DedupeIndex(tmp_path / "dedupe.sqlite3"),
        telemetry=PartitionedWriter(tmp_path / "data", "telemetry", schema_name=TELEMETRY),
        rejected=PartitionedWriter(tmp_path / "data", "rejected", schema_name=REJECTED),
        decoder=Decoder(app_id=APP_ID, max_payload_bytes=1 << 20),
        policy=FlushPolicy(max_rows=1 << 30, max_bytes=1 << 30, max_age_s=0.5),
        events=events,
    )


def _run_until_committed(sink: Sink, wal: WriteAheadLog, last_lsn: int) -> None:
    """Run the sink on its thread until ``last_lsn`` is committed, then close it and the log."""
    stop = threading.Event()
    thread = threading.Thread(target=sink.run, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_for(lambda: sink.committed_lsn == last_lsn, DEADLINE_S, "the commit")
    finally:
        stop.set()
        thread.join(DEADLINE_S)
        sink.close()
        wal.close()


def _taken_while_committing_six_groups_of_ten(tmp_path: Path) -> list[int]:
    """Six logged groups of ten messages, as intake hands them over at a low rate, all queued
    before the sink looks; what the sink reported taking, once all 60 are committed once."""
    messages = list(stream(APP_ID, 60, seed=3))
    wal = WriteAheadLog.open(tmp_path / "log")
    events = _TakenRecords(Metrics(CollectorRegistry()), wal)
    sink = _sink(tmp_path, wal, events)
    for start in range(0, 60, 10):
        entries = [(1, m.topic, m.payload) for m in messages[start : start + 10]]
        first, _ = wal.append_batch(entries)
        sink.submit(first, entries)
    assert sink.queued_records == 60
    _run_until_committed(sink, wal, 60)
    assert sink.queued_records == 0
    assert tally(tmp_path / "data", [m.message_id for m in messages]).ok
    return events.taken


def test_groups_waiting_together_are_taken_as_one_chunk(tmp_path: Path) -> None:
    assert _taken_while_committing_six_groups_of_ten(tmp_path) == [60]


def test_a_chunk_stops_growing_at_gather_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sink_module, "GATHER_RECORDS", 25)
    # Whole groups, at most 25 records: a group that would take a chunk past them starts the
    # next one.
    assert _taken_while_committing_six_groups_of_ten(tmp_path) == [20, 20, 20]


def _pipe_pair() -> tuple[Connection, Connection]:
    """(the writing end, the reading end) of a pipe carrying multiprocessing messages."""
    read_fd, write_fd = os.pipe()
    return Connection(write_fd, readable=False), Connection(read_fd, writable=False)


def test_the_daemon_side_holds_small_groups_and_sends_them_on_as_one_message() -> None:
    inbox, sink_reads = _pipe_pair()
    reports_written, reports = _pipe_pair()
    process = subprocess.Popen([sys.executable, "-c", "pass"])  # only its exit code is asked
    process.wait(DEADLINE_S)
    handle = SinkProcess(process, inbox, reports)
    try:
        handle.submit(1, [(1, "t", b"a"), (1, "t", b"b")])
        handle.submit(3, [(2, "t", b"c")])
        # Held: nothing in the pipe yet, yet counted as queued (intake's back-pressure).
        assert not sink_reads.poll(0.05)
        assert handle.queued_records == 3
        # A clearance change goes after the records logged before it.
        handle._send(("refused", frozenset({"VIN1"})))
        assert sink_reads.recv() == ("records", 1, [(1, "t", b"a"), (1, "t", b"b"), (2, "t", b"c")])
        assert sink_reads.recv() == ("refused", frozenset({"VIN1"}))
        # HANDOVER_RECORDS reached: sent at once by the submitting thread.
        big = [(3, "t", b"x")] * sink_process_module.HANDOVER_RECORDS
        handle.submit(4, big)
        assert sink_reads.poll(DEADLINE_S)
        assert sink_reads.recv() == ("records", 4, big)
    finally:
        inbox.close()
        sink_reads.close()
        reports_written.close()
        reports.close()


class _Refused:
    """A clearance gate whose refused VINs the test swaps, as ClearanceStateStore does."""

    def __init__(self) -> None:
        self.refused_vins: frozenset[str] = frozenset()


def test_a_group_is_judged_by_the_clearances_of_when_it_was_submitted(tmp_path: Path) -> None:
    """A revocation that lands while a logged group waits for the sink does not reach back to
    messages received before it; the groups submitted after it are refused."""
    vin = "SBXHANDOVER000001"
    base = dt.datetime.now(dt.UTC).replace(microsecond=0)
    before = [v1_message(APP_ID, vin, f"before-{i}", i, base) for i in range(3)]
    after = [v1_message(APP_ID, vin, f"after-{i}", 10 + i, base) for i in range(3)]
    wal = WriteAheadLog.open(tmp_path / "log")
    sink = _sink(tmp_path, wal, SinkMetrics(Metrics(CollectorRegistry()), wal))
    gate = _Refused()
    sink.set_clearances(gate)
    for group, refused in ((before, frozenset()), (after, frozenset({vin}))):
        gate.refused_vins = refused
        entries = [(1, m.topic, m.payload) for m in group]
        first, _ = wal.append_batch(entries)
        sink.submit(first, entries)
    # Both groups wait in the queue and are gathered into one chunk under the new state.
    _run_until_committed(sink, wal, 6)
    telemetry = {row["message_id"] for row in read_table(tmp_path / "data", "telemetry")}
    rejected = {
        row["message_id"]: row["reason"] for row in read_table(tmp_path / "data", "rejected")
    }
    assert telemetry == {f"before-{i}" for i in range(3)}
    assert rejected == {f"after-{i}": REJECTED_NOT_CLEARED for i in range(3)}
