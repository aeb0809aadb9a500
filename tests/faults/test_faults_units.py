"""Fast checks of the fault tooling (proxy, fault points, accounting) and regression tests for the
bugs the fault suite found (sink on a full state disk, decoder on deeply nested values)."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from prometheus_client import CollectorRegistry

from ingest import wal as wal_module
from ingest.checkpoint import Checkpoint, CheckpointStore
from ingest.decode import Decoder
from ingest.dedupe import DedupeIndex
from ingest.errors import LogError, SinkError
from ingest.metrics import Metrics
from ingest.parquet import PartitionedWriter
from ingest.schemas import REJECTED, TELEMETRY, arrow_schema
from ingest.sink import FlushPolicy, Sink, SinkMetrics
from ingest.testing.accounting import tally
from ingest.testing.daemon import APP_ID, wait_for
from ingest.testing.faultpoints import CRASH_ENV, POINTS
from ingest.testing.proxy import FaultyProxy
from ingest.testing.traffic import stream
from ingest.wal import WriteAheadLog
from tests.faults.hostile import FAMILIES, hostile_corpus

# -- the proxy ------------------------------------------------------------------------------------


@pytest.fixture
def echo_server() -> Iterator[int]:
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            threading.Thread(target=_echo, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    server.close()


def _echo(conn: socket.socket) -> None:
    with conn:
        try:
            while data := conn.recv(4096):
                conn.sendall(data)
        except OSError:
            pass


def _client(port: int) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", port), timeout=5)
    conn.sendall(b"ping")
    assert conn.recv(16) == b"ping"
    return conn


def test_proxy_forwards_and_drops_with_fin(echo_server: int) -> None:
    with FaultyProxy("127.0.0.1", echo_server) as proxy:
        conn = _client(proxy.port)
        assert proxy.drop_all() == 1
        assert conn.recv(16) == b""  # orderly close
        conn.close()
        _client(proxy.port).close()  # new connections still pass


def test_proxy_reset_sends_rst(echo_server: int) -> None:
    with FaultyProxy("127.0.0.1", echo_server) as proxy:
        conn = _client(proxy.port)
        assert proxy.reset_all() == 1
        with pytest.raises(ConnectionResetError):
            conn.recv(16)
        conn.close()


def test_proxy_freeze_holds_bytes_until_thaw(echo_server: int) -> None:
    with FaultyProxy("127.0.0.1", echo_server) as proxy:
        conn = _client(proxy.port)
        proxy.freeze()
        conn.sendall(b"held")
        conn.settimeout(0.5)
        with pytest.raises(TimeoutError):
            conn.recv(16)
        proxy.thaw()
        conn.settimeout(5)
        assert conn.recv(16) == b"held"
        conn.close()


def test_proxy_refuses_new_connections_while_told(echo_server: int) -> None:
    with FaultyProxy("127.0.0.1", echo_server) as proxy:
        proxy.refuse(True)
        conn = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        assert conn.recv(16) == b""
        conn.close()
        proxy.refuse(False)
        _client(proxy.port).close()


# -- fault points -----------------------------------------------------------------------------


def test_crash_point_kills_the_process_on_the_nth_pass() -> None:
    code = (
        "from ingest.testing import faultpoints\n"
        "for n in range(1, 4):\n"
        "    print(n, flush=True)\n"
        "    faultpoints.hit('sink.committed')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={CRASH_ENV: "sink.committed:2", "PATH": ""},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == -9
    assert result.stdout.split() == ["1", "2"]


def test_no_fault_environment_means_inactive() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "from ingest.testing import faultpoints; print(faultpoints.ACTIVE)"],
        env={"PATH": ""},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert result.stdout.strip() == "False"


def test_unknown_crash_point_is_refused() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import ingest.testing.faultpoints"],
        env={CRASH_ENV: "nowhere:1", "PATH": ""},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode != 0
    assert "must be <point>:<n>" in result.stderr
    assert all(point in result.stderr for point in POINTS)


# -- accounting ---------------------------------------------------------------------------------


def _write_telemetry(output: Path, name: str, ids: list[str]) -> None:
    schema = arrow_schema(TELEMETRY)
    folder = output / "telemetry" / "date=2026-11-28"
    folder.mkdir(parents=True, exist_ok=True)
    columns = {f.name: pa.nulls(len(ids), f.type) for f in schema}
    columns["message_id"] = pa.array(ids, pa.string())
    columns["item_index"] = pa.array([0] * len(ids), pa.int32())
    pq.write_table(pa.table(columns), folder / name)


def test_accounting_finds_lost_and_duplicated_messages(tmp_path: Path) -> None:
    _write_telemetry(tmp_path, "part-1-2.parquet", ["a", "b"])
    _write_telemetry(tmp_path, "part-3-4.parquet", ["b", "c"])  # b again: a duplicate
    result = tally(tmp_path, ["a", "b", "c", "d"])  # d never written: lost
    assert (result.lost, result.duplicated) == (1, 1)
    assert result.lost_examples == ("d",)
    assert result.duplicated_examples == ("b",)
    assert not result.ok


def test_accounting_reads_ids_from_rejected_payloads(tmp_path: Path) -> None:
    folder = tmp_path / "rejected" / "date=2026-11-28"
    folder.mkdir(parents=True)
    schema = arrow_schema(REJECTED)
    rows = {f.name: pa.nulls(1, f.type) for f in schema}
    rows["message_id"] = pa.array([None], pa.string())
    rows["reason"] = pa.array(["invalid_utf8"])
    rows["detail"] = pa.array(["x"])
    rows["payload"] = pa.array([b'\xff{"message_id":"h-1"'], pa.binary())
    pq.write_table(pa.table(rows), folder / "part-1-1.parquet")
    result = tally(tmp_path, ["h-1"])
    assert (result.quarantined, result.lost, result.duplicated) == (1, 0, 0)


# -- regressions ----------------------------------------------------------------------------------


class _FullDiskCheckpoints(CheckpointStore):
    """The state disk is full for the first ``failures`` checkpoint writes."""

    def __init__(self, path: Path, failures: int) -> None:
        super().__init__(path)
        self.failures = failures

    def begin(self, first_lsn: int, last_lsn: int) -> None:
        if self.failures:
            self.failures -= 1
            raise LogError(f"could not write checkpoint {self.path}: No space left on device")
        super().begin(first_lsn, last_lsn)


def test_sink_retries_when_the_checkpoint_cannot_be_written(tmp_path: Path) -> None:
    """Found by scenario 4 (state on a full disk): a checkpoint write failing with ENOSPC ended
    the sink thread, and with it the daemon (exit 1), instead of retrying like a Parquet write."""
    messages = list(stream(APP_ID, 20, seed=1))
    wal = WriteAheadLog.open(tmp_path / "log")
    checkpoints = _FullDiskCheckpoints(tmp_path / "checkpoint.json", failures=1)
    dedupe = DedupeIndex(tmp_path / "dedupe.sqlite3")
    sink = Sink(
        checkpoints=checkpoints,
        dedupe=dedupe,
        telemetry=PartitionedWriter(tmp_path / "data", "telemetry", schema_name=TELEMETRY),
        rejected=PartitionedWriter(tmp_path / "data", "rejected", schema_name=REJECTED),
        decoder=Decoder(app_id=APP_ID, max_payload_bytes=1 << 20),
        policy=FlushPolicy(max_rows=1, max_bytes=1 << 30, max_age_s=3600),
        events=SinkMetrics(Metrics(CollectorRegistry()), wal),
    )
    first, _ = wal.append_batch([(1, m.topic, m.payload) for m in messages])
    sink.submit(first, [(1, m.topic, m.payload) for m in messages])
    stop = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            sink.run(stop)
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: bool(failure) or sink.committed_lsn == len(messages), 30, "the commit")
    finally:
        stop.set()
        thread.join(30)
        dedupe.close()
        wal.close()
    assert not failure, f"sink thread died: {failure[0]!r}"
    assert checkpoints.load().committed_lsn == len(messages)
    assert tally(tmp_path / "data", [m.message_id for m in messages]).ok


@pytest.mark.parametrize("field", ["data", "availability"])
def test_deeply_nested_item_values_are_malformed_items_not_decoder_errors(field: str) -> None:
    """Found by scenario 6: JSON that parses (orjson reads 1024 levels) but is too deep to store
    as JSON text (orjson writes 254) was quarantined as ``decoder_error``, "a bug"."""
    nested = b'{"a":' * 300 + b"1" + b"}" * 300
    item = (
        b'{"data":1,"availability":' + nested + b"}"
        if field == "availability"
        else b'{"data":' + nested + b"}"
    )
    vin = "WHMTESTV000000001"
    payload = (
        b'{"version":1,"message_id":"m","vin":"' + vin.encode() + b'",'
        b'"data":{"diagnostics":{"odometer":' + item + b"}}}"
    )
    topic = f"live/level13/{APP_ID}/{vin}/diagnostics/get/odometer"
    decoded = Decoder(app_id=APP_ID, max_payload_bytes=1 << 20).decode(topic, payload, 0)
    assert decoded.rejection is not None
    assert decoded.rejection.reason == "malformed_item"
    assert f"odometer.{field}: nested more than 254 levels deep" in decoded.rejection.detail


def test_every_hostile_family_is_rejected_by_the_decoder() -> None:
    """The corpus of scenario 6 really is hostile: each family is quarantined, with a reason."""
    decoder = Decoder(app_id=APP_ID, max_payload_bytes=1 << 20)
    corpus = hostile_corpus(len(FAMILIES) * 2, big=1)
    for message in corpus:
        decoded = decoder.decode(message.topic, message.payload, 0)
        assert decoded.rejection is not None, message.payload[:200]
        assert decoded.rejection.reason != "decoder_error", decoded.rejection.detail


def test_release_during_a_spilling_append_keeps_the_segment_being_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by scenario 1 (20 kills): the sink released the log while the intake thread was
    appending a group that spilled into a new segment. The new segment was already listed and the
    older one's last_lsn not yet updated, so the older one was deleted with acknowledged records
    being written into it; a crash before their commit then lost them (or left a pending batch
    whose records were gone, and the daemon could not start)."""
    wal = WriteAheadLog.open(tmp_path / "log", segment_bytes=4096)
    payload = b"x" * 300
    first, committed = wal.append_batch([(1, "t", payload)] * 3)  # lsn 1..3, commit through 3
    real_write_all = wal_module._write_all
    released: list[int] = []

    def write_then_race(fd: int, data: bytes) -> None:
        real_write_all(fd, data)
        if not released and wal.segment_count > 1:
            # The group now spans two segments: release what the sink has committed, from the
            # sink's thread, while this append is still in progress.
            sink = threading.Thread(target=lambda: released.append(wal.release_through(committed)))
            sink.start()
            sink.join(0.5)  # fixed: it waits for this append to finish

    monkeypatch.setattr(wal_module, "_write_all", write_then_race)
    start, last = wal.append_batch([(2, "t", payload)] * 20)  # spills into new segments
    monkeypatch.undo()
    wait_for(lambda: bool(released), 5, "the release to finish")
    lsns = [record.lsn for record in wal.read_from(first)]
    wal.close()
    missing = sorted(set(range(committed + 1, last + 1)) - set(lsns))
    assert not missing, f"uncommitted records deleted from the log: {missing}"
    assert start == committed + 1


