"""Which messages were already written: a message-id index that survives restarts.

A key (HM message id) is a duplicate at LSN ``n`` iff it was seen at a *smaller* LSN, earlier in
the same batch or in an earlier batch. Seeing it at ``n`` itself or later is not a duplicate: that
is this very batch being replayed after a crash (``record`` ran, ``commit`` did not), and the replay
must decide exactly as the first attempt did so it writes the same rows into the same files.

Entries older than the retention are pruned; a message redelivered after that is written again.
Prune only while no batch is pending: a replay whose older duplicates were pruned in between
would keep rows the first attempt dropped.

SQLite file, WAL journal. One owner: the connection may be used from any one thread at a time
(e.g. via ``asyncio.to_thread``), never from two at once.

In front of it, in memory, a Bloom filter of every key it holds: nearly every key asked about is
new, and the filter says so without a B-tree lookup (SQLite: 1.5-5 us per key, growing with the
index; the filter: ~0.2 us). It may say "maybe" for a key the index does not hold (1 % of new
keys, more once it is full), never "no" for one it holds, so a duplicate is never missed.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from operator import itemgetter
from pathlib import Path
from types import TracebackType
from typing import Self

from rbloom import Bloom

from ingest.errors import LogError

DEFAULT_RETENTION_S = 7 * 86400.0
# The index's file in [state] path.
DEDUPE_FILE = "dedupe.sqlite3"
_US_PER_S = 1_000_000
# Keys per SELECT ... IN (...). SQLite allows 32766 host parameters since 3.32 (999 before); 500
# is already past the point where larger chunks stop paying off (see bench/dedupe_bench.py).
_QUERY_CHUNK = 500
# The Bloom filter: sized for twice the keys held at open (at least FILTER_MIN_KEYS), rebuilt
# from the index at twice the keys then held once more keys were added than it was sized for.
# Past FILTER_MAX_KEYS (64 MB of memory) it is not grown: its false positives rise, and with them
# the lookups that reach SQLite, but it still never hides a key.
FILTER_FALSE_POSITIVES = 0.01
FILTER_MIN_KEYS = 1_000_000
FILTER_MAX_KEYS = 50_000_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS seen (
    key TEXT PRIMARY KEY,
    lsn INTEGER NOT NULL,
    seen_at_us INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS seen_by_age ON seen (seen_at_us);
"""
# WITHOUT ROWID: keyed lookups are the whole workload, and the key is stored once, not twice.
# The age index makes prune a range delete instead of a scan of every key.

# Keep the earliest LSN whatever order entries arrive in (plain INSERT OR IGNORE would keep the
# first one *inserted*, which equals the earliest only when callers sort).
_RECORD = """
INSERT INTO seen (key, lsn, seen_at_us) VALUES (?, ?, ?)
ON CONFLICT (key) DO UPDATE SET lsn = excluded.lsn, seen_at_us = excluded.seen_at_us
WHERE excluded.lsn < seen.lsn
"""


