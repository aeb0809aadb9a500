"""The write-ahead log: round trips, recovery of torn tails, corruption, release, full disks."""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.errors import LogCorruptError, LogError
from ingest.wal import HEADER, MAGIC, Durability, LogRecord, WriteAheadLog

Entry = tuple[int, str, bytes]
TOPIC = "live/level13/app1/VIN00000000000001/diagnostics/get/speed"


def entries(count: int, *, start: int = 0, payload_len: int = 40) -> list[Entry]:
    return [
        (1_700_000_000_000_000 + i, f"{TOPIC}/{i}", bytes([i % 256]) * payload_len)
        for i in range(start, start + count)
    ]


def frame_len(entry: Entry) -> int:
    return HEADER.size + len(entry[1].encode()) + len(entry[2])


def records(first_lsn: int, batch: Sequence[Entry]) -> list[LogRecord]:
    return [
        LogRecord(first_lsn + i, ts, topic, payload) for i, (ts, topic, payload) in enumerate(batch)
    ]


def segment_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.wal"))


# --------------------------------------------------------------------------------- round trips


def test_round_trip_across_segments(tmp_path: Path) -> None:
    batch = entries(50)
    with WriteAheadLog.open(tmp_path / "log", segment_bytes=512) as wal:
        assert wal.append_batch(batch[:20]) == (1, 20)
        assert wal.append_batch(batch[20:]) == (21, 50)
        assert wal.segment_count > 3
        assert list(wal.read_from(1)) == records(1, batch)
        for start in (36, 37, 38):  # a segment starts at 37: read from before, at and after it
            assert list(wal.read_from(start)) == records(1, batch)[start - 1 :]
        assert list(wal.read_from(51)) == []
        assert wal.next_lsn == 51
        assert wal.oldest_lsn == 1
        assert wal.size_bytes == sum(p.stat().st_size for p in segment_files(tmp_path / "log"))
    for path in segment_files(tmp_path / "log"):
        assert path.stat().st_size <= 512
        assert path.read_bytes()[: len(MAGIC)] == MAGIC
        # The name is the first LSN of the frames inside.
        _, _, lsn, _, _ = HEADER.unpack_from(path.read_bytes(), len(MAGIC))
        assert lsn == int(path.stem)


def test_record_exactly_filling_a_segment_and_oversized_record(tmp_path: Path) -> None:
    first = entries(1)[0]
    size = len(MAGIC) + frame_len(first)
    big = (1, "t", b"x" * (size * 3))
    with WriteAheadLog.open(tmp_path, segment_bytes=size) as wal:
        wal.append_batch([first])  # fills the segment to exactly segment_bytes
        wal.append_batch([first, big, first])
        assert [p.stat().st_size for p in segment_files(tmp_path)] == [
            size,
            size,
            len(MAGIC) + frame_len(big),
            size,
        ]
        assert list(wal.read_from(1)) == records(1, [first, first, big, first])


def test_empty_batch_writes_nothing(tmp_path: Path) -> None:
    with WriteAheadLog.open(tmp_path) as wal:
        wal.append_batch(entries(3))
        before = wal.size_bytes
        assert wal.append_batch([]) == (4, 3)
        assert wal.size_bytes == before
        assert wal.next_lsn == 4


def test_empty_payload_and_unicode_topic(tmp_path: Path) -> None:
    batch = [(5, "sandbox/level13/ä/€", b""), (-1, "", b"\x00")]
    with WriteAheadLog.open(tmp_path) as wal:
        wal.append_batch(batch)
    with WriteAheadLog.open(tmp_path) as wal:
        assert list(wal.read_from(0)) == records(1, batch)


