"""What this daemon knows about its fleet's clearances, kept in SQLite and mirrored in memory.

``state/clearance.sqlite3`` holds three tables:

* ``clearances``: the last known status of every VIN (one row each);
* ``transitions``: one row per observed status change, in order (``id`` increases); the
  Parquet history (:mod:`ingest.fleet.history`) exports them and never deletes them;
* ``export``: how far the Parquet export got, and the range it is writing (its *intent*).

SQLite is the source of truth. Every change runs in one ``BEGIN IMMEDIATE`` transaction that reads
the current rows, records the transitions and commits (WAL journal, ``synchronous=FULL``: committed
means on disk), so the daemon and an operator's ``hm-ingest fleet`` command can share the file
without recording a change twice. The in-memory mirror is refreshed from the database by every
complete observation, so changes made by the other process reach the gate within one cycle.

Statuses are HM's (``pending``, ``approved``, ``rejected``, ``revoking``, ``revoked``,
``canceling``, ``canceled``, plus any HM adds), and one of ours: ``gone``, recorded when a
*complete* fleet listing no longer holds a VIN we knew. ``gone`` does not refuse data (we no longer
know anything about that VIN), and a VIN that comes back simply transitions out of it.

:attr:`ClearanceStateStore.refused_vins` is the sink's gate: the sink takes it as each logged
group is handed over, from intake's thread, so it is an immutable snapshot (a ``frozenset``
swapped in by reference) that takes no lock and never touches SQLite.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import NamedTuple, Self

from ingest.errors import ConfigError, IngestError
from ingest.hmapi import Clearance

STORE_FILE = "clearance.sqlite3"
GONE = "gone"
NOT_CLEARED = "not_cleared"
# Data stops flowing only where HM has said no; anything else (unknown, pending, in transition)
# lets messages through: missing knowledge must never drop data.
REFUSED_STATUSES = frozenset({"revoked", "rejected", "canceled"})
SOURCES = frozenset({"reconcile", "webhook", "request", "cli"})
GONE_REASON = "no longer in HM's fleet listing"
# Another process (the CLI beside the daemon) may hold the write lock for a moment.
BUSY_TIMEOUT_MS = 10_000
_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS clearances (
    vin TEXT PRIMARY KEY,
    brand TEXT,
    status TEXT NOT NULL,
    reason TEXT,
    observed_at_us INTEGER NOT NULL,
    source TEXT NOT NULL,
    seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS transitions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    vin TEXT NOT NULL,
    brand TEXT,
    from_status TEXT,
    to_status TEXT NOT NULL,
    reason TEXT,
    observed_at_us INTEGER NOT NULL,
    changed_at_us INTEGER,
    source TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS transitions_by_vin ON transitions (vin, id);
CREATE TABLE IF NOT EXISTS export (
    singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
    exported_id INTEGER NOT NULL,
    intent_first INTEGER,
    intent_last INTEGER
);
INSERT OR IGNORE INTO export VALUES (1, 0, NULL, NULL);
"""
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Only this fixed column list is ever formatted into SQL (S608 below); values are bound.
_TRANSITION_COLUMNS = (
    "id, vin, brand, from_status, to_status, reason, observed_at_us, changed_at_us, source"
)


@dataclass(frozen=True)
class Transition:
    """One observed status change. ``from_status`` is ``None`` the first time a VIN is seen.

    ``changed_at`` is when HM says the new status began (its changelog), when known; ``id`` is
    the store's row id once recorded.
    """

    vin: str
    brand: str | None
    from_status: str | None
    to_status: str
    reason: str | None
    observed_at: datetime
    source: str
    changed_at: datetime | None = None
    id: int | None = None


@dataclass(frozen=True)
class ExportBatch:
    """Transitions ``[first_id, last_id]`` being written to Parquet (see ingest.fleet.history)."""

    first_id: int
    last_id: int
    transitions: list[Transition]