class DedupeIndex:
    """The ``seen`` table at ``path``; a context manager that closes the database."""

    def __init__(self, path: Path, *, retention_s: float = DEFAULT_RETENTION_S) -> None:
        self._retention_us = round(retention_s * _US_PER_S)
        try:
            # isolation_level=None: transactions are explicit, so one batch is one transaction.
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL, not NORMAL: in WAL mode NORMAL survives a process crash but may roll back the
            # last transactions on a power loss or kernel crash, while the checkpoint commit that
            # follows record() is fsynced. The index would then miss a committed batch's ids and
            # keep their redeliveries (which cluster around exactly such crashes) as new rows.
            # Replays alone would be fine with NORMAL (they decide the same with or without the
            # batch's own entries); it is the committed batches that need the fsync. FULL costs
            # one WAL fsync per record() call, i.e. per batch.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise LogError(f"could not open dedupe index {path}: {exc}") from exc
        self._path = path
        self._filter, self._filter_room = self._build_filter()

    def _build_filter(self) -> tuple[Bloom, int | None]:
        """A filter holding every key of the index, and how many more keys it is sized for
        (None: it is at FILTER_MAX_KEYS and is not rebuilt when they are added)."""
        try:
            (held,) = self._db.execute("SELECT count(*) FROM seen").fetchone()
            capacity = min(max(FILTER_MIN_KEYS, 2 * held), FILTER_MAX_KEYS)
            bloom = Bloom(capacity, FILTER_FALSE_POSITIVES)
            # Streamed from the cursor: the keys never sit in a list (3M of them: ~250 MB).
            bloom.update(key for (key,) in self._db.execute("SELECT key FROM seen"))
        except sqlite3.Error as exc:
            raise LogError(f"could not read dedupe index {self._path}: {exc}") from exc
        return bloom, capacity - held if capacity < FILTER_MAX_KEYS else None

    def duplicates(self, candidates: Sequence[tuple[str, int]]) -> set[int]:
        """LSNs among ``candidates`` (``(key, lsn)`` of one batch) whose key was seen earlier."""
        in_filter = self._filter.__contains__
        keys = [key for key in {key: None for key, _ in candidates} if in_filter(key)]
        earliest: dict[str, int] = {}
        try:
            for start in range(0, len(keys), _QUERY_CHUNK):
                chunk = keys[start : start + _QUERY_CHUNK]
                marks = ",".join("?" * len(chunk))
                query = f"SELECT key, lsn FROM seen WHERE key IN ({marks})"  # noqa: S608 -- only "?" marks are interpolated
                earliest.update(self._db.execute(query, chunk))
        except sqlite3.Error as exc:
            raise LogError(f"could not query dedupe index {self._path}: {exc}") from exc
        found = set()
        for key, lsn in candidates:
            first = earliest.get(key)
            if first is None or lsn < first:
                # Unseen, or only seen at a later LSN (a replay): this occurrence is the earliest.
                earliest[key] = lsn
            elif first < lsn:
                found.add(lsn)
        return found

    def record(self, entries: Sequence[tuple[str, int, int]]) -> None:
        """Store ``(key, lsn, seen_at_us)`` entries in one transaction; the earliest LSN wins.

        In key order: ids are random, so once the index outgrows a batch nearly every id lands
        on a leaf page of its own. Taken in key order, each leaf is changed for all its ids at
        once and left for good, instead of being come back to after SQLite's 2 MB cache may
        have let it go. ``bench/dedupe_bench.py --growth``, 30,000 ids per commit: 4.6 -> 3.8 us
        per id into an empty index, 14.2 -> 11.8 at 1,000,000 ids.
        """
        self._add_to_filter(entries)
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(_RECORD, sorted(entries, key=itemgetter(0)))
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise LogError(f"could not record in dedupe index {self._path}: {exc}") from exc

    def _add_to_filter(self, entries: Sequence[tuple[str, int, int]]) -> None:
        """Before the keys are stored (a key in the filter and not in the index costs a lookup;
        the other way round would hide a duplicate)."""
        if self._filter_room is not None and self._filter_room < len(entries):
            # Full: sized afresh from what the index holds (pruned keys leave it then); these
            # entries, which it does not hold yet, are added below.
            self._filter, self._filter_room = self._build_filter()
        if self._filter_room is not None:
            self._filter_room -= len(entries)
        self._filter.update(key for key, _, _ in entries)

    def prune(self, now_us: int) -> int:
        """Delete entries first seen more than the retention before ``now_us``; returns how many."""
        try:
            cursor = self._db.execute(
                "DELETE FROM seen WHERE seen_at_us < ?", (now_us - self._retention_us,)
            )
        except sqlite3.Error as exc:
            raise LogError(f"could not prune dedupe index {self._path}: {exc}") from exc
        return cursor.rowcount

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