def test_reopen_continues_lsns(tmp_path: Path) -> None:
    batch = entries(30)
    with WriteAheadLog.open(tmp_path, segment_bytes=600) as wal:
        wal.append_batch(batch[:10])
    with WriteAheadLog.open(tmp_path, segment_bytes=600) as wal:
        assert wal.next_lsn == 11
        assert wal.truncated_bytes == 0
        assert wal.append_batch(batch[10:]) == (11, 30)
    with WriteAheadLog.open(tmp_path, segment_bytes=600) as wal:
        assert list(wal.read_from(1)) == records(1, batch)


def test_min_next_lsn_after_all_segments_deleted(tmp_path: Path) -> None:
    with WriteAheadLog.open(tmp_path, segment_bytes=300) as wal:
        wal.append_batch(entries(10))
        wal.release_through(10)
    for path in segment_files(tmp_path):
        path.unlink()  # the active segment is never released; an operator may still wipe it
    with WriteAheadLog.open(tmp_path, min_next_lsn=11) as wal:
        assert wal.next_lsn == 11
        assert wal.oldest_lsn is None
        assert list(wal.read_from(1)) == []
        assert wal.append_batch(entries(2)) == (11, 12)
    with WriteAheadLog.open(
        tmp_path, min_next_lsn=5
    ) as wal:  # a stale checkpoint never moves LSNs back
        assert wal.next_lsn == 13


def test_min_next_lsn_above_the_log_starts_a_new_segment(tmp_path: Path) -> None:
    batch = entries(6)
    with WriteAheadLog.open(tmp_path) as wal:
        wal.append_batch(batch[:3])
    with WriteAheadLog.open(tmp_path, min_next_lsn=100) as wal:
        assert wal.append_batch(batch[3:]) == (100, 102)
    assert [p.name for p in segment_files(tmp_path)] == [f"{1:020d}.wal", f"{100:020d}.wal"]
    with WriteAheadLog.open(tmp_path) as wal:
        assert [r.lsn for r in wal.read_from(1)] == [1, 2, 3, 100, 101, 102]
        assert wal.release_through(3) > 0  # the jump still lets the first segment go
        assert wal.oldest_lsn == 100


# ------------------------------------------------------------------------------------ recovery


def _mangle_truncate(path: Path, last_frame: int) -> None:
    os.truncate(path, path.stat().st_size - last_frame // 2)


def _mangle_flip(path: Path, last_frame: int) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # inside the last frame's payload
    path.write_bytes(bytes(data))


def _mangle_flip_header(path: Path, last_frame: int) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - last_frame + 5] ^= 0x01  # the crc field itself
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("mangle", [_mangle_truncate, _mangle_flip, _mangle_flip_header])
def test_torn_tail_is_cut(
    tmp_path: Path, mangle: Callable[[Path, int], None], caplog: pytest.LogCaptureFixture
) -> None:
    batch = entries(12)
    with WriteAheadLog.open(tmp_path, segment_bytes=400) as wal:
        wal.append_batch(batch)
    last = segment_files(tmp_path)[-1]
    mangle(last, frame_len(batch[-1]))
    torn_size = last.stat().st_size
    with caplog.at_level(logging.WARNING, logger="ingest.wal"), WriteAheadLog.open(tmp_path) as wal:
        assert wal.truncated_bytes == torn_size - (last.stat().st_size)
        assert wal.truncated_bytes > 0
        assert list(wal.read_from(1)) == records(1, batch[:-1])
        assert wal.next_lsn == 12
        assert wal.append_batch(batch[-1:]) == (12, 12)
        assert list(wal.read_from(1)) == records(1, batch)
    assert "torn tail" in caplog.text


def test_partial_segment_header_is_rebuilt(tmp_path: Path) -> None:
    with WriteAheadLog.open(tmp_path) as wal:
        wal.append_batch(entries(2))
    (tmp_path / f"{3:020d}.wal").write_bytes(MAGIC[:3])  # crash while creating the next segment
    with WriteAheadLog.open(tmp_path) as wal:
        assert wal.truncated_bytes == 3
        assert wal.append_batch(entries(1)) == (3, 3)
        assert [r.lsn for r in wal.read_from(1)] == [1, 2, 3]
    assert (tmp_path / f"{3:020d}.wal").read_bytes()[: len(MAGIC)] == MAGIC


