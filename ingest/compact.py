"""``hm-ingest compact``: merge the small Parquet files of closed partitions, beside the daemon.

The sink writes one file per batch and date (``part-[<replica>-]<first>-<last>.parquet``), so a
quiet fleet or late data leaves many small files. This command rewrites runs of them as one file
per run. Replicas sharing the output number their own LSNs, so everything below happens per
(partition, replica): a run holds one replica's files and the merged file carries its replica id.

**Which files.** A partition ``date=D`` is *closed* when ``D`` is more than ``older_than_days``
before today (UTC). Late items can still land there (their own timestamp decides the partition),
so closed is not frozen: only files whose whole range is *committed* are touched, i.e.
``last <= committed_lsn`` of ``<state>/checkpoint.json`` (for ``clearance/`` the exported id in
``clearance.sqlite3``). The sink never rewrites a committed range: a start-up replay only redoes
the pending intent, which lies above ``committed_lsn``, with ``remove_batch`` deleting exactly
that intent's names. Anything the sink writes later has a higher range, so it sorts after every
candidate and never falls inside a merged range.

**Replicas.** The exact bound is known only for the replica whose ``[state]`` folder this command
was given (``[replica] id`` of its settings; ``""`` for a single daemon). Other replicas' state
folders are on their own hosts, so their bound is taken from the listing: everything below that
replica's *newest* range in the table. This is never above its ``committed_lsn``: a replica has at
most one batch in flight (its pending intent), that batch starts right after ``committed_lsn``
and lies above every committed range, so if the newest range is the intent, everything below it is
committed; if it is committed, so is everything below it. A replica's own start-up
(``remove_temporaries``, ``remove_batch``) touches only names carrying its id, and the sink of one
replica never writes names of another, so writers and this command only meet on one replica's
files under the rules above. (A replica that stopped for good keeps its newest batch's files
uncompacted.)

**How.** Within a partition the candidates are sorted by LSN and cut into *consecutive* runs of up
to ``target_bytes``; each run of two or more files is read in order and written as
``part-<first of run>-<last of run>.parquet`` through :class:`~ingest.parquet.PartitionedWriter`
(atomic exactly like the sink's files: temporary file + fsync + rename locally, one whole object
on an object store), and only then are the inputs deleted. A merged range spans two batches or
more, so its name (and temporary name) is never one the sink writes.

**Crashes.** Because runs are consecutive, a file whose range lies inside another file's range in
the same partition is an input of that (complete, atomically written) merged file: every pass first
deletes such *superseded* files. So a crash between writing and deleting costs nothing: the next
pass removes the leftovers, and rewriting the same run yields the same name and rows. Partially
overlapping ranges never come from this protocol (they mean a reset state folder or hand edits):
such a partition is reported and left alone.

**Readers.** A reader listing a partition between the merged file's appearance and the deletion of
its inputs sees both, i.e. rows twice, for the duration of a few deletes. Readers that must never
see that apply the same rule (skip files inside another file's range):
:func:`~ingest.storage.layout.live_files`. The store never lacks a row (inputs go only after the
merged file is complete), but a listing that runs *while* the files change may, like any listing
of a changing folder, miss both the new file and deleted inputs; such a query under-counts once
and is right when rerun.

One compaction at a time: ``<state>/compact.lock`` (an advisory lock) refuses a second one. The
lock is in the state folder, not in the (shared) output: with replicas, run the command from one
place only (one replica's settings, e.g. one CronJob with ``concurrencyPolicy: Forbid``), since
two compactions would write the same merged names at once.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import re
import sqlite3
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pyarrow as pa

from ingest.checkpoint import CheckpointStore
from ingest.config import Settings, load_settings
from ingest.errors import IngestError
from ingest.fleet.store import STORE_FILE
from ingest.parquet import (
    PARTITION_KEY,
    PartitionedWriter,
    parse_temp_file_name,
)
from ingest.schemas import REJECTED, TELEMETRY
from ingest.storage import OutputStore, StoredFile
from ingest.storage.layout import (
    OverlappingFilesError,
    PartFile,
    by_replica,
    part_files,
    superseded,
)

log = logging.getLogger("ingest.compact")

MIB = 1024 * 1024
DEFAULT_OLDER_THAN_DAYS = 2
DEFAULT_TARGET_BYTES = 128 * MIB
LOCK_FILE = "compact.lock"
_PARTITION = re.compile(rf"{PARTITION_KEY}=(\d{{4}}-\d{{2}}-\d{{2}})")


class CompactionError(IngestError):
    """Compaction cannot run (lock held, unreadable state) or found something it must not touch."""


@dataclass(frozen=True, slots=True)
class TableSpec:
    """How the sink partitions a table: the same derivation must put merged rows back in place."""

    name: str
    schema: str
    date_column: str
    fallback_date_column: str | None = None


TABLES = (
    TableSpec("telemetry", TELEMETRY, "timestamp", "received_at"),
    TableSpec("rejected", REJECTED, "received_at"),
    TableSpec("clearance", "clearance.v1", "observed_at"),
)


@dataclass
class TableReport:
    """What one pass did (or, with ``dry_run``, would do) to one table."""

    table: str
    bound: int  # this command's own replica's committed bound (from the state folder)
    # Every replica's bound used in this pass: the own one exact, the others from the listing.
    bounds: dict[str, int] = field(default_factory=dict)
    partitions: int = 0
    files_before: int = 0
    files_after: int = 0
    runs: int = 0
    rows_merged: int = 0
    bytes_merged: int = 0
    superseded_removed: int = 0
    temporaries_removed: int = 0
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def rows_per_s(self) -> float:
        return self.rows_merged / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True, slots=True)
class Policy:
    older_than_days: int = DEFAULT_OLDER_THAN_DAYS
    target_bytes: int = DEFAULT_TARGET_BYTES
    dry_run: bool = False


# -- planning (pure) ------------------------------------------------------------------------------


def plan_runs(parts: Sequence[PartFile], bound: int, target_bytes: int) -> list[list[PartFile]]:
    """Consecutive runs of committed files (``last <= bound``) to merge, each of >= 2 files.

    ``parts`` are the live files of one partition in LSN order. A run grows while its size stays
    within ``target_bytes``; a file at or above it is left as it is.
    """
    runs: list[list[PartFile]] = []
    current: list[PartFile] = []
    size = 0
    for part in parts:
        if part.last > bound:
            break  # everything after it is newer still (ranges are disjoint and sorted)
        if current and size + part.stored.size > target_bytes:
            runs.append(current)
            current, size = [], 0
        current.append(part)
        size += part.stored.size
    runs.append(current)
    return [run for run in runs if len(run) >= 2]


def closed_before(today: date, older_than_days: int) -> date:
    """Partitions dated before this day are closed."""
    return today - timedelta(days=older_than_days)


# -- execution ------------------------------------------------------------------------------------


class Compactor:
    """One pass over every table of ``store``, with the committed bounds read from ``state``."""

    def __init__(
        self,
        store: OutputStore,
        state: Path,
        policy: Policy,
        *,
        compression_level: int = 3,
        today: date | None = None,
        replica: str = "",
    ) -> None:
        self._store = store
        self._replica = replica  # whose committed bounds ``state`` holds
        self._state = state
        self._policy = policy
        self._compression_level = compression_level
        self._cutoff = closed_before(today or datetime.now(UTC).date(), policy.older_than_days)

    def run(self) -> list[TableReport]:
        with _exclusive(self._state / LOCK_FILE):
            bounds = self.bounds()
            return [self.compact_table(spec, bounds[spec.name]) for spec in TABLES]

    def bounds(self) -> dict[str, int]:
        """The highest committed LSN / exported transition id per table, read now.

        Bounds only grow, so reading them once at the start is safe for the whole pass.
        """
        committed = CheckpointStore(self._state / "checkpoint.json").load().committed_lsn
        return {"telemetry": committed, "rejected": committed, "clearance": self._exported_id()}

    def _exported_id(self) -> int:
        path = self._state / STORE_FILE
        if not path.exists():
            return 0
        # Read-only, so compaction never creates or migrates the daemon's clearance store.
        # Coupled to ClearanceStateStore's export table (ingest.fleet.store).
        try:
            with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
                row = db.execute("SELECT exported_id FROM export").fetchone()
        except sqlite3.Error as exc:
            raise CompactionError(
                f"cannot read the clearance export mark in {path}: {exc}"
            ) from exc
        return int(row[0]) if row else 0

    def compact_table(self, spec: TableSpec, bound: int) -> TableReport:
        """One pass over table ``spec``; ``bound`` is the own replica's committed bound."""
        started = time.perf_counter()
        report = TableReport(spec.name, bound)
        store = self._store
        listing = store.list_files(store.join(spec.name))
        report.bounds = replica_bounds(part_files(listing), own=self._replica, own_bound=bound)
        by_partition: dict[str, list[StoredFile]] = {}
        for stored in listing:
            by_partition.setdefault(stored.folder, []).append(stored)
        for folder, files in sorted(by_partition.items()):
            match = _PARTITION.fullmatch(folder.rsplit("/", 1)[-1])
            if match is None or date.fromisoformat(match.group(1)) >= self._cutoff:
                continue
            report.partitions += 1
            try:
                self._compact_partition(spec, files, report)
            except (CompactionError, OverlappingFilesError) as exc:
                report.skipped.append(f"{store.describe(folder)}: {exc}")
                # Runs merged before the problem stay merged: count what is there now.
                report.files_after += len(part_files(store.list_files(folder)))
                log.warning("compaction skipped %s: %s", store.describe(folder), exc)
        report.seconds = time.perf_counter() - started
        return report

    def _compact_partition(
        self, spec: TableSpec, files: list[StoredFile], report: TableReport
    ) -> None:
        store, dry_run = self._store, self._policy.dry_run
        parts = part_files(files)
        report.files_before += len(parts)
        leftovers = [f.path for f in files if _is_dead_temporary(f.name, report.bounds)]
        gone = superseded(parts)  # per replica, raises before anything is deleted
        if not dry_run:
            report.temporaries_removed += store.delete(leftovers)
            report.superseded_removed += store.delete(p.stored.path for p in gone)
        else:
            report.temporaries_removed += len(leftovers)
            report.superseded_removed += len(gone)
        gone_ids = {id(p) for p in gone}
        live = [p for p in parts if id(p) not in gone_ids]
        for replica, own_files in sorted(by_replica(live).items()):
            bound = report.bounds[replica]  # from the same listing: every replica has one
            runs = plan_runs(own_files, bound, self._policy.target_bytes)
            writer = self._writer(spec, replica) if runs and not dry_run else None
            for run in runs:
                rows = self._merge(spec, writer, run) if writer is not None else 0
                report.runs += 1
                report.rows_merged += rows
                report.bytes_merged += sum(p.stored.size for p in run)
            report.files_after += len(own_files) - sum(len(run) - 1 for run in runs)

    def _writer(self, spec: TableSpec, replica: str) -> PartitionedWriter:
        """Writes merged files under ``replica``'s names, exactly like that replica's sink."""
        return PartitionedWriter(
            self._store,
            spec.name,
            schema_name=spec.schema,
            compression_level=self._compression_level,
            replica=replica,
        )

    def _merge(self, spec: TableSpec, writer: PartitionedWriter, run: list[PartFile]) -> int:
        """Write ``run`` as one file, then delete its inputs; returns the rows merged."""
        store = self._store
        try:
            table = store.read_tables([p.stored.path for p in run])
        except pa.ArrowInvalid as exc:
            raise CompactionError(
                f"{run[0].stored.name}..{run[-1].stored.name} do not share one schema ({exc}); "
                "left as they are"
            ) from exc
        first, last = run[0].first, run[-1].last
        partition = run[0].stored.folder.rsplit("/", 1)[-1]
        date_column, fallback = spec.date_column, spec.fallback_date_column
        # Checked before writing: a row that belongs elsewhere (files moved by hand?) would make
        # write() put part-<first>-<last> into another partition, possibly over a merged file
        # with the same range there.
        if writer.partitions_of(table, date_column=date_column, fallback_date_column=fallback) != [
            partition
        ]:
            raise CompactionError(
                f"rows of {run[0].stored.name}..{run[-1].stored.name} do not all belong to "
                f"{partition}; left as they are"
            )
        writer.write(
            table,
            first_lsn=first,
            last_lsn=last,
            date_column=date_column,
            fallback_date_column=fallback,
        )
        self.inputs_written(run)
        store.delete(p.stored.path for p in run)
        rows: int = table.num_rows
        return rows

    def inputs_written(self, run: list[PartFile]) -> None:
        """Called between writing a merged file and deleting its inputs (a test's crash point)."""


