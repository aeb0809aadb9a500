"""Batches of rows → date-partitioned Parquet files, written atomically and deterministically.

One batch of write-ahead-log records ``[first_lsn, last_lsn]`` becomes at most one file per UTC
date::

    <root>/<table>/date=YYYY-MM-DD/part-<first_lsn:020d>-<last_lsn:020d>.parquet
    <root>/<table>/date=YYYY-MM-DD/part-<replica>-<first_lsn:020d>-<last_lsn:020d>.parquet

The second form is a replica's (``[replica] id``): several daemons share one output location, each
with its own LSNs, so the replica id keeps their names apart. The id may contain dashes (pod names
such as ``hm-ingest-2``); parsing stays unambiguous because the two 20-digit groups are anchored
at the end of the name.

The name depends only on the batch, and the content only on the rows and the library version, so a
batch replayed after a crash overwrites its earlier files with identical ones instead of adding a
second copy (see ``ingest.checkpoint`` for the protocol). Each file is written under a temporary
name that analytics engines skip (a leading ``.``), fsynced, renamed over the final name, and the
folder is fsynced so the rename itself survives a power loss. On an object store (``root`` an
:class:`~ingest.storage.OutputStore` for ``s3://...``) each file is encoded in memory and uploaded
as one complete object under its final name instead: stores publish an object whole or not at all.

One writer per ``<root>/<table>`` and replica: temporary names are fixed per batch, so two
processes writing the same batch of the same replica into the same folder would trample each
other's temporary file. Writers of different replicas share folders safely: every name they
write, replace or delete (including temporaries) carries their own replica id.

The work here blocks (encoding, fsync); callers on the event loop run it in a thread.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path, PurePath, PurePosixPath
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ingest import schemas
from ingest.config import REPLICA_ID_PATTERN
from ingest.errors import SinkError
from ingest.storage.store import OutputStore
from ingest.testing import faultpoints

# Twenty digits hold any unsigned 64-bit LSN, so names sort by LSN as plain strings.
LSN_DIGITS = 20
MAX_LSN = 10**LSN_DIGITS - 1
PARTITION_KEY = "date"
TEMP_PREFIX = "."  # Spark, Hive, DuckDB globs and pyarrow.dataset all skip names starting with "."
TEMP_SUFFIX = ".tmp"  # and "*.parquet" globs do not match it either
_REPLICA = re.compile(REPLICA_ID_PATTERN)
# The replica group is optional and the LSN groups fixed-width at the end: a name has exactly one
# parse, whatever dashes or digits the replica id holds.
_REPLICA_BODY = REPLICA_ID_PATTERN.removeprefix("^").removesuffix("$")
_PART = (
    rf"part-(?:(?P<replica>{_REPLICA_BODY})-)?"
    rf"(?P<first>\d{{{LSN_DIGITS}}})-(?P<last>\d{{{LSN_DIGITS}}})\.parquet"
)
_FILE_NAME = re.compile(_PART)
_TEMP_NAME = re.compile(re.escape(TEMP_PREFIX) + _PART + re.escape(TEMP_SUFFIX))
_EPOCH = date(1970, 1, 1)
# Errors that retrying cannot fix without an operator: the sink reports them as not retriable.
_PERMANENT_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


@dataclass(frozen=True, slots=True)
class WrittenFile:
    """One committed Parquet file: where it is, its rows and bytes, and its partition folder."""

    path: PurePath  # a Path for local roots; the store's path ("bucket/prefix/...") otherwise
    rows: int
    bytes: int
    partition: str


class PartName(NamedTuple):
    """What a part file's name says: whose it is (``""``: a single daemon's) and its LSN range."""

    replica: str
    first: int
    last: int


def check_replica(replica: str) -> str:
    """``replica`` if it is ``""`` or a valid replica id; ``ValueError`` naming the rule if not."""
    if replica and _REPLICA.fullmatch(replica) is None:
        raise ValueError(
            f"replica id {replica!r} is not valid: use 1 to 63 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit (e.g. the pod name hm-ingest-2)"
        )
    return replica


def part_file_name(first_lsn: int, last_lsn: int, replica: str = "") -> str:
    """The file name of ``replica``'s batch ``[first_lsn, last_lsn]``; sorts by LSN as a string.

    ``replica=""`` (a single daemon) gives ``part-<first>-<last>.parquet``, as it always has.
    """
    if not 0 <= first_lsn <= last_lsn <= MAX_LSN:
        raise ValueError(
            f"LSN range [{first_lsn}, {last_lsn}] must satisfy 0 <= first <= last <= {MAX_LSN}"
        )
    owner = f"{check_replica(replica)}-" if replica else ""
    return f"part-{owner}{first_lsn:0{LSN_DIGITS}d}-{last_lsn:0{LSN_DIGITS}d}.parquet"


def temp_file_name(name: str) -> str:
    """The temporary name a file is written under before being renamed to ``name``."""
    return f"{TEMP_PREFIX}{name}{TEMP_SUFFIX}"


def parse_part_file_name(name: str) -> PartName:
    """The replica and LSN range of a name made by :func:`part_file_name`."""
    match = _FILE_NAME.fullmatch(name)
    if match is None:
        raise ValueError(
            f"{name!r} is not a part file name (part-[<replica>-]<20 digits>-<20 digits>.parquet)"
        )
    return _part_name(match)


def parse_temp_file_name(name: str) -> PartName | None:
    """The replica and LSN range of a temporary part file's name; None for any other name."""
    match = _TEMP_NAME.fullmatch(name)
    return _part_name(match) if match is not None else None


