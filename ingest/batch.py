"""One pending batch: a contiguous range of log records, decoded and deduplicated, not yet written.

Rows are held as Arrow record batches rather than Python tuples once a chunk fills up: a decoded
row as a tuple of Python objects costs about 400 bytes, the same row in Arrow about 200 (most of
it the topic string), and a batch may hold a quarter of a million rows.

Memory at the default ``flush_rows = 250000`` (``bench/batch_memory.py``, this traffic): the rows
take 51 MB in Arrow and the dedupe keys about 20 MB. The Arrow buffers come from the C library's
allocator rather than pyarrow's default (mimalloc): each seal grows and frees builder buffers, and
mimalloc kept those freed pages resident, 35 MB more RSS per batch than the rows themselves.
"""

from __future__ import annotations

import hashlib
import time
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import pyarrow as pa

from ingest.decode import Decoded
from ingest.schemas import REJECTED, TELEMETRY, arrow_schema
from ingest.wal import LogRecord

# Rejection reason of a message whose VIN's clearance HM revoked, rejected or canceled.
REJECTED_NOT_CLEARED = "not_cleared"


class Clearances(Protocol):
    """What the sink judges VINs by (:class:`ingest.fleet.store.ClearanceStateStore`)."""

    @property
    def refused_vins(self) -> frozenset[str]:
        """The VINs refused now: an immutable snapshot, replaced (not mutated) on each change."""


# Rows per Arrow chunk: big enough that pa.array's per-call overhead vanishes, small enough that
# the Python tuples waiting for conversion stay a few megabytes.
CHUNK_ROWS = 8192
# See the module docstring: freed builder buffers go back to malloc, which reuses them.
_POOL = pa.system_memory_pool()


def content_digest(topic: str, payload: bytes) -> str:
    """A hash of one received message's topic and payload: the same for every copy of it."""
    return hashlib.blake2b(topic.encode() + b"\0" + payload, digest_size=16).hexdigest()


def dedupe_key(decoded: Decoded, record: LogRecord) -> str:
    """HM's message_id; a payload with none (it is quarantined) is keyed by its content."""
    if decoded.message_id:
        return decoded.message_id
    return "content:" + content_digest(record.topic, record.payload)


class _ChunkedTable:
    def __init__(self, schema: pa.Schema) -> None:
        self.schema = schema
        # The rows are tuples in the schema's column order: pyarrow converts a list of them to
        # a struct array in one pass, a third cheaper than transposing them with zip() and
        # converting each column (bench/batch_memory.py).
        self._row_type = pa.struct(list(schema))
        self.batches: list[pa.RecordBatch] = []
        self.pending: list[tuple[Any, ...]] = []
        self.rows = 0

    def extend(self, rows: list[tuple[Any, ...]]) -> None:
        self.pending.extend(rows)
        self.rows += len(rows)
        if len(self.pending) >= CHUNK_ROWS:
            self._seal()

    def append(self, row: tuple[Any, ...]) -> None:
        self.pending.append(row)
        self.rows += 1

    def _seal(self) -> None:
        if not self.pending:
            return
        rows = pa.array(self.pending, type=self._row_type, memory_pool=_POOL)
        self.batches.append(pa.RecordBatch.from_arrays(rows.flatten(), schema=self.schema))
        self.pending = []

    def table(self) -> pa.Table:
        self._seal()
        return pa.Table.from_batches(self.batches, schema=self.schema)


class _ReceivedAt:
    """Receive time of each key in ``seen``, stored by the key's lsn in one int64 array.

    A dict of Python ints cost ~60 bytes per key (entry plus int object); this costs 8 per record.
    Reads and writes go through ``seen`` for the key's lsn, so a key must be in ``seen`` first.
    """

    def __init__(self, seen: dict[str, int], first_lsn: int) -> None:
        self._seen = seen
        self._first_lsn = first_lsn
        self._values = array("q")

    def __setitem__(self, key: str, received_at_us: int) -> None:
        offset = self._seen[key] - self._first_lsn
        values = self._values
        gap = offset - len(values)
        if gap > 0:  # the records in between were repeats: their slots stay 0
            values.frombytes(bytes(8 * gap))
        if gap >= 0:
            values.append(received_at_us)
        else:
            values[offset] = received_at_us

    def __getitem__(self, key: str) -> int:
        return self._values[self._seen[key] - self._first_lsn]

    def __contains__(self, key: object) -> bool:
        return key in self._seen

    def __len__(self) -> int:
        return len(self._seen)

    def __iter__(self) -> Iterator[str]:
        return iter(self._seen)


@dataclass
class PendingBatch:
    """Records ``first_lsn..last_lsn`` (contiguous), with everything the commit needs."""

    first_lsn: int
    last_lsn: int = 0
    opened_at: float = field(default_factory=time.monotonic)
    oldest_received_us: int = 0
    payload_bytes: int = 0
    duplicates: int = 0
    unknown_properties: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    seen: dict[str, int] = field(default_factory=dict)  # dedupe key → lsn, first occurrence
    seen_at_us: _ReceivedAt = field(init=False, repr=False)
    telemetry: _ChunkedTable = field(default_factory=lambda: _ChunkedTable(arrow_schema(TELEMETRY)))
    rejected: _ChunkedTable = field(default_factory=lambda: _ChunkedTable(arrow_schema(REJECTED)))

    def __post_init__(self) -> None:
        self.seen_at_us = _ReceivedAt(self.seen, self.first_lsn)

    @property
    def records(self) -> int:
        return self.last_lsn - self.first_lsn + 1 if self.last_lsn else 0

    def add(
        self,
        record: LogRecord,
        decoded: Decoded,
        key: str,
        *,
        repeat: bool = False,
        refused: frozenset[str] | None = None,
    ) -> None:
        """Add one logged message under its dedupe ``key``.

        A repeat (``repeat``: of an earlier batch; or a key this batch has already) is only
        counted. A message the decoder rejected goes to ``rejected``, as does one whose VIN
        ``refused`` holds (not cleared); the rest becomes telemetry rows.
        """
        if repeat or key in self.seen:
            self.duplicates += 1
            return
        self.seen[key] = record.lsn
        self.seen_at_us[key] = record.received_at_us
        rejection = decoded.rejection
        if rejection is not None:
            self.add_rejection(
                record, rejection.reason, rejection.detail, rejection.message_id, rejection.vin
            )
            return
        if refused and decoded.vin in refused:
            self.add_rejection(
                record, REJECTED_NOT_CLEARED, REJECTED_NOT_CLEARED, decoded.message_id, decoded.vin
            )
            return
        self.add_rows(decoded)

    def add_rows(self, decoded: Decoded) -> None:
        self.telemetry.extend(decoded.rows)
        self.unknown_properties += decoded.unknown_properties

    def add_rejection(
        self, record: LogRecord, reason: str, detail: str, message_id: str | None, vin: str | None
    ) -> None:
        self.rejected.append(
            (
                record.lsn,
                message_id,
                vin,
                record.topic,
                record.received_at_us,
                reason,
                detail,
                record.payload,
            )
        )
        self.rejected_by_reason[reason] = self.rejected_by_reason.get(reason, 0) + 1