def test_replay_refuses_a_log_with_records_missing_after_the_checkpoint(tmp_path: Path) -> None:
    """What the release race left behind: without this check the sink replayed from the first
    record it found, and the acknowledged records before it were lost without a word."""
    messages = list(stream(APP_ID, 5, seed=2))
    wal = WriteAheadLog.open(tmp_path / "log", min_next_lsn=4)  # as if lsn 1..3 were deleted
    wal.append_batch([(1, m.topic, m.payload) for m in messages])
    dedupe = DedupeIndex(tmp_path / "dedupe.sqlite3")
    sink = Sink(
        checkpoints=CheckpointStore(tmp_path / "checkpoint.json"),
        dedupe=dedupe,
        telemetry=PartitionedWriter(tmp_path / "data", "telemetry", schema_name=TELEMETRY),
        rejected=PartitionedWriter(tmp_path / "data", "rejected", schema_name=REJECTED),
        decoder=Decoder(app_id=APP_ID, max_payload_bytes=1 << 20),
        policy=FlushPolicy(max_rows=1, max_bytes=1 << 30, max_age_s=3600),
        events=SinkMetrics(Metrics(CollectorRegistry()), wal),
    )
    try:
        with pytest.raises(SinkError, match=r"records 1\.\.3 are missing"):
            sink.replay(Checkpoint(committed_lsn=0), wal.read_from(1))
    finally:
        dedupe.close()
        wal.close()