def _part_name(match: re.Match[str]) -> PartName:
    first, last = int(match.group("first")), int(match.group("last"))
    return PartName(match.group("replica") or "", first, last)


def partition_name(day: date) -> str:
    """The Hive-style partition folder of ``day``, e.g. ``date=2026-11-28``."""
    return f"{PARTITION_KEY}={day.isoformat()}"


class PartitionedWriter:
    """Writes batches of table ``table`` under ``root`` with the schema ``schema_name``.

    ``root`` and ``table`` stay readable: the dataset is the folder ``root / table``. ``root`` is
    a local folder, or an :class:`~ingest.storage.OutputStore` (local or object store).
    ``replica`` (``""``: a single daemon) goes into every file name this writer writes, replaces
    or deletes, so replicas sharing ``root`` never touch each other's files.
    """

    def __init__(
        self,
        root: Path | OutputStore,
        table: str,
        *,
        schema_name: str,
        compression: str = "zstd",
        compression_level: int = 3,
        row_group_rows: int = 128 * 1024,
        replica: str = "",
    ) -> None:
        # Object stores take whole-object uploads; local folders the fsync + rename path below.
        self.root, self._remote = _split_root(root)
        self.table = table
        self.replica = check_replica(replica)
        self._folder = Path(self.root) / table  # used for local roots only
        self._schema = schemas.arrow_schema(schema_name)
        self._dictionary = list(schemas.dictionary_columns(schema_name))
        self._compression = compression
        self._compression_level = compression_level
        self._row_group_rows = row_group_rows

    def write(
        self,
        columns: dict[str, list[Any]] | pa.Table,
        *,
        first_lsn: int,
        last_lsn: int,
        date_column: str,
        fallback_date_column: str | None = None,
    ) -> list[WrittenFile]:
        """Write the rows of batch ``[first_lsn, last_lsn]``, one file per UTC date, in date order.

        Timestamps are given as integers in the schema's unit (or as Arrow timestamps that cast
        to it without loss). A row's date comes from ``date_column``, or where that is null from
        ``fallback_date_column``. Rows keep their order within each file. Raises ``ValueError``
        when the columns do not fit the schema and ``SinkError`` when the disk refuses a file.
        """
        name = part_file_name(first_lsn, last_lsn, self.replica)
        table = self._to_table(columns)
        if table.num_rows == 0:
            return []
        days = self._days(table, date_column, fallback_date_column)
        written = []
        day_numbers = sorted(pc.unique(days).to_pylist())
        for day_number in day_numbers:
            # One date (the usual batch) needs no filter: filtering copies every column, and that
            # copy is what sets the daemon's peak memory during a commit.
            rows = table if len(day_numbers) == 1 else table.filter(pc.equal(days, day_number))
            partition = partition_name(_EPOCH + timedelta(days=day_number))
            if self._remote is not None:
                written.append(self._upload_file(rows, self._remote, partition, name))
            else:
                written.append(self._write_file(rows, self._folder / partition / name, partition))
            del rows  # before the next date's copy is made
        return written

    def partitions_of(
        self,
        columns: dict[str, list[Any]] | pa.Table,
        *,
        date_column: str,
        fallback_date_column: str | None = None,
    ) -> list[str]:
        """The partition folders :meth:`write` would put these rows in, in order; writes none."""
        table = self._to_table(columns)
        if table.num_rows == 0:
            return []
        days = self._days(table, date_column, fallback_date_column)
        return [
            partition_name(_EPOCH + timedelta(days=day))
            for day in sorted(pc.unique(days).to_pylist())
        ]

    def remove_batch(self, first_lsn: int, last_lsn: int) -> int:
        """Delete batch ``[first_lsn, last_lsn]``'s files in every partition; returns how many.

        A replayed intent calls this before writing the batch again, so files an interrupted
        attempt left in partitions the replay no longer writes to cannot stay behind. Only this
        writer's replica's files: another replica's batch with the same LSNs is a different batch.
        """
        name = part_file_name(first_lsn, last_lsn, self.replica)
        if self._remote is not None:
            store = self._remote
            folders = store.list_folders(store.join(self.table))
            return store.delete(store.existing([f"{folder}/{name}" for folder in folders]))
        removed = 0
        for path in self._folder.glob(f"*/{name}"):
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise _sink_error("could not remove", path, exc) from exc
            removed += 1
        return removed

    def batch_written(self, first_lsn: int, last_lsn: int, partitions: Sequence[str]) -> bool:
        """Whether any file of batch ``[first_lsn, last_lsn]`` exists in one of ``partitions``."""
        name = part_file_name(first_lsn, last_lsn, self.replica)
        if self._remote is not None:
            store = self._remote
            return bool(store.existing([store.join(self.table, p, name) for p in partitions]))
        return any((self._folder / partition / name).is_file() for partition in partitions)

    def remove_temporaries(self) -> int:
        """Delete temporary files a crash left under ``<root>/<table>/``; returns how many.

        Only this writer's replica's: another replica may be writing its own temporary file in
        the same folder right now. (A running compaction's temporary file of this replica's merged
        range looks alike; removing it fails that merge, which leaves its inputs in place, and the
        next pass redoes it.) Not fsynced: a temporary file that reappears after a power loss is
        ignored by readers and removed again at the next start. Object stores have none: an
        upload cut short leaves no object.
        """
        if self._remote is not None:
            return 0
        removed = 0
        for path in self._temporaries():
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise _sink_error("could not remove temporary file", path, exc) from exc
            removed += 1
        return removed

    def _temporaries(self) -> Iterator[Path]:
        if not self._folder.is_dir():
            return
        for partition in self._folder.iterdir():
            if partition.is_dir():
                for path in partition.iterdir():
                    parsed = parse_temp_file_name(path.name)
                    # Never another replica's: it may be renaming that file right now.
                    if parsed is not None and parsed.replica == self.replica:
                        yield path

    def _to_table(self, columns: dict[str, list[Any]] | pa.Table) -> pa.Table:
        names = set(columns.column_names if isinstance(columns, pa.Table) else columns)
        expected = set(self._schema.names)
        if names != expected:
            raise ValueError(
                f"columns do not match schema {self._schema.metadata[b'table'].decode()!r}: "
                f"missing {sorted(expected - names)}, unexpected {sorted(names - expected)}"
            )
        arrays = []
        for field in self._schema:
            try:
                if isinstance(columns, pa.Table):
                    # safe=True: a cast that would truncate (e.g. ns → ms) fails instead.
                    array = columns.column(field.name).cast(field.type, safe=True)
                else:
                    # Integers go straight into the schema's unit; no detour through ns.
                    array = pa.array(columns[field.name], type=field.type)
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError) as exc:
                raise ValueError(f"column {field.name!r} does not fit {field.type}: {exc}") from exc
            if not field.nullable and array.null_count:
                raise ValueError(f"column {field.name!r} is not nullable but holds nulls")
            arrays.append(array)
        return pa.Table.from_arrays(arrays, schema=self._schema)

    def _days(self, table: pa.Table, date_column: str, fallback: str | None) -> pa.Array:
        """Days since 1970-01-01 (UTC) of each row, as int32."""
        days = self._date32(table, date_column)
        if fallback is not None:
            days = pc.coalesce(days, self._date32(table, fallback))
        if days.null_count:
            sources = date_column if fallback is None else f"{date_column} and {fallback}"
            raise ValueError(f"{days.null_count} rows have no date: {sources} are null")
        return days.cast(pa.int32())

    def _date32(self, table: pa.Table, column: str) -> pa.ChunkedArray:
        if column not in self._schema.names or not pa.types.is_timestamp(
            self._schema.field(column).type
        ):
            raise ValueError(f"date column {column!r} is not a timestamp column of the schema")
        # The schema's timestamps are UTC, so the cast takes the UTC calendar date.
        return table.column(column).cast(pa.date32())

    def _write_file(self, rows: pa.Table, path: Path, partition: str) -> WrittenFile:
        temp = path.with_name(temp_file_name(path.name))
        try:
            _make_folders(path.parent)
            self._encode(rows, temp)
            if faultpoints.ACTIVE:
                faultpoints.hit("parquet.temp_written")
            _fsync_path(temp)
            size = temp.stat().st_size
            # os.replace, not link/rename-if-absent: a replayed batch overwrites its identical
            # earlier file, which is exactly what makes replays idempotent.
            os.replace(temp, path)
            if faultpoints.ACTIVE:
                faultpoints.hit("parquet.renamed")
            _fsync_path(path.parent)
        except OSError as exc:
            # The folder itself may be what is broken (gone, a file, read-only): the temporary
            # file is then not there to remove, or cannot be; remove_temporaries() retries later.
            with contextlib.suppress(OSError):
                temp.unlink(missing_ok=True)
            raise _sink_error("could not write Parquet file", path, exc) from exc
        return WrittenFile(path=path, rows=rows.num_rows, bytes=size, partition=partition)

    def _upload_file(
        self, rows: pa.Table, store: OutputStore, partition: str, name: str
    ) -> WrittenFile:
        """Encode in memory, then one upload of the complete object under its final name."""
        path = store.join(self.table, partition, name)
        buffer = pa.BufferOutputStream()
        self._encode(rows, buffer)
        data = buffer.getvalue()
        try:
            if faultpoints.ACTIVE:
                faultpoints.hit("parquet.temp_written")
        except OSError as exc:
            raise _sink_error("could not write Parquet file", Path(path), exc) from exc
        store.put(path, data)  # SinkError (retriable) while the store is unreachable
        if faultpoints.ACTIVE:
            faultpoints.hit("parquet.renamed")
        return WrittenFile(
            path=PurePosixPath(path), rows=rows.num_rows, bytes=data.size, partition=partition
        )

    def _encode(self, rows: pa.Table, where: Path | pa.NativeFile) -> None:
        pq.write_table(
            rows,
            where,
            row_group_size=self._row_group_rows,
            compression=self._compression,
            compression_level=self._compression_level,
            use_dictionary=self._dictionary,
        )


def _split_root(root: Path | OutputStore) -> tuple[PurePath, OutputStore | None]:
    """The root's path, and the object store to upload to (None for a local folder)."""
    if not isinstance(root, OutputStore):
        return Path(root), None
    if root.local_root is not None:
        return root.local_root, None
    return PurePosixPath(root.base), root


def _make_folders(folder: Path) -> None:
    """Create ``folder`` and missing parents, fsyncing each parent so the new entry is durable."""
    missing = []
    while not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    for new in reversed(missing):
        new.mkdir(exist_ok=True)
        _fsync_path(new.parent)


def _fsync_path(path: Path) -> None:
    # Opened read-only: on Linux fsync flushes the inode's data whatever the descriptor's mode,
    # and folders cannot be opened for writing at all.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sink_error(action: str, path: Path, exc: OSError) -> SinkError:
    code = errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno else "unknown errno"
    if exc.errno == errno.ENOSPC:
        reason = "the disk is full; free space or grow the volume"
    else:
        reason = exc.strerror or str(exc)
    return SinkError(
        f"{action} {path}: {reason} ({code})",
        retriable=exc.errno not in _PERMANENT_ERRNOS,
    )
