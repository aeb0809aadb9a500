"""Batches of rows → date-partitioned Parquet files, written atomically and deterministically.

One batch of write-ahead-log records ``[first_lsn, last_lsn]`` becomes at most one file per UTC
date::

    <root>/<table>/date=YYYY-MM-DD/part-<first_lsn:020d>-<last_lsn:020d>.parquet

The name depends only on the batch, and the content only on the rows and the library version, so a
batch replayed after a crash overwrites its earlier files with identical ones instead of adding a
second copy (see ``ingest.checkpoint`` for the protocol). Each file is written under a temporary
name that analytics engines skip (a leading ``.``), fsynced, renamed over the final name, and the
folder is fsynced so the rename itself survives a power loss.

One writer per ``<root>/<table>``: temporary names are fixed per batch, so two processes writing
the same batch into the same folder would trample each other's temporary file.

The work here blocks (encoding, fsync); callers on the event loop run it in a thread.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ingest import schemas
from ingest.errors import SinkError

# Twenty digits hold any unsigned 64-bit LSN, so names sort by LSN as plain strings.
LSN_DIGITS = 20
MAX_LSN = 10**LSN_DIGITS - 1
PARTITION_KEY = "date"
TEMP_PREFIX = "."  # Spark, Hive, DuckDB globs and pyarrow.dataset all skip names starting with "."
TEMP_SUFFIX = ".tmp"  # and "*.parquet" globs do not match it either
_FILE_NAME = re.compile(r"part-(\d{20})-(\d{20})\.parquet")
_TEMP_NAME = re.compile(r"\.part-\d{20}-\d{20}\.parquet\.tmp")
_EPOCH = date(1970, 1, 1)
# Errors that retrying cannot fix without an operator: the sink reports them as not retriable.
_PERMANENT_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


@dataclass(frozen=True, slots=True)
class WrittenFile:
    """One committed Parquet file: where it is, its rows and bytes, and its partition folder."""

    path: Path
    rows: int
    bytes: int
    partition: str


def part_file_name(first_lsn: int, last_lsn: int) -> str:
    """The file name of batch ``[first_lsn, last_lsn]``; sorts by LSN as a string."""
    if not 0 <= first_lsn <= last_lsn <= MAX_LSN:
        raise ValueError(
            f"LSN range [{first_lsn}, {last_lsn}] must satisfy 0 <= first <= last <= {MAX_LSN}"
        )
    return f"part-{first_lsn:0{LSN_DIGITS}d}-{last_lsn:0{LSN_DIGITS}d}.parquet"


def parse_part_file_name(name: str) -> tuple[int, int]:
    """``(first_lsn, last_lsn)`` from a name made by :func:`part_file_name`."""
    match = _FILE_NAME.fullmatch(name)
    if match is None:
        raise ValueError(f"{name!r} is not a part file name (part-<20 digits>-<20 digits>.parquet)")
    return int(match.group(1)), int(match.group(2))


def partition_name(day: date) -> str:
    """The Hive-style partition folder of ``day``, e.g. ``date=2026-11-28``."""
    return f"{PARTITION_KEY}={day.isoformat()}"


class PartitionedWriter:
    """Writes batches of table ``table`` under ``root`` with the schema ``schema_name``.

    ``root`` and ``table`` stay readable: the dataset is the folder ``root / table``.
    """

    def __init__(
        self,
        root: Path,
        table: str,
        *,
        schema_name: str,
        compression: str = "zstd",
        compression_level: int = 3,
        row_group_rows: int = 128 * 1024,
    ) -> None:
        self.root = Path(root)
        self.table = table
        self._folder = self.root / table
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
        name = part_file_name(first_lsn, last_lsn)
        table = self._to_table(columns)
        if table.num_rows == 0:
            return []
        days = self._days(table, date_column, fallback_date_column)
        written = []
        for day_number in sorted(pc.unique(days).to_pylist()):
            rows = table.filter(pc.equal(days, day_number))
            partition = partition_name(_EPOCH + timedelta(days=day_number))
            written.append(self._write_file(rows, self._folder / partition / name, partition))
        return written

    def remove_temporaries(self) -> int:
        """Delete temporary files a crash left under ``<root>/<table>/``; returns how many.

        Not fsynced: a temporary file that reappears after a power loss is ignored by readers
        and removed again at the next start.
        """
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
                    if _TEMP_NAME.fullmatch(path.name):
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
        temp = path.with_name(TEMP_PREFIX + path.name + TEMP_SUFFIX)
        try:
            _make_folders(path.parent)
            pq.write_table(
                rows,
                temp,
                row_group_size=self._row_group_rows,
                compression=self._compression,
                compression_level=self._compression_level,
                use_dictionary=self._dictionary,
            )
            _fsync_path(temp)
            size = temp.stat().st_size
            # os.replace, not link/rename-if-absent: a replayed batch overwrites its identical
            # earlier file, which is exactly what makes replays idempotent.
            os.replace(temp, path)
            _fsync_path(path.parent)
        except OSError as exc:
            # The folder itself may be what is broken (gone, a file, read-only): the temporary
            # file is then not there to remove, or cannot be; remove_temporaries() retries later.
            with contextlib.suppress(OSError):
                temp.unlink(missing_ok=True)
            raise _sink_error("could not write Parquet file", path, exc) from exc
        return WrittenFile(path=path, rows=rows.num_rows, bytes=size, partition=partition)


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
