"""The clearance history table: recorded transitions → ``<output>/clearance/date=…/*.parquet``.

Transitions are persisted to SQLite first (:class:`~ingest.fleet.store.ClearanceStateStore`) and
exported here second, with the same protocol as the telemetry sink:

1. :meth:`~ingest.fleet.store.ClearanceStateStore.begin_export` picks the unexported ids
   ``[first, last]`` and records that range durably as the export's intent;
2. the rows are written as ``part-<first>-<last>.parquet`` per date partition (by
   ``observed_at``), each atomically: temporary file, fsync, rename, folder fsync
   (:class:`~ingest.parquet.PartitionedWriter`);
3. :meth:`~ingest.fleet.store.ClearanceStateStore.finish_export` moves the high-water mark
   to ``last``.

A crash before 1 leaves the rows unexported, so the next export writes them (nothing lost); a
crash between 1 and 3 makes the next export redo exactly ``[first, last]``, overwriting the same
file names with the same rows (nothing duplicated). Transition ids never repeat (SQLite
AUTOINCREMENT), so two ranges never share a file name.

**Replicas.** Several daemons sharing one output each keep their own store, so their transition ids
are their own: ``replica`` (``[replica] id``) goes into every file name, as for telemetry. Only the
fleet-control leader exports. Transitions a follower records (it observes the same listing)
are the leader's to export, so before a follower starts exporting (on becoming leader) it calls
:meth:`TransitionHistory.skip_pending`, which moves its export mark past everything recorded so far
*without writing*; its exports then hold only what it records as leader. Where it is called
decides what a hand-off can cost: once at takeover, a transition the old leader recorded but never
exported (it died first) is missing from the history; after every follower cycle instead, the new
leader exports what it recorded since its last call, so a transition near the hand-off may appear
twice (never not at all).

Writing blocks (Parquet encoding, fsync): callers on the event loop run :meth:`export` in a thread.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ingest.fleet.store import ClearanceStateStore, ExportBatch, Transition, to_micros
from ingest.parquet import PartitionedWriter, WrittenFile
from ingest.storage import OutputStore

log = logging.getLogger("ingest.fleet.history")

TABLE = "clearance"
SCHEMA = "clearance.v1"
# Transitions are few (a fleet changes status a handful of times per vehicle); this bounds one
# file's size after a long outage of the output volume.
EXPORT_BATCH_ROWS = 100_000


class TransitionHistory:
    """Exports the store's transitions to ``<output_root>/clearance/``; one per output root."""

    def __init__(
        self,
        store: ClearanceStateStore,
        output_root: Path | OutputStore,
        *,
        compression_level: int = 3,
        batch_rows: int = EXPORT_BATCH_ROWS,
        replica: str = "",
    ) -> None:
        self._store = store
        self._batch_rows = batch_rows
        self.writer = PartitionedWriter(
            output_root,
            TABLE,
            schema_name=SCHEMA,
            compression_level=compression_level,
            replica=replica,
        )
        # Leftovers of a crash mid-write (this replica's only); the interrupted range itself is
        # redone by export(), or by skip_pending() if some of its files were written.
        self.writer.remove_temporaries()

    def export(self) -> list[WrittenFile]:
        """Write every transition not yet in Parquet; returns the files written."""
        written: list[WrittenFile] = []
        while (batch := self._store.begin_export(self._batch_rows)) is not None:
            written.extend(self.write(batch))
            self._store.finish_export(batch)
        return written

    def skip_pending(self) -> int:
        """A follower's export: mark every transition recorded so far as exported, writing none.

        Returns how many were skipped. One exception keeps the history whole: an export this
        replica began while it was leader and that was cut short after writing some of its files
        (its intent is still pending) is completed, since the output already holds part of it.
        Telling them apart costs one existence check (a stat, or a HEAD on an object store) per
        date each skipped batch spans.
        """
        skipped = 0
        while (batch := self._store.begin_export(self._batch_rows)) is not None:
            columns = _columns(batch.transitions)
            partitions = self.writer.partitions_of(columns, date_column="observed_at")
            if self.writer.batch_written(batch.first_id, batch.last_id, partitions):
                self.write(batch)
            else:
                skipped += len(batch.transitions)
            self._store.finish_export(batch)
        if skipped:
            log.debug("clearance history: %d transition(s) left to the leader", skipped)
        return skipped

    def write(self, batch: ExportBatch) -> list[WrittenFile]:
        """Step 2 of the protocol alone (export() runs all three; tests interrupt after this)."""
        files = self.writer.write(
            _columns(batch.transitions),
            first_lsn=batch.first_id,
            last_lsn=batch.last_id,
            date_column="observed_at",
        )
        log.debug(
            "clearance history: transitions %d..%d in %d file(s)",
            batch.first_id,
            batch.last_id,
            len(files),
        )
        return files


def _columns(transitions: list[Transition]) -> dict[str, list[Any]]:
    # Timestamps go in as integers in the schema's unit (microseconds): no float rounding.
    return {
        "transition_id": [t.id for t in transitions],
        "vin": [t.vin for t in transitions],
        "brand": [t.brand for t in transitions],
        "from_status": [t.from_status for t in transitions],
        "to_status": [t.to_status for t in transitions],
        "reason": [t.reason for t in transitions],
        "observed_at": [to_micros(t.observed_at) for t in transitions],
        "changed_at": [to_micros(t.changed_at) if t.changed_at else None for t in transitions],
        "source": [t.source for t in transitions],
    }


__all__ = ["SCHEMA", "TABLE", "TransitionHistory"]
