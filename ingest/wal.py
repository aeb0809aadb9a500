"""The durable write-ahead log: every MQTT message is appended here before its PUBACK is sent.

On-disk format
==============

The log is a directory of *segment* files named ``<first_lsn:020d>.wal`` (zero-padded so that the
lexical order of names is the LSN order). Each segment is::

    magic     8 bytes   b"HMWAL01\\n"
    frame*    back to back, no padding

and each frame is a fixed little-endian header, ``struct.Struct("<IIqqH")``, then two variable
parts::

    body_len        u32   len(topic) + len(payload): the bytes that follow the header
    crc             u32   zlib.crc32 of everything after this field: lsn .. payload
    lsn             i64   log sequence number, +1 per record, never reused
    received_at_us  i64   Unix time in microseconds when the message was received
    topic_len       u16   bytes of UTF-8 topic (MQTT caps topics at 65,535 bytes)
    topic           topic_len bytes, UTF-8
    payload         body_len - topic_len bytes

Invariants the recovery scan checks: within a segment LSNs are consecutive and the first frame
carries the LSN in the file name; across segments each name is above the previous segment's last
LSN. LSNs may jump *between* segments: ``min_next_lsn`` (the caller's checkpoint) can be ahead of
what is left on disk, and the next record then starts a new segment.

Durability
==========

``Durability.FSYNC``: one ``os.fsync`` per batch (group commit), plus one per extra segment a batch
spills into, and the directory is fsynced after a segment is created or deleted so its name
survives power loss. ``Durability.WRITE``: no fsync at all; the data sits in the page cache, which
survives a process crash but not a power loss.

Only the tail of the *last* segment can be torn by a crash, so only there is a bad frame cut off on
:meth:`WriteAheadLog.open`; anywhere else it is :class:`~ingest.errors.LogCorruptError`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import struct
import threading
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, NamedTuple, Self

from ingest.errors import LogCorruptError, LogError
from ingest.testing import faultpoints

log = logging.getLogger(__name__)

MAGIC = b"HMWAL01\n"
HEADER = struct.Struct("<IIqqH")
# The CRC covers the header fields after it, so the writer packs those once, feeds the bytes to
# crc32 and then into the frame, and packs (body_len, crc) separately: together the two are
# byte-for-byte HEADER. Measured 1.2 us/record against 1.9 us packing HEADER as well.
_LEN_CRC = struct.Struct("<II")
_CRC_FIELDS = struct.Struct("<qqH")
_LSN = struct.Struct("<q")
_LSN_OFFSET = _LEN_CRC.size  # where the lsn sits inside HEADER, for the resync search
_TOPIC_MAX = 0xFFFF  # u16 topic_len; MQTT [MQTT-1.5.4-1] caps topic names at this length anyway
_BODY_MAX = 0xFFFF_FFFF  # u32 body_len
_SEGMENT_NAME = re.compile(r"^(\d{20})\.wal$")
# Reads go through a buffer this large so that a header or a small record costs no syscall.
_READ_BUFFER = 1024 * 1024
# A bad frame in the last segment is a torn tail only if no valid frame follows it. We look for
# a follower carrying one of the next LSNs; 64 covers a lost 16 KiB run of ~256-byte records,
# and the search (bytes.find, C speed) only scans far when the tail really is garbage.
_RESYNC_LSNS = 64

assert _LEN_CRC.size + _CRC_FIELDS.size == HEADER.size


class Durability(StrEnum):
    """How far :meth:`WriteAheadLog.append_batch` pushes data before returning."""

    FSYNC = "fsync"
    WRITE = "write"  # survives a process crash, not a power loss


class LogRecord(NamedTuple):
    """One logged message. ``lsn`` increases by one per record and is never reused.

    A NamedTuple: the sink builds one per message, at about half the cost of a frozen dataclass.
    """

    lsn: int
    received_at_us: int
    topic: str
    payload: bytes


@dataclass(slots=True)
class _Segment:
    path: Path
    first_lsn: int
    size: int  # committed bytes: what the last successful append left (fsynced in FSYNC mode)
    last_lsn: int | None  # None while the segment holds no record
    fd: int | None = None  # open for appending only while the segment is the active one


@dataclass(slots=True)
class _Chunk:
    """The frames of one batch that go to one segment (``None``: a segment yet to be created)."""

    segment: _Segment | None
    first_lsn: int
    last_lsn: int = 0
    nbytes: int = 0
    parts: list[bytes] = field(default_factory=list)


class _BadFrameError(Exception):
    def __init__(self, offset: int, reason: str) -> None:
        super().__init__(reason)
        self.offset = offset
        self.reason = reason


def _iter_frames(f: BinaryIO, end: int) -> Iterator[tuple[int, int, int, bytes, bytes]]:
    """Yield ``(offset, lsn, received_at_us, topic, payload)`` from just after the magic to ``end``.

    Raises :class:`_BadFrameError` at the first frame that is partial or fails its checksum.
    """
    offset = len(MAGIC)
    header_size = HEADER.size
    crc32 = zlib.crc32
    while offset < end:
        if end - offset < header_size:
            raise _BadFrameError(offset, "partial frame header")
        header = f.read(header_size)
        body_len, crc, lsn, received_at_us, topic_len = HEADER.unpack(header)
        frame_end = offset + header_size + body_len
        if frame_end > end:
            raise _BadFrameError(offset, "partial frame body")
        if topic_len > body_len:
            raise _BadFrameError(offset, "topic length exceeds body length")
        topic = f.read(topic_len)
        payload = f.read(body_len - topic_len)
        if len(topic) + len(payload) != body_len:
            raise _BadFrameError(offset, "file shorter than expected")
        if crc32(payload, crc32(topic, crc32(header[_LEN_CRC.size :]))) != crc:
            raise _BadFrameError(offset, "checksum mismatch")
        yield offset, lsn, received_at_us, topic, payload
        offset = frame_end


def _valid_frame_at(data: bytes, pos: int) -> bool:
    if pos < 0 or len(data) - pos < HEADER.size:
        return False
    body_len, crc, _, _, topic_len = HEADER.unpack_from(data, pos)
    body_end = pos + HEADER.size + body_len
    if topic_len > body_len or body_end > len(data):
        return False
    expected: int = crc
    return zlib.crc32(memoryview(data)[pos + _LEN_CRC.size : body_end]) == expected


def _valid_frame_follows(data: bytes, expected_lsn: int) -> bool:
    """Whether ``data`` (from a bad frame to the end of file) holds a later valid frame."""
    for lsn in range(expected_lsn, expected_lsn + _RESYNC_LSNS):
        pattern = _LSN.pack(lsn)
        hit = data.find(pattern, 1 + _LSN_OFFSET)  # a follower starts after the bad frame's start
        while hit != -1:
            if _valid_frame_at(data, hit - _LSN_OFFSET):
                return True
            hit = data.find(pattern, hit + 1)
    return False


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    # A regular file returns a short count when the disk fills part-way; the next call raises.
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written == 0:
            raise OSError(errno.ENOSPC, "write made no progress")
        view = view[written:]


class WriteAheadLog:
    """An append-only, segmented, checksummed log. See the module docstring for the format.

    One thread appends (``append_batch``); ``release_through`` and the properties may be called
    from another thread.
    """

    def __init__(
        self, directory: Path, segment_bytes: int, durability: Durability, truncated: int
    ) -> None:
        self._directory = directory
        self._segment_bytes = segment_bytes
        self._fsync = durability is Durability.FSYNC
        self._truncated = truncated
        self._segments: list[_Segment] = []
        self._next_lsn = 1
        self._lock = threading.Lock()  # guards _segments, their sizes and _next_lsn
        self._append_lock = threading.Lock()  # one append (or close) at a time
        self._release_lock = threading.Lock()  # one release at a time
        self._broken: str | None = None

    # ----------------------------------------------------------------------------- open/recover

    @classmethod
    def open(
        cls,
        directory: Path,
        *,
        segment_bytes: int = 64 * 1024 * 1024,
        durability: Durability = Durability.FSYNC,
        min_next_lsn: int = 1,
    ) -> WriteAheadLog:
        """Create or recover the log in ``directory``; cut a torn tail off the last segment."""
        if segment_bytes <= len(MAGIC):
            raise ValueError(f"segment_bytes must exceed {len(MAGIC)}, got {segment_bytes}")
        if min_next_lsn < 1:
            raise ValueError(f"min_next_lsn must be at least 1, got {min_next_lsn}")
        try:
            created = not directory.exists()
            directory.mkdir(parents=True, exist_ok=True)
            if created and durability is Durability.FSYNC:
                _fsync_dir(directory.parent)
            wal = cls(directory, segment_bytes, durability, truncated=0)
            try:
                wal._recover(min_next_lsn)
            except BaseException:
                wal.close()  # do not leak the active segment's descriptor
                raise
        except OSError as exc:
            raise LogError(f"cannot open the log in {directory}: {exc}") from exc
        return wal

    def _recover(self, min_next_lsn: int) -> None:
        names = sorted(
            (int(m.group(1)), self._directory / m.group(0))
            for entry in os.listdir(self._directory)
            if (m := _SEGMENT_NAME.match(entry))
        )
        previous_last = 0
        for index, (first_lsn, path) in enumerate(names):
            if first_lsn <= previous_last:
                raise LogCorruptError(
                    f"{path}: segment starts at lsn {first_lsn} but the previous one "
                    f"ends at {previous_last}"
                )
            segment = self._scan_segment(path, first_lsn, last=index == len(names) - 1)
            self._segments.append(segment)
            previous_last = segment.last_lsn if segment.last_lsn is not None else first_lsn - 1
        next_lsn = max(previous_last + 1, min_next_lsn)
        if self._segments:
            active = self._segments[-1]
            if active.last_lsn is None and active.first_lsn != next_lsn:
                # Empty and named for an LSN we will not use: reusing it would break the rule that
                # a segment's first frame carries the LSN in its name.
                self._segments.pop()
                os.unlink(active.path)
            elif (active.first_lsn if active.last_lsn is None else active.last_lsn + 1) == next_lsn:
                active.fd = os.open(active.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self._next_lsn = next_lsn
        if not self._segments or self._segments[-1].fd is None:
            self._segments.append(self._create_segment(next_lsn))

    def _scan_segment(self, path: Path, first_lsn: int, *, last: bool) -> _Segment:
        with path.open("rb", buffering=_READ_BUFFER) as f:
            size = os.fstat(f.fileno()).st_size
            magic = f.read(len(MAGIC))
            if size < len(MAGIC) and last:
                # Crashed while creating the segment: nothing was logged in it yet.
                self._cut(path, 0, size, "partial segment header")
                self._write_magic(path)
                return _Segment(path, first_lsn, len(MAGIC), None)
            if magic != MAGIC:
                raise LogCorruptError(f"{path}: offset 0: not a log segment (bad magic)")
            expected = first_lsn
            try:
                for offset, lsn, _, _, _ in _iter_frames(f, size):
                    if lsn != expected:
                        raise LogCorruptError(
                            f"{path}: offset {offset}: lsn {lsn} where {expected} was expected"
                        )
                    expected += 1
            except _BadFrameError as bad:
                if not last:
                    raise LogCorruptError(f"{path}: offset {bad.offset}: {bad.reason}") from None
                f.seek(bad.offset)
                if _valid_frame_follows(f.read(), expected):
                    raise LogCorruptError(
                        f"{path}: offset {bad.offset}: {bad.reason}, followed by valid frames"
                    ) from None
                self._cut(path, bad.offset, size, bad.reason)
                size = bad.offset
        return _Segment(path, first_lsn, size, expected - 1 if expected > first_lsn else None)

    def _cut(self, path: Path, offset: int, size: int, reason: str) -> None:
        log.warning(
            "log: cutting torn tail of %s at offset %d (%d bytes): %s",
            path,
            offset,
            size - offset,
            reason,
        )
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, offset)
            if self._fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        self._truncated += size - offset

    def _write_magic(self, path: Path) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        try:
            _write_all(fd, MAGIC)
            if self._fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def _create_segment(self, first_lsn: int) -> _Segment:
        """Create, fill in the magic and (FSYNC) make the file and its name durable."""
        path = self._directory / f"{first_lsn:020d}.wal"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC)
        try:
            _write_all(fd, MAGIC)
            if self._fsync:
                os.fsync(fd)
                _fsync_dir(self._directory)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        return _Segment(path, first_lsn, len(MAGIC), None, fd)

    # ----------------------------------------------------------------------------------- append

    def append_batch(self, entries: Sequence[tuple[int, str, bytes]]) -> tuple[int, int]:
        """Log ``(received_at_us, topic, payload)`` entries; return ``(first_lsn, last_lsn)``.

        An empty batch writes nothing and returns ``(next_lsn, next_lsn - 1)``. On a write error
        the log is rolled back to where it was and :class:`LogError` (retriable) is raised: the
        same batch can be retried and gets the same LSNs.
        """
        with self._append_lock:
            if self._broken is not None:
                raise LogError(f"the log is unusable: {self._broken}", retriable=False)
            first_lsn = self._next_lsn
            chunks = self._plan(entries, first_lsn)
            touched: list[tuple[_Segment, int]] = []  # (segment, committed size before)
            try:
                self._write_chunks(chunks, touched)
            except OSError as exc:
                self._rollback(touched)
                raise LogError(
                    f"cannot append to the log in {self._directory}: {exc}", retriable=True
                ) from exc
            last_lsn = first_lsn + len(entries) - 1
            with self._lock:
                for chunk in chunks:
                    assert chunk.segment is not None
                    chunk.segment.size += chunk.nbytes
                    chunk.segment.last_lsn = chunk.last_lsn
                for segment in self._segments[:-1]:
                    if segment.fd is not None:  # rotated away from during this batch
                        os.close(segment.fd)
                        segment.fd = None
                self._next_lsn = last_lsn + 1
            if faultpoints.ACTIVE:
                faultpoints.hit("wal.logged")
            return first_lsn, last_lsn

    def _plan(self, entries: Sequence[tuple[int, str, bytes]], lsn: int) -> list[_Chunk]:
        """Encode every frame and split them by segment, before any I/O."""
        with self._lock:
            active = self._segments[-1]
        limit = self._segment_bytes
        chunk = _Chunk(active, lsn)
        chunks = [chunk]
        size = active.size
        has_records = active.last_lsn is not None
        crc32 = zlib.crc32
        pack_fields = _CRC_FIELDS.pack
        pack_len_crc = _LEN_CRC.pack
        frame_overhead = HEADER.size
        for received_at_us, topic, payload in entries:
            try:
                topic_bytes = topic.encode()
            except UnicodeEncodeError as exc:
                raise LogError(f"topic is not valid UTF-8: {topic!r}", retriable=False) from exc
            topic_len = len(topic_bytes)
            body_len = topic_len + len(payload)
            if topic_len > _TOPIC_MAX or body_len > _BODY_MAX:
                raise LogError(
                    f"record too large for the log format: topic {topic_len} bytes, "
                    f"body {body_len} bytes",
                    retriable=False,
                )
            frame_len = frame_overhead + body_len
            if has_records and size + frame_len > limit:
                chunk = _Chunk(None, lsn)  # a new segment, created when written
                chunks.append(chunk)
                size = len(MAGIC)
            fields = pack_fields(lsn, received_at_us, topic_len)
            crc = crc32(payload, crc32(topic_bytes, crc32(fields)))
            chunk.parts += (pack_len_crc(body_len, crc), fields, topic_bytes, payload)
            chunk.last_lsn = lsn
            chunk.nbytes += frame_len
            size += frame_len
            has_records = True
            lsn += 1
        return [c for c in chunks if c.parts]

    def _write_chunks(self, chunks: list[_Chunk], touched: list[tuple[_Segment, int]]) -> None:
        previous: _Segment | None = None
        for chunk in chunks:
            if chunk.segment is None:
                if previous is not None and self._fsync:
                    # The older segment must be complete on disk before a newer one can exist
                    # there: recovery only forgives a torn tail in the last segment.
                    self._sync(previous)
                segment = self._create_segment(chunk.first_lsn)
                touched.append((segment, -1))  # -1: created by this batch
                with self._lock:
                    self._segments.append(segment)
                chunk.segment = segment
            else:
                touched.append((chunk.segment, chunk.segment.size))
            assert chunk.segment.fd is not None
            data = b"".join(chunk.parts)
            if faultpoints.ACTIVE and faultpoints.crash_due("wal.torn_write"):
                _write_all(chunk.segment.fd, data[: len(data) // 2])
                faultpoints.crash()
            _write_all(chunk.segment.fd, data)
            previous = chunk.segment
        if previous is not None and self._fsync:
            self._sync(previous)

    def _sync(self, segment: _Segment) -> None:
        assert segment.fd is not None
        try:
            os.fsync(segment.fd)
        except OSError as exc:
            # After a failed fsync Linux may drop the dirty pages and report success on the next
            # call ("fsyncgate"), so a retry could acknowledge data that is not on disk. Stop;
            # a restart recovers from what really is on disk and the broker redelivers the rest.
            self._broken = f"fsync of {segment.path} failed: {exc}"
            raise LogError(self._broken, retriable=False) from exc

    def _rollback(self, touched: list[tuple[_Segment, int]]) -> None:
        """Undo a failed batch: no half-written frame remains and no LSN is consumed."""
        try:
            created = False
            for segment, size_before in reversed(touched):
                assert segment.fd is not None
                if size_before < 0:
                    with self._lock:
                        self._segments.remove(segment)
                    os.close(segment.fd)
                    segment.fd = None
                    os.unlink(segment.path)
                    created = True
                else:
                    os.ftruncate(segment.fd, size_before)
                    if self._fsync:
                        os.fsync(segment.fd)
            if created and self._fsync:
                _fsync_dir(self._directory)
        except OSError as exc:
            self._broken = f"cannot roll back a failed append: {exc}"
            raise LogError(self._broken, retriable=False) from exc

    # ------------------------------------------------------------------------------------- read

    def read_from(self, lsn: int) -> Iterator[LogRecord]:
        """Yield every committed record with ``record.lsn >= lsn``, in LSN order."""
        with self._lock:
            snapshot = [
                (s.path, s.size)
                for s in self._segments
                if s.last_lsn is not None and s.last_lsn >= lsn
            ]
        for path, size in snapshot:
            try:
                f = path.open("rb", buffering=_READ_BUFFER)
            except FileNotFoundError:
                continue  # released meanwhile: every record in it was committed downstream
            except OSError as exc:
                raise LogError(f"cannot read {path}: {exc}") from exc
            with f:
                yield from self._read_segment(f, path, size, lsn)

    @staticmethod
    def _read_segment(f: BinaryIO, path: Path, size: int, lsn: int) -> Iterator[LogRecord]:
        if f.read(len(MAGIC)) != MAGIC:
            raise LogCorruptError(f"{path}: offset 0: not a log segment (bad magic)")
        try:
            for offset, record_lsn, received_at_us, topic, payload in _iter_frames(f, size):
                if record_lsn < lsn:
                    continue
                try:
                    text = topic.decode()
                except UnicodeDecodeError:
                    raise LogCorruptError(f"{path}: offset {offset}: topic is not UTF-8") from None
                yield LogRecord(record_lsn, received_at_us, text, payload)
        except _BadFrameError as bad:
            raise LogCorruptError(f"{path}: offset {bad.offset}: {bad.reason}") from None
        except OSError as exc:
            raise LogError(f"cannot read {path}: {exc}") from exc

    # ---------------------------------------------------------------------------------- release

    def release_through(self, lsn: int) -> int:
        """Delete segments whose records all have ``lsn`` or lower; return the bytes freed.

        The active (last) segment is never deleted. Safe to call from another thread.
        """
        with self._release_lock:
            # The append lock too: an append that spills into a new segment adds it to
            # _segments before it writes, and records the older segment's new last_lsn only
            # after. In between, that older segment looks fully released (its last_lsn is
            # stale) while records being acknowledged are written into it. Waiting for the
            # append (one group commit at most) keeps every last_lsn true; the unlinking
            # below needs no append lock, since appends never touch a non-last segment again.
            with self._append_lock, self._lock:
                victims: list[_Segment] = []
                while len(self._segments) > 1 and (self._segments[0].last_lsn or 0) <= lsn:
                    victims.append(self._segments.pop(0))
            freed = 0
            for index, segment in enumerate(victims):
                try:
                    os.unlink(segment.path)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    with self._lock:
                        self._segments[0:0] = victims[index:]  # still on disk: keep counting it
                    raise LogError(f"cannot delete {segment.path}: {exc}") from exc
                freed += segment.size
            if victims and self._fsync:
                try:
                    _fsync_dir(self._directory)
                except OSError as exc:
                    raise LogError(f"cannot sync {self._directory}: {exc}") from exc
            return freed

    # ------------------------------------------------------------------------------- properties

    @property
    def size_bytes(self) -> int:
        """Total committed bytes of all segment files, headers included."""
        with self._lock:
            return sum(s.size for s in self._segments)

    @property
    def segment_count(self) -> int:
        with self._lock:
            return len(self._segments)

    @property
    def oldest_lsn(self) -> int | None:
        """The first LSN still held on disk; ``None`` when the log holds no record."""
        with self._lock:
            return next((s.first_lsn for s in self._segments if s.last_lsn is not None), None)

    @property
    def next_lsn(self) -> int:
        with self._lock:
            return self._next_lsn

    @property
    def truncated_bytes(self) -> int:
        """Bytes cut off a torn tail when the log was opened."""
        return self._truncated

    # -------------------------------------------------------------------------------- lifecycle

    def close(self) -> None:
        with self._append_lock, self._lock:
            for segment in self._segments:
                if segment.fd is not None:
                    os.close(segment.fd)
                    segment.fd = None
            if self._broken is None:
                self._broken = "closed"

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
