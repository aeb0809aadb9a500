"""Intake against a real write-ahead log: the log cap counts records the sink has not committed."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from ingest import intake as intake_module
from ingest.errors import LogError
from ingest.intake import DEFAULT_WINDOW, SINK_BACKLOG_RECORDS, Intake, IntakeLimits, Keep
from ingest.metrics import Metrics
from ingest.mqtt import Delivery
from ingest.wal import Durability, LogRecord, WriteAheadLog

DEADLINE_S = 10.0
CAP = 10_000
PAYLOAD = b"x" * 1000
TOPIC = "live/level13/app/VIN/diagnostics/get/speed"


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {DEADLINE_S} s waiting for {what}")
        time.sleep(0.01)


class Harness:
    """An intake thread on a real log; acks and hand-overs are recorded, commits are simulated."""

    def __init__(
        self,
        wal: WriteAheadLog,
        committed: int = 0,
        limits: IntakeLimits | None = None,
        keep: Keep | None = None,
        window: int = DEFAULT_WINDOW,
    ) -> None:
        self.wal = wal
        self.committed = committed
        self.acked: list[Delivery] = []
        self.delivered: list[LogRecord] = []
        self.metrics = Metrics(CollectorRegistry())
        self.intake = Intake(
            wal,
            ack=self._ack,
            deliver=self._deliver,
            limits=limits or IntakeLimits(max_log_bytes=CAP),
            metrics=self.metrics,
            committed_lsn=lambda: self.committed,
            keep=keep,
            window=window,
        )
        self.groups: list[int] = []  # size of each group handed over
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.intake.run, args=(self.stop,), daemon=True)
        self.mid = 0

    def _ack(self, delivery: Delivery) -> bool:
        self.acked.append(delivery)
        return True

    def _deliver(self, first_lsn: int, entries: list[tuple[int, str, bytes]]) -> None:
        self.groups.append(len(entries))
        self.delivered.extend(
            LogRecord(first_lsn + offset, *entry) for offset, entry in enumerate(entries)
        )

    def submit(self, count: int) -> None:
        for _ in range(count):
            self.mid += 1
            self.intake.submit(TOPIC, PAYLOAD, Delivery(1, self.mid, 1))

    def closed_by(self) -> dict[str, float]:
        """hm_ingest_intake_groups_total by what closed the groups (those counted)."""
        counts = {
            sample.labels["closed_by"]: sample.value
            for family in self.metrics.registry.collect()
            if family.name == "hm_ingest_intake_groups"
            for sample in family.samples
            if sample.name.endswith("_total")
        }
        return {reason: count for reason, count in counts.items() if count}

    def paused(self) -> bool:
        return self.metrics.backpressure._value.get() == 1  # type: ignore[attr-defined]


@pytest.fixture
def wal(tmp_path: Path) -> Iterator[WriteAheadLog]:
    # Segments far larger than the cap: everything stays in the active segment, which is never
    # released, so the log's size on disk only grows during these tests.
    log = WriteAheadLog.open(
        tmp_path / "log", segment_bytes=1024 * 1024, durability=Durability.WRITE
    )
    yield log
    log.close()


@pytest.fixture
def harness(wal: WriteAheadLog) -> Iterator[Harness]:
    h = Harness(wal)
    h.thread.start()
    yield h
    h.stop.set()
    h.thread.join(DEADLINE_S)


def test_acks_pause_at_the_cap_and_resume_once_committed_although_the_file_stays(
    harness: Harness,
) -> None:
    harness.submit(20)  # one group of ~20 kB: logged (under the cap before), then over it
    wait_until(lambda: len(harness.acked) == 20, "the first group to be logged and acked")
    harness.submit(5)
    wait_until(harness.paused, "back-pressure")
    time.sleep(0.3)
    assert len(harness.acked) == 20, "nothing is acknowledged while the cap is reached"

    harness.committed = 20  # the sink committed everything logged so far
    wait_until(lambda: len(harness.acked) == 25, "acks to resume")
    assert not harness.paused()
    # The committed records are still in the active segment: the cap must not count them.
    assert harness.wal.size_bytes > CAP
    assert [r.lsn for r in harness.delivered] == list(range(1, 26))
    assert [d.mid for d in harness.acked] == list(range(1, 26))


def _pause_and_resume(harness: Harness) -> None:
    """Submit until acks pause at the cap, then commit everything so that they resume."""
    while not harness.paused():
        harness.submit(10)
        wait_until(lambda: harness.paused() or len(harness.acked) == harness.mid, "a group")
    harness.committed = harness.mid
    wait_until(lambda: len(harness.acked) == harness.mid, "acks to resume")


def test_a_flapping_pause_is_logged_once_per_interval_with_the_count_left_out(
    harness: Harness, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger="ingest.intake")
    for _ in range(3):
        _pause_and_resume(harness)
    paused = [r for r in caplog.records if r.getMessage().startswith("acknowledgements paused")]
    resumed = [r for r in caplog.records if r.getMessage() == "acknowledgements resumed"]
    assert [r.levelno for r in paused] == [logging.WARNING]
    assert "cap reached" in paused[0].getMessage()
    assert len(resumed) == 1  # the end of the logged pause only

    monkeypatch.setattr(intake_module, "PAUSE_LOG_INTERVAL_S", 0.0)  # the interval has passed
    _pause_and_resume(harness)
    paused = [r for r in caplog.records if r.getMessage().startswith("acknowledgements paused")]
    assert len(paused) == 2
    assert paused[1].getMessage().endswith("; 2 more pause(s) since the last such line, not logged")


def test_a_log_write_failure_is_logged_even_right_after_a_logged_pause(
    harness: Harness, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger="ingest.intake")
    _pause_and_resume(harness)
    real_append = harness.wal.append_batch
    failures = [LogError("could not write log segment: No space left on device")]

    def append_or_fail(entries: list[tuple[int, str, bytes]]) -> tuple[int, int]:
        if failures:
            raise failures.pop()
        return real_append(entries)

    monkeypatch.setattr(harness.wal, "append_batch", append_or_fail)
    harness.submit(1)
    wait_until(lambda: len(harness.acked) == harness.mid, "the retried write")
    paused = [r for r in caplog.records if r.getMessage().startswith("acknowledgements paused")]
    assert len(paused) == 2
    assert "log write failed: could not write log segment" in paused[1].getMessage()


def test_partly_committed_log_resumes_below_the_resume_mark_only(harness: Harness) -> None:
    # A frame is ~1.07 kB: 8 of them (8.5 kB) are under the cap but over its 80 % resume mark.
    harness.submit(8)
    wait_until(lambda: len(harness.acked) == 8, "the first group")
    harness.submit(8)
    wait_until(lambda: len(harness.acked) == 16, "the second group, logged under the cap")
    harness.submit(3)
    wait_until(harness.paused, "back-pressure")
    harness.committed = 8  # 8.5 kB still uncommitted: above the resume mark, stay paused
    time.sleep(0.3)
    assert harness.paused()
    assert len(harness.acked) == 16
    harness.committed = 16
    wait_until(lambda: len(harness.acked) == 19, "acks to resume")


def test_records_replayed_at_start_count_until_committed(wal: WriteAheadLog) -> None:
    wal.append_batch([(0, TOPIC, PAYLOAD)] * 20)  # logged by the last run, not committed
    h = Harness(wal, committed=0)
    h.thread.start()
    try:
        h.submit(1)
        wait_until(h.paused, "back-pressure from the replayed records")
        assert h.acked == []
        h.committed = 20
        wait_until(lambda: len(h.acked) == 1, "acks once the replayed records are committed")
        assert h.delivered[0].lsn == 21
    finally:
        h.stop.set()
        h.thread.join(DEADLINE_S)


def test_acks_pause_while_the_sink_holds_too_much_uncommitted_payload(
    wal: WriteAheadLog,
) -> None:
    # A log cap far away; the sink's in-memory share is what stops intake here.
    h = Harness(wal, limits=IntakeLimits(max_log_bytes=1 << 30, max_pending_payload_bytes=5000))
    h.thread.start()
    try:
        h.submit(6)  # 6,000 payload bytes: logged (under the limit before), then over it
        wait_until(lambda: len(h.acked) == 6, "the first group")
        h.submit(2)
        wait_until(h.paused, "back-pressure from the sink's backlog")
        time.sleep(0.3)
        assert len(h.acked) == 6
        h.committed = 6
        wait_until(lambda: len(h.acked) == 8, "acks to resume once the sink committed")
    finally:
        h.stop.set()
        h.thread.join(DEADLINE_S)


def test_sized_limits_leave_room_for_one_full_batch() -> None:
    limits = IntakeLimits.sized(max_log_bytes=1 << 29, flush_bytes=1 << 26)
    assert limits.max_log_bytes == 1 << 29
    assert limits.max_pending_payload_bytes is not None
    assert limits.max_pending_payload_bytes > 1 << 26


def test_logging_waits_while_the_sink_has_a_queue(wal: WriteAheadLog) -> None:
    backlog = [0]
    h = Harness(wal)
    h.intake = Intake(
        wal,
        ack=h._ack,
        deliver=h._deliver,
        limits=IntakeLimits(max_log_bytes=1 << 30),
        metrics=h.metrics,
        committed_lsn=lambda: h.committed,
        sink_backlog=lambda: backlog[0],
    )
    h.thread = threading.Thread(target=h.intake.run, args=(h.stop,), daemon=True)
    h.thread.start()
    try:
        h.submit(1)
        wait_until(lambda: len(h.acked) == 1, "the first message")
        backlog[0] = SINK_BACKLOG_RECORDS  # the sink has not taken that many records yet
        h.submit(1)
        wait_until(h.paused, "back-pressure from the sink's queue")
        assert len(h.acked) == 1
        backlog[0] = 0
        wait_until(lambda: len(h.acked) == 2, "acks once the sink caught up")
    finally:
        h.stop.set()
        h.thread.join(DEADLINE_S)


def test_a_message_another_session_keeps_is_acked_in_its_turn_and_never_logged(
    wal: WriteAheadLog,
) -> None:
    """A V2 envelope whose VIN another replica owns (keep says no) is acknowledged with its
    group, in receipt order, but neither logged nor handed to the sink; a keep that fails keeps
    its whole group."""
    groups: list[list[int]] = []

    def keep(group: list[tuple[str, bytes, Delivery]]) -> list[bool]:
        mids = [delivery.mid for _, _, delivery in group]
        groups.append(mids)
        if 15 in mids:
            raise RuntimeError("cannot tell")
        return [mid % 3 != 0 for mid in mids]

    harness = Harness(wal, keep=keep)
    harness.thread.start()
    try:
        harness.submit(9)
        wait_until(lambda: len(harness.acked) == 9, "every message acknowledged")
        harness.submit(3)  # a group of mids 10, 11, 12, of which 12 is not ours
        wait_until(lambda: len(harness.acked) == 12, "the next group")
        harness.submit(3)  # 13, 14, 15: keep fails, all three are logged
        wait_until(lambda: len(harness.acked) == 15, "the group keep failed on")
    finally:
        harness.stop.set()
        harness.thread.join(DEADLINE_S)
    assert [d.mid for d in harness.acked] == list(range(1, 16)), "receipt order, all of them"
    failed = next(g for g in groups if 15 in g)
    kept = [mid for mid in range(1, 16) if mid % 3 != 0 or mid in failed]
    assert len(harness.delivered) == len(kept)
    assert [r.lsn for r in harness.delivered] == list(range(1, len(kept) + 1)), "no gap in the log"
    assert wal.next_lsn == len(kept) + 1


def test_a_group_of_messages_none_of_which_is_ours_logs_nothing(wal: WriteAheadLog) -> None:
    harness = Harness(wal, keep=lambda group: [False] * len(group))
    harness.thread.start()
    try:
        harness.submit(5)
        wait_until(lambda: len(harness.acked) == 5, "every message acknowledged")
    finally:
        harness.stop.set()
        harness.thread.join(DEADLINE_S)
    assert harness.delivered == []
    assert wal.next_lsn == 1


@pytest.mark.parametrize("with_keep", [False, True])
def test_a_redelivery_an_earlier_holder_logged_is_acked_in_its_turn_and_not_logged(
    wal: WriteAheadLog, with_keep: bool
) -> None:
    """A lost replica's session hands over a message its previous holder logged (marked
    ``logged_elsewhere`` by the host): acknowledged in receipt order, never logged here."""
    harness = Harness(wal, keep=(lambda group: [True] * len(group)) if with_keep else None)
    harness.thread.start()
    try:
        for mid in range(1, 7):
            delivery = Delivery(1, mid, 1, redelivered=mid <= 4, logged_elsewhere=mid in (2, 3))
            harness.intake.submit(TOPIC, PAYLOAD, delivery)
        wait_until(lambda: len(harness.acked) == 6, "every message acknowledged")
    finally:
        harness.stop.set()
        harness.thread.join(DEADLINE_S)
    assert [d.mid for d in harness.acked] == [1, 2, 3, 4, 5, 6]
    assert len(harness.delivered) == 4
    assert wal.next_lsn == 5


# -- how messages are grouped -------------------------------------------------------------------


@contextmanager
def _intake_grouping(
    wal: WriteAheadLog,
    monkeypatch: pytest.MonkeyPatch,
    *,
    window: int,
    linger_s: float,
    idle_gap_s: float,
) -> Iterator[Harness]:
    """A running intake whose groups wait as long as told (far longer than a test waits: the
    rule under test closes them)."""
    monkeypatch.setattr(intake_module, "LINGER_S", linger_s)
    monkeypatch.setattr(intake_module, "IDLE_GAP_S", idle_gap_s)
    harness = Harness(wal, window=window)
    harness.thread.start()
    try:
        yield harness
    finally:
        harness.stop.set()
        harness.thread.join(DEADLINE_S)


def test_a_group_closes_at_once_when_it_holds_the_brokers_window(
    wal: WriteAheadLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broker sends no more than its window before PUBACKs: waiting for more would stall."""
    with _intake_grouping(wal, monkeypatch, window=3, linger_s=60, idle_gap_s=60) as harness:
        harness.submit(2)
        time.sleep(0.3)
        assert harness.acked == [], "two of a window of three: the group waits for more"
        harness.submit(1)
        wait_until(lambda: len(harness.acked) == 3, "the group of three")
        assert harness.groups == [3]
        assert harness.closed_by() == {"window": 1}


def test_a_group_waits_for_messages_that_keep_coming(
    wal: WriteAheadLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Messages 20 ms apart, within the idle gap and the linger: one group, one fsync."""
    with _intake_grouping(wal, monkeypatch, window=100, linger_s=5, idle_gap_s=0.2) as harness:
        for _ in range(5):
            harness.submit(1)
            time.sleep(0.02)
        wait_until(lambda: len(harness.acked) == 5, "the five messages")
        assert harness.groups == [5]
        assert harness.closed_by() == {"idle": 1}


def test_a_group_closes_after_the_idle_gap(
    wal: WriteAheadLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing more comes (a quiet stream, or a broker whose window is smaller than the
    setting): the group goes after the idle gap, not after the full linger."""
    with _intake_grouping(wal, monkeypatch, window=100, linger_s=60, idle_gap_s=0.05) as harness:
        harness.submit(2)
        wait_until(lambda: len(harness.acked) == 2, "the group after the idle gap")
        assert harness.groups == [2]
        assert harness.closed_by() == {"idle": 1}