def replica_bounds(parts: Sequence[PartFile], *, own: str, own_bound: int) -> dict[str, int]:
    """Each replica's committed bound: ``own_bound`` for ``own``, from the listing for the others.

    ``parts`` are every part file of one table (all partitions). For another replica the bound is
    just below its newest range: see "Replicas" in the module docstring for why that is committed.
    Merged files end at or below a bound, so taking the lowest first among the files ending
    highest can only lower the result, never raise it above ``committed_lsn``.
    """
    bounds = {own: own_bound}
    for replica, files in by_replica(parts).items():
        if replica == own:
            continue
        newest = max(p.last for p in files)
        bounds[replica] = min(p.first for p in files if p.last == newest) - 1
    return bounds


def _is_dead_temporary(name: str, bounds: dict[str, int]) -> bool:
    """A temporary file of a committed range: left by a crash, never completed by anyone."""
    parsed = parse_temp_file_name(name)
    return parsed is not None and parsed.last <= bounds.get(parsed.replica, 0)


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise CompactionError(
                f"another compaction holds {lock_path}; wait for it to finish"
            ) from exc
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# -- command line ---------------------------------------------------------------------------------


def add_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``hm-ingest compact``."""
    parser = commands.add_parser(
        "compact",
        help="merge small Parquet files of closed date partitions (safe while the daemon runs)",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="the daemon's TOML settings ([output] path and [state] path are used); every key "
        "can also be set as HM_INGEST_<SECTION>_<KEY>",
    )
    parser.add_argument(
        "--older-than-days",
        type=_non_negative,
        default=DEFAULT_OLDER_THAN_DAYS,
        help="compact partitions dated more than N days before today, UTC (default "
        f"{DEFAULT_OLDER_THAN_DAYS}; 0 = every day before today)",
    )
    parser.add_argument(
        "--target-mib",
        type=_positive,
        default=DEFAULT_TARGET_BYTES // MIB,
        help=f"largest merged file, in MiB of input (default {DEFAULT_TARGET_BYTES // MIB})",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print what would be merged, change nothing"
    )
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    settings = load_settings(args.config, os.environ)
    try:
        reports = compact(
            settings,
            Policy(
                older_than_days=args.older_than_days,
                target_bytes=args.target_mib * MIB,
                dry_run=args.dry_run,
            ),
        )
    except CompactionError as exc:
        print(f"hm-ingest compact: {exc}", file=sys.stderr)
        return 1
    for report in reports:
        print(render(report, dry_run=args.dry_run))
    return 1 if any(r.skipped for r in reports) else 0


def compact(settings: Settings, policy: Policy, *, today: date | None = None) -> list[TableReport]:
    """One compaction pass with the daemon's settings."""
    store = OutputStore.open(settings.output.path)
    state = settings.state.path
    if not (state / "checkpoint.json").exists():
        raise CompactionError(
            f"no checkpoint in {state}: compaction needs the daemon's [state] path to know which "
            "files are committed; point --config at the daemon's settings"
        )
    if settings.iceberg.enabled:
        raise CompactionError(
            "[iceberg] enabled = true: the Iceberg tables reference the Parquet files under "
            f"{store.display}/telemetry and /rejected by name, and merging them deletes files the "
            "tables still read; compact through the tables instead (Spark: CALL "
            "<catalog>.system.rewrite_data_files('hm_ingest.telemetry'); Trino: ALTER TABLE ... "
            "EXECUTE optimize), or set [iceberg] enabled = false if nothing reads the tables"
        )
    compactor = Compactor(
        store,
        state,
        policy,
        compression_level=settings.output.compression_level,
        today=today,
        replica=settings.replica.id,
    )
    return compactor.run()


def render(report: TableReport, *, dry_run: bool) -> str:
    verb = "would merge" if dry_run else "merged"
    line = (
        f"{report.table}: {report.partitions} closed partition(s), files {report.files_before} -> "
        f"{report.files_after}; {verb} {report.runs} run(s)"
    )
    if not dry_run and report.runs:
        line += (
            f", {report.rows_merged} rows, {report.bytes_merged / MIB:.1f} MiB in "
            f"{report.seconds:.2f} s ({report.rows_per_s:,.0f} rows/s)"
        )
    if report.superseded_removed or report.temporaries_removed:
        line += (
            f"; removed {report.superseded_removed} leftover input(s) of earlier merges and "
            f"{report.temporaries_removed} temporary file(s)"
        )
    for problem in report.skipped:
        line += f"\n  skipped {problem}"
    return line


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


__all__ = [
    "TABLES",
    "CompactionError",
    "Compactor",
    "Policy",
    "TableReport",
    "add_command",
    "compact",
    "main",
]
