"""One Iceberg snapshot per committed batch, never two for the same batch.

The sink calls :meth:`IcebergTables.append` once per batch, after the batch's Parquet files are
in place and before the dedupe index and the checkpoint record the batch (see :mod:`ingest.sink`).

**The files are registered, not copied.** Each file the Parquet writer wrote is added to the
table as it is (its footer gives the row count, column sizes and bounds the manifest records),
so the table costs no second copy of the data and a query through Iceberg reads exactly the
bytes the plain layout holds. The alternative, ``table.append`` of the batch's Arrow table,
would write every row twice and double the storage, for nothing the registered files lack:

* the files are plain Parquet without Iceberg field ids, which the name mapping the tables are
  created with covers (Spark, Trino, DuckDB and pyiceberg all read through it);
* timestamps are stored in milliseconds (``telemetry.timestamp``); Iceberg's type is
  microseconds, and every engine widens on read; the manifest bounds are written in
  microseconds;
* a file can be registered in a partition only when every one of its rows has that partition
  value. ``rejected`` files are split by the UTC date of ``received_at``, never null, so each
  lies in one ``day(received_at)`` partition. ``telemetry`` files are split by the date of
  ``coalesce(timestamp, received_at)``, which Iceberg's ``day(timestamp)`` cannot express:
  a file whose rows all have a timestamp (the usual case) or none has one partition value and
  is registered; a file that mixes both would put its timestamp-less rows in a ``timestamp``
  day they do not have (``WHERE timestamp IS NULL`` would then skip them), so that file alone
  is **copied** instead: its rows are rewritten into the table's own ``data/`` folder, one file
  for the day and one for the null partition, under names derived from the source file's so a
  replay overwrites rather than duplicates them. The same rule applies to any partition spec
  an operator evolves the table to (``identity(capability)`` would copy every file with more
  than one capability); identity and day transforms can be split, others stop the sink.

Why not ``table.add_files``: it does the same registration but cannot copy the mixed files,
and its duplicate check reads every manifest of the table on each call; the LSN check below makes
that check unnecessary. Each append is one ``merge_append`` snapshot of all the batch's files.

**Replays append nothing twice.** Every snapshot carries the summary properties
``hm-ingest.last-lsn`` and ``hm-ingest.first-lsn`` (``hm-ingest.<replica>.…`` for replicas,
whose LSNs are their own), and the same commit sets the table property
``hm-ingest[.<replica>].last-lsn``, which survives snapshot expiry. Before appending, the table
is refreshed and its recorded last LSN for this replica compared with the batch's:

* equal: the append landed before a crash (or an ambiguous commit error); skip it;
* smaller: append;
* larger: the table holds batches this daemon has not committed yet, so its state folder is
  older than the table (restored from a backup, reset) or two daemons share a replica id.
  Appending would register rows twice and skipping could drop new ones: the sink stops with an
  error that says how to resolve it.

The telemetry and rejected tables are two commits; a crash between them is replayed per table.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import PurePath, PurePosixPath

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyiceberg.catalog import Catalog
from pyiceberg.exceptions import BadRequestError, ValidationError
from pyiceberg.io.pyarrow import (
    compute_statistics_plan,
    data_file_statistics_from_parquet_metadata,
    parquet_file_to_data_file,
    parquet_path_to_id_mapping,
)
from pyiceberg.manifest import DataFile
from pyiceberg.partitioning import PartitionField
from pyiceberg.table import Table
from pyiceberg.table.snapshots import ancestors_of
from pyiceberg.transforms import DayTransform, IdentityTransform
from pyiceberg.typedef import Record

from ingest.errors import IngestError, SinkError
from ingest.iceberg.tables import TABLES, TableSpec, ensure_table
from ingest.parquet import WrittenFile

log = logging.getLogger("ingest.iceberg")

PREFIX = "hm-ingest"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _copy_by_partition(table: Table, uri: str, file: WrittenFile) -> list[DataFile]:
    """Rewrite the rows of a file that spans partitions as one file per partition value.

    The copies go to ``<table location>/data/<partition path>/`` under names derived from the
    source file's (``part-<first>-<last>.<date=...>.parquet``), so a replay overwrites them
    instead of leaving a second set behind.
    """
    spec, schema = table.spec(), table.schema()
    with table.io.new_input(uri).open() as stream:
        rows = pq.read_table(stream)
    names = [f"k{i}" for i in range(len(spec.fields))]
    keys = pa.table(
        {
            name: _partition_values(rows, schema.find_column_name(field.source_id), field)
            for name, field in zip(names, spec.fields, strict=True)
        }
    )
    source = PurePosixPath(uri)
    copy_name = f"{source.stem}.{file.partition.replace('=', '-')}{source.suffix}"
    data_files = []
    for combination in keys.group_by(names).aggregate([]).to_pylist():
        mask = pa.array([True] * rows.num_rows)
        for name in names:
            value = combination[name]
            column = keys.column(name)
            matches = pc.is_null(column) if value is None else pc.equal(column, value)
            mask = pc.and_(mask, pc.fill_null(matches, False))
        partition = Record(*(combination[name] for name in names))
        path = f"{table.location().rstrip('/')}/data/{spec.partition_to_path(partition, schema)}"
        path = f"{path}/{copy_name}"
        with table.io.new_output(path).create(overwrite=True) as out:
            pq.write_table(rows.filter(mask), out, compression="zstd")
        data_files.append(parquet_file_to_data_file(table.io, table.metadata, path))
    return data_files


def _partition_values(rows: pa.Table, column: str | None, field: PartitionField) -> pa.Array:
    """The partition value of every row for ``field`` (identity and day transforms)."""
    if column is None or column not in rows.column_names:
        raise ValueError(f"partition field {field.name} has no source column in the files")
    values = rows.column(column).combine_chunks()
    if isinstance(field.transform, IdentityTransform):
        return values
    if isinstance(field.transform, DayTransform) and pa.types.is_timestamp(values.type):
        # Days since 1970-01-01 in UTC, as Iceberg's day transform; null stays null.
        return values.cast(pa.date32()).cast(pa.int32())
    raise ValueError(
        f"partition field {field.name} uses {field.transform}; files spanning several of its "
        "values can only be split for identity and day(timestamp) partitions: keep the table's "
        "spec to those, or let the tables be created by hm-ingest"
    )


def lsn_key(replica: str, which: str = "last") -> str:
    """The snapshot summary / table property naming this replica's ``which`` LSN."""
    return f"{PREFIX}.{replica}.{which}-lsn" if replica else f"{PREFIX}.{which}-lsn"