def test_empty_segments_are_read_past(tmp_path: Path) -> None:
    with WriteAheadLog.open(tmp_path) as wal:
        wal.append_batch(entries(2))
    (tmp_path / f"{3:020d}.wal").write_bytes(MAGIC)  # created, nothing logged yet
    with WriteAheadLog.open(tmp_path) as wal:
        assert wal.segment_count == 2  # reuses the empty segment instead of adding one
        wal.append_batch(entries(2))
    (tmp_path / f"{5:020d}.wal").write_bytes(MAGIC)
    with WriteAheadLog.open(tmp_path, min_next_lsn=9) as wal:
        # The empty segment named 5 can never hold lsn 9 at its start: it is replaced.
        assert [p.name for p in segment_files(tmp_path)][-1] == f"{9:020d}.wal"
        assert [r.lsn for r in wal.read_from(1)] == [1, 2, 3, 4]
        assert wal.append_batch(entries(1)) == (9, 9)


def _corrupt_middle(path: Path) -> int:
    data = bytearray(path.read_bytes())
    offset = len(MAGIC)
    body_len: int = HEADER.unpack_from(data, offset)[0]
    second = offset + HEADER.size + body_len  # the second frame, not the last
    data[second + HEADER.size + 2] ^= 0x55
    path.write_bytes(bytes(data))
    return second


def test_corruption_in_a_non_last_segment_raises(tmp_path: Path) -> None:
    with WriteAheadLog.open(tmp_path, segment_bytes=400) as wal:
        wal.append_batch(entries(20))
    first = segment_files(tmp_path)[0]
    offset = _corrupt_middle(first)
    with pytest.raises(LogCorruptError, match=rf"{first.name}: offset {offset}: checksum") as info:
        WriteAheadLog.open(tmp_path)
    assert info.value.retriable is False


def test_corruption_before_valid_frames_in_the_last_segment_raises(tmp_path: Path) -> None:
    with WriteAheadLog.open(tmp_path) as wal:
        wal.append_batch(entries(5))
    offset = _corrupt_middle(segment_files(tmp_path)[0])
    with pytest.raises(LogCorruptError, match=rf"offset {offset}: .*followed by valid frames"):
        WriteAheadLog.open(tmp_path)


def test_lsn_gap_inside_a_segment_raises(tmp_path: Path) -> None:
    with WriteAheadLog.open(tmp_path) as wal:
        wal.append_batch(entries(3))
    path = segment_files(tmp_path)[0]
    path.rename(path.with_name(f"{2:020d}.wal"))  # name claims lsn 2, frames start at 1
    with pytest.raises(LogCorruptError, match="lsn 1 where 2 was expected"):
        WriteAheadLog.open(tmp_path)


def test_bad_magic_raises(tmp_path: Path) -> None:
    (tmp_path / f"{1:020d}.wal").write_bytes(b"NOTAWAL!" + b"\x00" * 30)
    with pytest.raises(LogCorruptError, match="bad magic"):
        WriteAheadLog.open(tmp_path)


# ------------------------------------------------------------------------------------- release


def test_release_through_deletes_only_whole_segments(tmp_path: Path) -> None:
    with WriteAheadLog.open(tmp_path, segment_bytes=400) as wal:
        wal.append_batch(entries(20))
        names = [p.name for p in segment_files(tmp_path)]
        firsts = [int(Path(n).stem) for n in names]
        assert len(firsts) >= 4
        before = wal.size_bytes
        # One LSN short of the second segment's start: the first still holds lsn firsts[1] - 1.
        assert wal.release_through(firsts[1] - 2) == 0
        assert wal.size_bytes == before
        first_size = (tmp_path / names[0]).stat().st_size
        assert wal.release_through(firsts[1] - 1) == first_size
        assert wal.size_bytes == before - first_size
        assert [p.name for p in segment_files(tmp_path)] == names[1:]
        assert wal.oldest_lsn == firsts[1]
        freed = wal.release_through(10_000)
        assert freed > 0
        assert [p.name for p in segment_files(tmp_path)] == names[-1:]  # the active one stays
        assert wal.size_bytes == before - first_size - freed
        assert wal.segment_count == 1
        assert [r.lsn for r in wal.read_from(1)] == list(range(firsts[-1], 21))
        assert wal.append_batch(entries(1)) == (21, 21)