@dataclass(frozen=True)
class _Known:
    brand: str | None
    status: str
    seq: int


class ClearanceStoreError(IngestError):
    """The clearance store could not be written (disk full, locked too long by another process).

    Retriable: nothing was committed, and the next cycle tries again.
    """

    retriable = True


class _Change(NamedTuple):
    vin: str
    brand: str | None
    status: str
    reason: str | None
    changed_us: int | None


class ClearanceStateStore:
    """The fleet's clearance statuses and their history (see the module docstring).

    Thread-safe: writers serialise on a lock (SQLite work blocks on fsync, so async callers may
    run them in a thread); :meth:`refusal` takes no lock at all.
    """

    def __init__(self, path: Path, *, busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            self._db.execute("PRAGMA journal_mode = WAL")
            # FULL: a commit is fsynced, so a transition the gate acted on survives power loss.
            self._db.execute("PRAGMA synchronous = FULL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > _SCHEMA_VERSION:
                raise ConfigError(
                    f"{path} was written by a newer hm-fleet-ingest (schema {version}); "
                    "upgrade this one or move the file away",
                    key="state.path",
                )
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            raise ConfigError(
                f"cannot open the clearance store {path}: {exc}; check that state.path is a "
                "writable folder on a local disk",
                key="state.path",
            ) from exc
        self._known: dict[str, _Known] = {}
        self._refused: frozenset[str] = frozenset()
        with self._lock:
            self._reload()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- the gate ----------------------------------------------------------------------------

    @property
    def refused_vins(self) -> frozenset[str]:
        """The VINs HM last said are revoked, rejected or canceled (swapped, never mutated:
        compare by identity)."""
        return self._refused

    def refusal(self, vin: str) -> str | None:
        """The same judgement for one VIN: ``"not_cleared"`` when ``vin`` is refused, else None."""
        return NOT_CLEARED if vin in self._refused else None

    # -- reads -------------------------------------------------------------------------------

    def statuses(self) -> dict[str, str]:
        with self._lock:
            return {vin: known.status for vin, known in self._known.items()}

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(Counter(known.status for known in self._known.values()))

    def transitions(self, vin: str) -> list[Transition]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_TRANSITION_COLUMNS} FROM transitions WHERE vin = ? ORDER BY id",  # noqa: S608
                (vin,),
            ).fetchall()
        return [_transition(row) for row in rows]

    def generation(self) -> int:
        """A mark to pass to :meth:`observe` as ``as_of`` for a listing requested after now."""
        with self._lock:
            return self._max_seq()

    # -- writes ------------------------------------------------------------------------------

    def observe(
        self,
        clearances: Iterable[Clearance],
        *,
        source: str,
        at: datetime,
        complete: bool,
        as_of: int | None = None,
    ) -> list[Transition]:
        """Record these statuses; returns the transitions (changes only), in store order.

        ``complete``: ``clearances`` is the whole fleet as HM lists it, so a known VIN missing
        from it becomes ``gone``. ``as_of`` (from :meth:`generation`, taken before the listing
        was requested) protects newer knowledge: a VIN updated since then (a webhook that arrived
        while the listing was in flight) is neither overwritten nor marked gone.
        """
        _check_source(source)
        listed = {c.vin: c for c in clearances}
        observed_us = to_micros(at)
        with self._lock:
            recorded = self._observe(listed, source, observed_us, complete, as_of)
            self._reload()
        return recorded

    def _observe(
        self,
        listed: dict[str, Clearance],
        source: str,
        observed_us: int,
        complete: bool,
        as_of: int | None,
    ) -> list[Transition]:
        with self._transaction():
            known = self._read_known()
            seq = self._max_seq()
            changes: list[_Change] = []
            for vin, clearance in listed.items():
                before = known.get(vin)
                if before is not None and as_of is not None and before.seq > as_of:
                    continue
                reason, changed_at = _latest_entry(clearance)
                brand = clearance.brand or (before.brand if before else None)
                if before is None or before.status != clearance.status:
                    changes.append(_Change(vin, brand, clearance.status, reason, changed_at))
                elif brand != before.brand:
                    self._db.execute("UPDATE clearances SET brand = ? WHERE vin = ?", (brand, vin))
            if complete:
                for vin, before in known.items():
                    if vin in listed or before.status == GONE:
                        continue
                    if as_of is not None and before.seq > as_of:
                        continue
                    changes.append(_Change(vin, before.brand, GONE, GONE_REASON, None))
            # Returned inside the block: the transaction commits on the way out.
            return [
                self._record(
                    known.get(change.vin),
                    change,
                    seq=seq + n,
                    observed_us=observed_us,
                    source=source,
                )
                for n, change in enumerate(changes, start=1)
            ]

    def observe_status(
        self,
        vin: str,
        status: str,
        *,
        reason: str | None,
        source: str,
        at: datetime,
        brand: str | None = None,
        changed_at: datetime | None = None,
    ) -> Transition | None:
        """Record one VIN's status (a webhook, or the answer to our own request).

        Returns the transition, or ``None`` when the status did not change.
        """
        _check_source(source)
        with self._lock:
            with self._transaction():
                row = self._db.execute(
                    "SELECT brand, status, seq FROM clearances WHERE vin = ?", (vin,)
                ).fetchone()
                before = _Known(*row) if row else None
                if before is not None and before.status == status:
                    return None
                seq = self._max_seq() + 1
                change = _Change(
                    vin,
                    brand or (before.brand if before else None),
                    status,
                    reason,
                    to_micros(changed_at) if changed_at else None,
                )
                transition = self._record(
                    before, change, seq=seq, observed_us=to_micros(at), source=source
                )
            self._remember(vin, _Known(transition.brand, status, seq))
        return transition

    # -- Parquet export bookkeeping (ingest.fleet.history) -----------------------------------

    def begin_export(self, limit: int) -> ExportBatch | None:
        """The next range of transitions to write, recorded durably as the export's intent.

        A range whose export was interrupted (a crash after writing files, before
        :meth:`finish_export`) is returned again, exactly, so its files are rewritten under the
        same names rather than duplicated.
        """
        with self._lock, self._transaction():
            exported, first, last = self._db.execute(
                "SELECT exported_id, intent_first, intent_last FROM export"
            ).fetchone()
            if first is None:
                rows = self._db.execute(
                    f"SELECT {_TRANSITION_COLUMNS} FROM transitions WHERE id > ? ORDER BY id "  # noqa: S608
                    "LIMIT ?",
                    (exported, limit),
                ).fetchall()
                if not rows:
                    return None
                first, last = rows[0][0], rows[-1][0]
                self._db.execute(
                    "UPDATE export SET intent_first = ?, intent_last = ?", (first, last)
                )
            else:
                rows = self._db.execute(
                    f"SELECT {_TRANSITION_COLUMNS} FROM transitions WHERE id BETWEEN ? AND ? "  # noqa: S608
                    "ORDER BY id",
                    (first, last),
                ).fetchall()
        return ExportBatch(first, last, [_transition(row) for row in rows])

    def finish_export(self, batch: ExportBatch) -> None:
        with self._lock, self._transaction():
            self._db.execute(
                "UPDATE export SET exported_id = ?, intent_first = NULL, intent_last = NULL "
                "WHERE intent_first = ? AND intent_last = ?",
                (batch.last_id, batch.first_id, batch.last_id),
            )

    def unexported(self) -> int:
        """Transitions recorded but not yet exported to Parquet."""
        with self._lock:
            row = self._db.execute(
                "SELECT COUNT(*) FROM transitions WHERE id > (SELECT exported_id FROM export)"
            ).fetchone()
        return int(row[0])

    # -- internals (callers hold self._lock) ---------------------------------------------------

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        # IMMEDIATE takes the write lock up front, so read-then-write cannot interleave with
        # another process doing the same.
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise ClearanceStoreError(
                f"cannot write the clearance store {self.path}: {exc}"
            ) from exc
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise ClearanceStoreError(
                    f"cannot write the clearance store {self.path}: {exc}"
                ) from exc
            raise

    def _max_seq(self) -> int:
        return int(self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM clearances").fetchone()[0])

    def _read_known(self) -> dict[str, _Known]:
        rows = self._db.execute("SELECT vin, brand, status, seq FROM clearances").fetchall()
        return {vin: _Known(brand, status, seq) for vin, brand, status, seq in rows}

    def _record(
        self, before: _Known | None, change: _Change, *, seq: int, observed_us: int, source: str
    ) -> Transition:
        vin, brand, status, reason, changed_us = change
        from_status = before.status if before else None
        self._db.execute(
            "INSERT INTO clearances (vin, brand, status, reason, observed_at_us, source, seq) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (vin) DO UPDATE SET brand = excluded.brand, "
            "status = excluded.status, reason = excluded.reason, "
            "observed_at_us = excluded.observed_at_us, source = excluded.source, "
            "seq = excluded.seq",
            (vin, brand, status, reason, observed_us, source, seq),
        )
        cursor = self._db.execute(
            "INSERT INTO transitions (vin, brand, from_status, to_status, reason, observed_at_us, "
            "changed_at_us, source) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (vin, brand, from_status, status, reason, observed_us, changed_us, source),
        )
        return Transition(
            vin=vin,
            brand=brand,
            from_status=from_status,
            to_status=status,
            reason=reason,
            observed_at=from_micros(observed_us),
            source=source,
            changed_at=from_micros(changed_us) if changed_us is not None else None,
            id=cursor.lastrowid,
        )

    def _reload(self) -> None:
        self._known = self._read_known()
        self._refused = frozenset(
            vin for vin, known in self._known.items() if known.status in REFUSED_STATUSES
        )

    def _remember(self, vin: str, known: _Known) -> None:
        self._known[vin] = known
        refused = known.status in REFUSED_STATUSES
        if refused != (vin in self._refused):
            # A new frozenset swapped in by reference: the sink thread sees the old or the new
            # set, never a half-updated one.
            self._refused = self._refused | {vin} if refused else self._refused - {vin}


def _check_source(source: str) -> None:
    if source not in SOURCES:
        raise ValueError(f"source {source!r} is not one of {sorted(SOURCES)}")


def _latest_entry(clearance: Clearance) -> tuple[str | None, int | None]:
    """HM's reason and start time of the clearance's current status, from its changelog."""
    for entry in reversed(clearance.changelog):
        if entry.status == clearance.status:
            return entry.reason, to_micros(entry.timestamp) if entry.timestamp else None
    return None, None


def to_micros(moment: datetime) -> int:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)  # HM omits the zone in places; it means UTC
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_micros(value: int) -> datetime:
    return _EPOCH + timedelta(microseconds=value)


def _transition(row: tuple[object, ...]) -> Transition:
    ident, vin, brand, from_status, to_status, reason, observed, changed, source = row
    assert isinstance(observed, int)
    return Transition(
        vin=str(vin),
        brand=brand if isinstance(brand, str) else None,
        from_status=from_status if isinstance(from_status, str) else None,
        to_status=str(to_status),
        reason=reason if isinstance(reason, str) else None,
        observed_at=from_micros(observed),
        source=str(source),
        changed_at=from_micros(changed) if isinstance(changed, int) else None,
        id=int(ident) if isinstance(ident, int) else None,
    )


__all__ = [
    "GONE",
    "NOT_CLEARED",
    "REFUSED_STATUSES",
    "STORE_FILE",
    "ClearanceStateStore",
    "ClearanceStoreError",
    "ExportBatch",
    "Transition",
]