@dataclass(frozen=True, slots=True)
class AppendReport:
    """What one :meth:`IcebergTables.append` did to one table."""

    table: str
    registered: int  # files added as they are
    copied: int  # files whose rows were rewritten per partition (they spanned several)
    skipped: bool  # the table already held the batch
    seconds: float


class IcebergTables:
    """The ``telemetry`` and ``rejected`` tables of one namespace, appended to by one sink.

    Connects lazily and again after errors: an unreachable catalog at start-up is a retriable
    error of the first append, like an unreachable output store.
    """

    def __init__(
        self,
        connect: Callable[[], Catalog],
        *,
        namespace: str,
        replica: str,
        file_uri: Callable[[PurePath], str],
        keep_snapshots: int = 50,
        specs: Sequence[TableSpec] = TABLES,
    ) -> None:
        self._connect = connect
        self._keep_snapshots = keep_snapshots
        self._namespace = namespace
        self._replica = replica
        self._file_uri = file_uri
        self._specs = {spec.name: spec for spec in specs}
        self._catalog: Catalog | None = None
        self._tables: dict[str, Table] = {}
        self.last_reports: list[AppendReport] = []

    # -- the sink's interface ---------------------------------------------------------------------
    def holds(self, table: str, first_lsn: int, last_lsn: int) -> bool:
        """Whether ``table`` already holds batch ``[first_lsn, last_lsn]`` (a replayed intent)."""
        with self._errors(f"reading Iceberg table {self._namespace}.{table}"):
            return self._recorded_check(self._table(table), first_lsn, last_lsn)

    def append(
        self, first_lsn: int, last_lsn: int, files: Mapping[str, Sequence[WrittenFile]]
    ) -> None:
        """Append the batch's ``files`` (per table name) as one snapshot per table.

        Tables that already hold the batch and tables without files are left alone. Raises
        ``SinkError``: retriable while the catalog or the store is unreachable or a commit
        conflicts past pyiceberg's own retries, not retriable when the table cannot take the
        files (schema) or is ahead of this daemon.
        """
        reports = []
        for name, written in files.items():
            with self._errors(f"appending lsn {first_lsn}..{last_lsn} to {self._namespace}.{name}"):
                reports.append(self._append_one(name, first_lsn, last_lsn, written))
        self.last_reports = reports

    def close(self) -> None:
        engine = getattr(self._catalog, "engine", None)  # the SQL catalog's connection pool
        if engine is not None:
            engine.dispose()
        self._catalog = None
        self._tables.clear()

    # -- one table --------------------------------------------------------------------------------
    def _append_one(
        self, name: str, first_lsn: int, last_lsn: int, written: Sequence[WrittenFile]
    ) -> AppendReport:
        started = time.perf_counter()
        table = self._table(name)
        if self._recorded_check(table, first_lsn, last_lsn):
            log.info(
                "Iceberg table %s already holds lsn %d..%d: not appended again",
                name,
                first_lsn,
                last_lsn,
            )
            return AppendReport(name, 0, 0, True, time.perf_counter() - started)
        if not written:
            return AppendReport(name, 0, 0, False, 0.0)
        data_files: list[DataFile] = []
        copied = 0
        for file in written:
            uri = self._file_uri(file.path)
            if self._fits_one_partition(table, uri):
                data_files.append(parquet_file_to_data_file(table.io, table.metadata, uri))
            else:
                data_files.extend(_copy_by_partition(table, uri, file))
                copied += 1
        summary = {
            lsn_key(self._replica, "first"): str(first_lsn),
            lsn_key(self._replica, "last"): str(last_lsn),
        }
        # One catalog commit: the snapshot and the LSN property land together or not at all.
        # pyiceberg retries a commit that lost a race with another writer (another replica).
        with table.transaction() as transaction:
            with transaction.update_snapshot(snapshot_properties=summary).merge_append() as add:
                for data_file in data_files:
                    add.append_data_file(data_file)
            transaction.set_properties({lsn_key(self._replica): str(last_lsn)})
        self._expire_snapshots(table)
        return AppendReport(
            name, len(written) - copied, copied, False, time.perf_counter() - started
        )

    def _expire_snapshots(self, table: Table) -> None:
        """Keep the newest ``keep_snapshots`` snapshots, in one commit every few batches.

        pyiceberg copies the whole table metadata several times per commit, so a commit's cost
        grows with the snapshot count; unbounded, one snapshot per batch would slow commits down
        day by day. Expiry removes metadata only: no data file is deleted (and the LSN property,
        not the snapshot history, is what replays consult). A failure is logged, not raised: the
        batch is committed, and the next batch tries again.
        """
        snapshots = table.metadata.snapshots
        keep = self._keep_snapshots
        if len(snapshots) <= keep + max(1, keep // 5):
            return
        newest = sorted((s.timestamp_ms for s in snapshots), reverse=True)
        cutoff = _EPOCH + timedelta(milliseconds=newest[keep - 1])
        try:
            table.maintenance.expire_snapshots().older_than(cutoff).commit()
        except Exception as exc:  # maintenance must not fail a committed batch
            log.warning("could not expire old snapshots of %s: %s", table.name(), exc)
            self._tables.clear()

    def _fits_one_partition(self, table: Table, uri: str) -> bool:
        """Whether every row of the file has the same partition value, read from its footer."""
        spec, schema = table.spec(), table.schema()
        if spec.is_unpartitioned():
            return True
        with table.io.new_input(uri).open() as stream:
            metadata = pq.read_metadata(stream)
        statistics = data_file_statistics_from_parquet_metadata(
            parquet_metadata=metadata,
            stats_columns=compute_statistics_plan(schema, table.properties),
            parquet_column_mapping=parquet_path_to_id_mapping(schema),
        )
        rows = statistics.record_count
        for field in spec.fields:
            nulls = statistics.null_value_counts.get(field.source_id)
            if nulls is None or 0 < nulls < rows:
                return False  # some rows in the null partition, others not (or unknown)
        try:
            statistics.partition(spec, schema)
        except ValueError:  # min and max fall in different partitions
            return False
        return True

    def _recorded_check(self, table: Table, first_lsn: int, last_lsn: int) -> bool:
        """True when ``table`` already holds the batch; raises when it is ahead of it."""
        recorded = self._recorded(table)
        if recorded is None or recorded < last_lsn:
            return False
        if recorded == last_lsn:
            return True
        key = lsn_key(self._replica)
        raise SinkError(
            f"Iceberg table {self._namespace}.{table.name()[-1]} already holds this daemon's "
            f"batches up to lsn {recorded} ({key}), but the batch being committed is "
            f"lsn {first_lsn}..{last_lsn}: the [state] folder is older than the table (restored "
            f"from a backup, or reset) or two daemons share [replica] id {self._replica!r}. "
            f"If the state folder was reset on purpose, set the table property {key} to 0 "
            f"(e.g. ALTER TABLE ... SET TBLPROPERTIES ('{key}'='0')) and restart; expect "
            f"rows committed twice where the old and new LSN ranges overlap",
            retriable=False,
        )

    def _recorded(self, table: Table) -> int | None:
        """This replica's last appended LSN: the table property, else the snapshot lineage."""
        key = lsn_key(self._replica)
        value = table.properties.get(key)
        if value is None:
            # Tables whose property was removed by hand still say it in their snapshots.
            for snapshot in ancestors_of(table.current_snapshot(), table.metadata):
                summary = snapshot.summary
                value = summary.get(key) if summary is not None else None
                if value is not None:
                    break
        if value is None:
            return None
        try:
            return int(value)
        except ValueError:
            raise SinkError(
                f"Iceberg table {table.name()} has {key} = {value!r}, not an LSN; set it to the "
                "last LSN this daemon appended, or 0",
                retriable=False,
            ) from None

    # -- catalog ----------------------------------------------------------------------------------
    def _table(self, name: str) -> Table:
        """The table, created when missing, refreshed (other replicas commit too)."""
        table = self._tables.get(name)
        if table is not None:
            return table.refresh()
        if self._catalog is None:
            self._catalog = self._connect()
        spec = self._specs.get(name)
        if spec is None:
            raise SinkError(f"no Iceberg table is defined for output table {name!r}")
        table = self._tables[name] = ensure_table(self._catalog, self._namespace, spec)
        return table

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Every failure as a ``SinkError`` the sink's retry loop understands."""
        try:
            yield
        except IngestError:
            raise
        except (ValueError, TypeError, ValidationError, BadRequestError) as exc:
            # The table cannot take these files (schema, types) or the request is malformed:
            # retrying changes nothing.
            raise SinkError(
                f"{action}: {type(exc).__name__}: {exc}; check that the table's schema matches "
                "schemas/ (a table created by something else may not)",
                retriable=False,
            ) from exc
        except Exception as exc:  # catalog, network, store: all may heal
            # Drop the cached handles: the next attempt reconnects and reloads.
            self._tables.clear()
            raise SinkError(f"{action}: {type(exc).__name__}: {exc}", retriable=True) from exc