def test_release_from_another_thread_while_appending(tmp_path: Path) -> None:
    total = 2_000
    done = threading.Event()
    errors: list[BaseException] = []
    with WriteAheadLog.open(tmp_path, segment_bytes=2_048, durability=Durability.WRITE) as wal:

        def releaser() -> None:
            try:
                while not done.is_set():
                    wal.release_through(wal.next_lsn - 200)
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=releaser)
        thread.start()
        for start in range(0, total, 50):
            wal.append_batch(entries(50, start=start))
        # Under load the releaser may not have run during the appends; give it its turn (bounded)
        # so the checks below always see a released log.
        deadline = time.monotonic() + 10
        while (wal.oldest_lsn or 0) <= 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        done.set()
        thread.join()
        assert errors == []
        oldest = wal.oldest_lsn
        assert oldest is not None
        assert oldest > 1
        assert [r.lsn for r in wal.read_from(1)] == list(range(oldest, total + 1))
        assert wal.size_bytes == sum(p.stat().st_size for p in segment_files(tmp_path))


# ---------------------------------------------------------------------------------- full disks


def _fail_writes(monkeypatch: pytest.MonkeyPatch, *, on_call: int) -> list[int]:
    """Make the ``on_call``-th os.write write half its data and then fail with ENOSPC, once."""
    real_write = os.write
    calls = [0]

    def write(fd: int, data: bytes | memoryview) -> int:
        calls[0] += 1
        if calls[0] == on_call:
            real_write(fd, bytes(data)[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr("ingest.wal.os.write", write)
    return calls


@pytest.mark.parametrize(
    ("batch_size", "fail_on"),
    [(5, 1), (30, 2), (30, 3)],
    ids=["within-segment", "creating-next-segment", "writing-next-segment"],
)
def test_enospc_rolls_back_and_retry_gets_same_lsns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batch_size: int, fail_on: int
) -> None:
    wal = WriteAheadLog.open(tmp_path, segment_bytes=1_024)
    wal.append_batch(entries(5))
    sizes = {p.name: p.stat().st_size for p in segment_files(tmp_path)}
    state = (wal.next_lsn, wal.size_bytes, wal.segment_count)
    batch = entries(batch_size, start=5)
    calls = _fail_writes(monkeypatch, on_call=fail_on)
    with pytest.raises(LogError) as info:
        wal.append_batch(batch)
    assert calls[0] == fail_on
    assert info.value.retriable is True
    assert isinstance(info.value.__cause__, OSError)
    assert info.value.__cause__.errno == errno.ENOSPC
    assert (wal.next_lsn, wal.size_bytes, wal.segment_count) == state
    assert {p.name: p.stat().st_size for p in segment_files(tmp_path)} == sizes
    assert wal.append_batch(batch) == (6, 5 + batch_size)
    wal.close()
    with WriteAheadLog.open(tmp_path, segment_bytes=1_024) as reopened:
        assert reopened.truncated_bytes == 0
        assert list(reopened.read_from(1)) == records(1, entries(5 + batch_size))


def test_failed_fsync_makes_the_log_unusable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with WriteAheadLog.open(tmp_path) as wal:

        def fsync(fd: int) -> None:
            raise OSError(errno.EIO, "I/O error")

        monkeypatch.setattr("ingest.wal.os.fsync", fsync)
        with pytest.raises(LogError) as info:
            wal.append_batch(entries(1))
        assert info.value.retriable is False
        monkeypatch.undo()
        with pytest.raises(LogError, match="unusable"):
            wal.append_batch(entries(1))


@pytest.mark.parametrize(("durability", "expected"), [(Durability.FSYNC, 1), (Durability.WRITE, 0)])
def test_one_fsync_per_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durability: Durability, expected: int
) -> None:
    with WriteAheadLog.open(tmp_path, durability=durability) as wal:
        calls: list[int] = []
        real_fsync = os.fsync
        writes: list[int] = []
        real_write = os.write

        def fsync(fd: int) -> None:
            calls.append(fd)
            real_fsync(fd)

        def write(fd: int, data: bytes | memoryview) -> int:
            writes.append(fd)
            return real_write(fd, data)

        monkeypatch.setattr("ingest.wal.os.fsync", fsync)
        monkeypatch.setattr("ingest.wal.os.write", write)
        wal.append_batch(entries(100))
        assert len(calls) == expected
        assert len(writes) == 1  # group commit: one write for the whole batch


