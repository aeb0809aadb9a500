"""The pipeline's commit point: how far the write-ahead log has reached Parquet.

Crash protocol, for each batch of consecutive log records ``[first, last]``:

1. ``begin(first, last)`` durably records the intent *before* any file is written;
2. the batch is decoded, duplicates dropped, and ``PartitionedWriter.write`` writes
   ``part-<first>-<last>.parquet`` into each date folder (atomic rename per file);
3. ``DedupeIndex.record`` stores the batch's message ids at their LSNs;
4. ``commit(last)`` durably sets ``committed_lsn = last`` and clears the intent.

On restart ``load()`` says where to resume. With no intent, the next batch starts after
``committed_lsn``. With an intent, that exact batch ``[first, last]`` is replayed before anything
else: the same records give the same dedupe decisions (the index ignores entries at the batch's
own LSNs, see ``ingest.dedupe``), hence the same rows, and the writer overwrites the same file
names with identical content. A crash anywhere in steps 1-4 therefore ends in the same files,
never an extra copy; a crash before step 1 leaves nothing to undo. The log must keep records
until they are committed, so a replay can read them.

The file is small JSON with a CRC-32, replaced atomically (temporary file, fsync, ``os.replace``,
fsync of the folder), so a torn write cannot happen and a failed check means damage or a hand edit.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from ingest.errors import LogCorruptError, LogError
from ingest.testing import faultpoints

FORMAT_VERSION = 1


@dataclass(frozen=True, slots=True)
class PendingFlush:
    """A batch whose files may be partly written: it must be replayed exactly before moving on."""

    first_lsn: int
    last_lsn: int


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """Every record up to ``committed_lsn`` is in Parquet; ``pending`` is a batch in flight.

    LSNs start at 1, so the default ``committed_lsn = 0`` means nothing is committed yet.
    """

    committed_lsn: int = 0
    pending: PendingFlush | None = None


class CheckpointStore:
    """Reads and durably replaces the checkpoint file ``path`` (e.g. ``<state>/checkpoint.json``).

    One store per file and one caller at a time: it keeps the last state it read or wrote.
    """

    def __init__(self, path: Path) -> None:
        self._path = Path(path)
        self._current: Checkpoint | None = None

    @property
    def path(self) -> Path:
        return self._path

    def load(self) -> Checkpoint:
        """The stored checkpoint; a fresh ``Checkpoint()`` when the file does not exist yet."""
        try:
            raw = self._path.read_bytes()
        except FileNotFoundError:
            self._current = Checkpoint()
            return self._current
        except OSError as exc:
            raise LogError(f"could not read checkpoint {self._path}: {exc.strerror}") from exc
        try:
            self._current = _decode(raw)
        except (orjson.JSONDecodeError, ValueError, KeyError, TypeError) as exc:
            raise LogCorruptError(
                f"checkpoint {self._path} is corrupt ({exc}). Stop the daemon and restore it from "
                "a backup; without one, move it aside and record the newest batch in the output "
                "as pending: for the highest part-<first>-<last>.parquet under any table run "
                "CheckpointStore(path).begin(first, last), so that batch is replayed first"
            ) from exc
        return self._current

    def begin(self, first_lsn: int, last_lsn: int) -> None:
        """Durably record that batch ``[first_lsn, last_lsn]`` is about to be written.

        Calling it again for the pending batch (a replay) is allowed; starting a different batch
        while one is pending is not, because that batch's files would be left half-written.
        """
        current = self._state()
        if not current.committed_lsn < first_lsn <= last_lsn:
            raise ValueError(
                f"batch [{first_lsn}, {last_lsn}] must start after committed LSN "
                f"{current.committed_lsn} and end at or after its start"
            )
        intent = PendingFlush(first_lsn, last_lsn)
        if current.pending not in (None, intent):
            raise ValueError(
                f"batch {current.pending} is pending and must be replayed and committed "
                f"before batch [{first_lsn}, {last_lsn}] begins"
            )
        self._store(Checkpoint(current.committed_lsn, intent))

    def commit(self, last_lsn: int) -> None:
        """Durably mark the pending batch, which ends at ``last_lsn``, as written."""
        current = self._state()
        if current.pending is None or current.pending.last_lsn != last_lsn:
            raise ValueError(
                f"commit({last_lsn}) does not match the pending batch {current.pending}"
            )
        self._store(Checkpoint(committed_lsn=last_lsn))

    def _state(self) -> Checkpoint:
        return self._current if self._current is not None else self.load()

    def _store(self, checkpoint: Checkpoint) -> None:
        temp = self._path.with_name(f".{self._path.name}.tmp")
        try:
            with temp.open("wb") as file:
                file.write(_encode(checkpoint))
                file.flush()
                os.fsync(file.fileno())
            if faultpoints.ACTIVE:
                faultpoints.hit("checkpoint.temp_written")
            os.replace(temp, self._path)
            folder = os.open(self._path.parent, os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)
        except OSError as exc:
            temp.unlink(missing_ok=True)
            # The old file is intact (or the new one is complete): a retry is safe.
            raise LogError(f"could not write checkpoint {self._path}: {exc.strerror}") from exc
        self._current = checkpoint


def _body(checkpoint: Checkpoint) -> dict[str, Any]:
    pending = checkpoint.pending
    return {
        "version": FORMAT_VERSION,
        "committed_lsn": checkpoint.committed_lsn,
        "pending": None
        if pending is None
        else {"first_lsn": pending.first_lsn, "last_lsn": pending.last_lsn},
    }


def _crc(body: dict[str, Any]) -> int:
    # Sorted keys make the checksummed bytes independent of how the file was laid out.
    return zlib.crc32(orjson.dumps(body, option=orjson.OPT_SORT_KEYS))


def _encode(checkpoint: Checkpoint) -> bytes:
    body = _body(checkpoint)
    return orjson.dumps({**body, "crc32": _crc(body)}, option=orjson.OPT_INDENT_2) + b"\n"


def _decode(raw: bytes) -> Checkpoint:
    data = orjson.loads(raw)
    if not isinstance(data, dict):
        raise TypeError("not a JSON object")
    if data.get("version") != FORMAT_VERSION:
        raise ValueError(f"unknown format version {data.get('version')!r}")
    stored_crc = data.pop("crc32")
    if stored_crc != _crc(data):
        raise ValueError("CRC-32 does not match the content")
    pending = data["pending"]
    checkpoint = Checkpoint(
        committed_lsn=_lsn(data["committed_lsn"]),
        pending=None
        if pending is None
        else PendingFlush(_lsn(pending["first_lsn"]), _lsn(pending["last_lsn"])),
    )
    # Rebuilding the body catches extra keys or odd types the CRC happened to cover.
    if _body(checkpoint) != data:
        raise ValueError("unexpected fields")
    intent = checkpoint.pending
    if intent is not None and not checkpoint.committed_lsn < intent.first_lsn <= intent.last_lsn:
        raise ValueError("pending batch does not follow the committed LSN")
    return checkpoint


def _lsn(value: object) -> int:
    if type(value) is not int or value < 0:
        raise ValueError(f"LSN {value!r} is not a non-negative integer")
    return value
