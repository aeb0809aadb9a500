"""The storage half of the daemon: the write-ahead log and the sink, opened and replayed.

The log (append side) always lives in the daemon's process: intake writes it and acknowledges
from it. The sink (decode, dedupe, Parquet, checkpoint) runs either on a thread of the daemon
(``[ingest] sink = "thread"``) or in a process of its own (``"process"``,
:mod:`ingest.sink_process`), which takes its Python work off the daemon's GIL. Either way start-up
is the same: the log is recovered and everything logged after the checkpoint replayed here, by a
sink on this thread; a sink process then takes over from the committed state.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from ingest.checkpoint import Checkpoint, CheckpointStore
from ingest.config import Settings
from ingest.decode import Decoder
from ingest.dedupe import DEDUPE_FILE, DedupeIndex
from ingest.metrics import Metrics
from ingest.parquet import PartitionedWriter
from ingest.schemas import REJECTED, TELEMETRY
from ingest.sink import FlushPolicy, Sink, SinkEvents, SinkMetrics
from ingest.sink_process import SinkLock, SinkProcess
from ingest.storage import OutputStore
from ingest.wal import Durability, WriteAheadLog

log = logging.getLogger("ingest.pipeline")


@dataclass
class OpenedSink:
    """A sink with the state it commits to, as :func:`open_sink` leaves it (not replayed)."""

    sink: Sink
    checkpoint: Checkpoint
    dedupe: DedupeIndex

    def close(self) -> None:
        self.sink.close()  # releases the Iceberg catalog's connections, if any
        self.dedupe.close()


def open_sink(settings: Settings, events: SinkEvents) -> OpenedSink:
    """Open the checkpoint, dedupe index, output and tables, and the sink committing to them.

    The daemon's process and a sink process assemble their sink with this same function.
    """
    state_dir = settings.state.path
    # A local folder or an object store (s3://...), same layout either way.
    output = OutputStore.open(settings.output.path)
    if output.local_root is not None:
        output.local_root.mkdir(parents=True, exist_ok=True)
    checkpoints = CheckpointStore(state_dir / "checkpoint.json")
    checkpoint = checkpoints.load()
    dedupe = DedupeIndex(state_dir / DEDUPE_FILE, retention_s=settings.state.dedupe_retention_s)
    level = settings.output.compression_level
    tables = None
    if settings.iceberg.enabled:
        # Imported only when wanted: pyiceberg is an optional extra.
        from ingest.iceberg import open_tables  # noqa: PLC0415

        tables = open_tables(settings)

    def writer(table: str, schema_name: str) -> PartitionedWriter:
        # With replicas, each one's LSNs are its own: its id in the file names keeps them apart.
        return PartitionedWriter(
            output,
            table,
            schema_name=schema_name,
            compression_level=level,
            replica=settings.replica.id,
        )

    sink = Sink(
        checkpoints=checkpoints,
        dedupe=dedupe,
        telemetry=writer("telemetry", TELEMETRY),
        rejected=writer("rejected", REJECTED),
        decoder=Decoder(
            app_id=settings.mqtt.app_id or None,
            max_payload_bytes=settings.ingest.max_payload_bytes,
        ),
        policy=FlushPolicy(
            max_rows=settings.output.flush_rows,
            max_bytes=settings.output.flush_bytes,
            max_age_s=settings.output.flush_age_s,
        ),
        events=events,
        tables=tables,
    )
    return OpenedSink(sink=sink, checkpoint=checkpoint, dedupe=dedupe)


@dataclass
class Pipeline:
    """The log and the sink that commits it (a thread's :class:`Sink` or a :class:`SinkProcess`)."""

    wal: WriteAheadLog
    sink: Sink | SinkProcess
    # The thread sink's own state (None with a sink process, which holds its own).
    opened: OpenedSink | None = None

    def close(self) -> None:
        if self.opened is not None:
            self.opened.close()
        if isinstance(self.sink, SinkProcess):
            self.sink.close()
        self.wal.close()


def open_pipeline(
    settings: Settings,
    metrics: Metrics,
    *,
    before_replay: Callable[[DedupeIndex], object] | None = None,
) -> Pipeline:
    """Open the log and state, and replay whatever the last run logged but did not commit.

    ``before_replay`` sees the dedupe index first (a replica marks what others adopted from it).
    """
    settings.state.path.mkdir(parents=True, exist_ok=True)
    if settings.ingest.sink_mode == "process":
        return _open_with_sink_process(settings, metrics, before_replay)
    wal = _open_log(settings)
    try:
        opened = open_sink(settings, SinkMetrics(metrics, wal))
        try:
            _replay(opened, wal, metrics, before_replay)
        except BaseException:
            opened.close()
            raise
    except BaseException:
        wal.close()
        raise
    return Pipeline(wal=wal, sink=opened.sink, opened=opened)


def _open_with_sink_process(
    settings: Settings,
    metrics: Metrics,
    before_replay: Callable[[DedupeIndex], object] | None,
) -> Pipeline:
    """Replay here, commit it, then hand the committed state over to a sink process."""
    lock: SinkLock | None = SinkLock.acquire(settings.state.path)
    process: SinkProcess | None = None
    wal: WriteAheadLog | None = None
    try:
        # Started first: its interpreter start and imports overlap our replay. It waits for the
        # lock, which we hold until the replay is committed.
        process = SinkProcess.start(settings)
        wal = _open_log(settings)
        events = SinkMetrics(metrics, wal)
        opened = open_sink(settings, events)
        try:
            _replay(opened, wal, metrics, before_replay)
            # Committed rather than handed over: the process starts from a checkpoint with no
            # batch open, so the two never commit the same range.
            opened.sink.commit_pending()
            committed_lsn = opened.sink.committed_lsn
        finally:
            opened.close()
        assert lock is not None
        lock.release()
        lock = None
        process.wait_ready(committed_lsn, events)
        log.info("sink process %s serves from lsn %d", process.pid, committed_lsn + 1)
        return Pipeline(wal=wal, sink=process)
    except BaseException:
        if process is not None:
            process.close()
        if wal is not None:
            wal.close()
        if lock is not None:
            lock.release()
        raise


def _open_log(settings: Settings) -> WriteAheadLog:
    checkpoint = CheckpointStore(settings.state.path / "checkpoint.json").load()
    return WriteAheadLog.open(
        settings.state.path / "log",
        segment_bytes=settings.state.log_segment_bytes,
        durability=Durability(settings.state.durability.value),
        min_next_lsn=checkpoint.committed_lsn + 1,
    )


def _replay(
    opened: OpenedSink,
    wal: WriteAheadLog,
    metrics: Metrics,
    before_replay: Callable[[DedupeIndex], object] | None,
) -> None:
    if before_replay is not None:
        before_replay(opened.dedupe)
    checkpoint = opened.checkpoint
    replayed = opened.sink.replay(checkpoint, wal.read_from(checkpoint.committed_lsn + 1))
    metrics.replayed.inc(replayed)