def test_unencodable_record_is_not_retriable(tmp_path: Path) -> None:
    with WriteAheadLog.open(tmp_path) as wal:
        with pytest.raises(LogError) as info:
            wal.append_batch([(1, "t" * 70_000, b"")])
        assert info.value.retriable is False
        assert wal.next_lsn == 1
        assert wal.append_batch(entries(1)) == (1, 1)


def test_closed_log_refuses_appends(tmp_path: Path) -> None:
    wal = WriteAheadLog.open(tmp_path)
    wal.close()
    with pytest.raises(LogError, match="closed"):
        wal.append_batch(entries(1))


# ------------------------------------------------------------------------------------ property

_batches = st.lists(
    st.lists(
        st.tuples(
            st.integers(min_value=-(2**63), max_value=2**63 - 1),
            st.text(max_size=30),
            st.one_of(st.binary(max_size=64), st.binary(min_size=2_000, max_size=5_000)),
        ),
        max_size=12,
    ),
    min_size=1,
    max_size=8,
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    batches=_batches,
    segment_bytes=st.integers(min_value=64, max_value=4_096),
    cut=st.floats(min_value=0.0, max_value=1.0),
)
def test_property_round_trip_and_crash_prefix(
    tmp_path_factory: pytest.TempPathFactory,
    batches: list[list[Entry]],
    segment_bytes: int,
    cut: float,
) -> None:
    directory = tmp_path_factory.mktemp("wal")
    everything = [entry for batch in batches for entry in batch]
    with WriteAheadLog.open(
        directory, segment_bytes=segment_bytes, durability=Durability.WRITE
    ) as wal:
        for batch in batches:
            wal.append_batch(batch)
        assert list(wal.read_from(1)) == records(1, everything)
    # A crash can only tear the end of the last segment: cut it anywhere.
    last = segment_files(directory)[-1]
    size = last.stat().st_size
    cut_at = round(size * cut)
    os.truncate(last, cut_at)
    first_in_last = int(last.stem)
    survivors = first_in_last - 1
    offset = len(MAGIC)
    for entry in everything[first_in_last - 1 :]:
        offset += frame_len(entry)
        if offset > cut_at:
            break
        survivors += 1
    with WriteAheadLog.open(directory, segment_bytes=segment_bytes) as wal:
        assert list(wal.read_from(1)) == records(1, everything[:survivors])
        kept = cut_at if cut_at < len(MAGIC) else offset_of(everything, first_in_last, survivors)
        assert wal.truncated_bytes == (cut_at if cut_at < len(MAGIC) else cut_at - kept)
        assert wal.next_lsn == survivors + 1


def offset_of(everything: list[Entry], first_in_last: int, survivors: int) -> int:
    """End offset of the last surviving frame in the last segment (the magic if none)."""
    return len(MAGIC) + sum(frame_len(e) for e in everything[first_in_last - 1 : survivors])
