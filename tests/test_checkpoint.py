"""CheckpointStore: begin/commit/load cycles, atomic replacement, and corrupt files."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import orjson
import pyarrow.dataset as ds
import pytest

from ingest import checkpoint as checkpoint_module
from ingest import schemas
from ingest.checkpoint import Checkpoint, CheckpointStore, PendingFlush
from ingest.dedupe import DedupeIndex
from ingest.errors import LogCorruptError, LogError
from ingest.parquet import PartitionedWriter, part_file_name


def test_missing_file_loads_as_fresh_checkpoint(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "checkpoint.json")
    assert store.load() == Checkpoint(committed_lsn=0, pending=None)
    assert not (tmp_path / "checkpoint.json").exists()


def test_begin_commit_cycles_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.json"
    store = CheckpointStore(path)
    store.load()

    store.begin(1, 10)
    assert CheckpointStore(path).load() == Checkpoint(0, PendingFlush(1, 10))
    store.commit(10)
    assert CheckpointStore(path).load() == Checkpoint(10, None)
    store.begin(11, 11)
    assert CheckpointStore(path).load() == Checkpoint(10, PendingFlush(11, 11))
    store.commit(11)
    assert CheckpointStore(path).load() == Checkpoint(11, None)
    # Only the checkpoint itself is left in the folder: no temporary file.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.json"]


def test_pending_batch_is_replayed_after_restart(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.json"
    first = CheckpointStore(path)
    first.begin(5, 9)
    # "Crash": a new process loads the intent and replays exactly that batch.
    restarted = CheckpointStore(path)
    checkpoint = restarted.load()
    assert checkpoint.pending == PendingFlush(5, 9)
    restarted.begin(5, 9)
    restarted.commit(9)
    assert CheckpointStore(path).load() == Checkpoint(9, None)


def test_begin_without_load_reads_the_file(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.json"
    CheckpointStore(path).begin(1, 4)
    CheckpointStore(path).commit(4)
    # A store that never called load() must still know committed_lsn = 4.
    with pytest.raises(ValueError, match="after committed LSN 4"):
        CheckpointStore(path).begin(3, 8)


@pytest.mark.parametrize(("first", "last"), [(0, 5), (5, 4), (-1, 2)])
def test_begin_refuses_ranges_that_do_not_follow_the_commit(
    tmp_path: Path, first: int, last: int
) -> None:
    store = CheckpointStore(tmp_path / "checkpoint.json")
    with pytest.raises(ValueError, match="must start after committed LSN 0"):
        store.begin(first, last)
    assert not (tmp_path / "checkpoint.json").exists()


def test_begin_refuses_a_second_batch_while_one_is_pending(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.json"
    store = CheckpointStore(path)
    store.begin(1, 10)
    with pytest.raises(ValueError, match="must be replayed and committed"):
        store.begin(11, 20)
    assert CheckpointStore(path).load() == Checkpoint(0, PendingFlush(1, 10))


@pytest.mark.parametrize("last", [9, 11])
def test_commit_must_match_the_pending_batch(tmp_path: Path, last: int) -> None:
    path = tmp_path / "checkpoint.json"
    store = CheckpointStore(path)
    store.begin(1, 10)
    with pytest.raises(ValueError, match="does not match the pending batch"):
        store.commit(last)
    assert CheckpointStore(path).load() == Checkpoint(0, PendingFlush(1, 10))


def test_commit_without_begin_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="None"):
        CheckpointStore(tmp_path / "checkpoint.json").commit(3)


def _valid_file(tmp_path: Path) -> Path:
    path = tmp_path / "checkpoint.json"
    store = CheckpointStore(path)
    store.begin(1, 10)
    store.commit(10)
    store.begin(11, 20)
    return path


def _edit(path: Path, **changes: object) -> None:
    data = orjson.loads(path.read_bytes())
    data.update(changes)
    path.write_bytes(orjson.dumps(data))


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda p: p.write_bytes(b""), id="empty"),
        pytest.param(lambda p: p.write_bytes(p.read_bytes()[:-9]), id="truncated"),
        pytest.param(lambda p: p.write_bytes(b"\x00" * 64), id="zeros"),
        pytest.param(lambda p: p.write_bytes(b"[1, 2]"), id="not-an-object"),
        # A digit changed: still valid JSON, caught by the CRC.
        pytest.param(lambda p: _edit(p, committed_lsn=100), id="edited-lsn"),
        pytest.param(lambda p: _edit(p, version=2), id="unknown-version"),
        pytest.param(lambda p: _edit(p, crc32="x"), id="bad-crc-type"),
    ],
)
def test_corrupt_file_raises_log_corrupt_error_naming_file_and_fix(
    tmp_path: Path, damage: object
) -> None:
    path = _valid_file(tmp_path)
    assert CheckpointStore(path).load() == Checkpoint(10, PendingFlush(11, 20))
    damage(path)  # type: ignore[operator]
    with pytest.raises(LogCorruptError) as caught:
        CheckpointStore(path).load()
    message = str(caught.value)
    assert str(path) in message
    assert "restore it from a backup" in message
    assert not caught.value.retriable


def test_consistent_but_impossible_content_is_corrupt(tmp_path: Path) -> None:
    # Correct CRC over a pending batch that starts before the committed LSN.
    path = tmp_path / "checkpoint.json"
    body = {"version": 1, "committed_lsn": 50, "pending": {"first_lsn": 10, "last_lsn": 20}}
    path.write_bytes(orjson.dumps({**body, "crc32": checkpoint_module._crc(body)}))
    with pytest.raises(LogCorruptError, match="does not follow the committed LSN"):
        CheckpointStore(path).load()


def test_failed_write_keeps_the_previous_checkpoint_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "checkpoint.json"
    store = CheckpointStore(path)
    store.begin(1, 10)

    def disk_full(_fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(LogError, match="No space left") as caught:
        store.commit(10)
    monkeypatch.undo()

    assert caught.value.retriable
    assert CheckpointStore(path).load() == Checkpoint(0, PendingFlush(1, 10))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.json"]
    # The store still believes the intent is pending, so the retry succeeds.
    store.commit(10)
    assert CheckpointStore(path).load() == Checkpoint(10, None)


# -- the whole protocol: crash anywhere, restart, replay ------------------------------------------

NOV28_MS = 1_795_824_000_000  # 2026-11-28T00:00:00Z
T0_US = NOV28_MS * 1000
DAY_MS = 86_400_000
# Two batches of (message id, item timestamp in ms); batch 2 repeats "m2" and itself ("m6").
BATCHES = {
    (1, 4): [("m1", NOV28_MS), ("m2", NOV28_MS + DAY_MS), ("m3", NOV28_MS), ("m4", None)],
    (5, 8): [("m5", NOV28_MS + DAY_MS), ("m2", NOV28_MS), ("m6", NOV28_MS), ("m6", None)],
}
STEPS = ["begin", "write", "record", "commit"]


class SimulatedCrash(BaseException):
    """Not an OSError: nothing in the code under test may catch it, as with a real kill."""


_real_replace = os.replace


def crash_on_parquet_rename(source: Path, target: Path) -> None:
    if str(source).endswith(".parquet.tmp"):
        raise SimulatedCrash
    _real_replace(source, target)


def run_batch(
    state: Path, out: Path, first: int, last: int, crash_after: str | None = None
) -> None:
    rows = BATCHES[first, last]
    store = CheckpointStore(state / "checkpoint.json")
    store.load()
    with DedupeIndex(state / "dedupe.sqlite3") as index:
        store.begin(first, last)
        if crash_after == "begin":
            raise SimulatedCrash
        candidates = [(key, lsn) for lsn, (key, _) in enumerate(rows, start=first)]
        repeats = index.duplicates(candidates)
        kept = [
            (lsn, key, ts) for lsn, (key, ts) in enumerate(rows, start=first) if lsn not in repeats
        ]
        columns: dict[str, list[Any]] = {
            name: [] for name in schemas.arrow_schema("telemetry.v1").names
        }
        for lsn, key, ts in kept:
            row = {
                "message_id": key, "item_index": 0, "vin": "V", "capability": "c",
                "property": "p", "timestamp": ts, "received_at": (NOV28_MS + 2 * DAY_MS) * 1000,
                "value_number": float(lsn), "value_unit": None, "value_string": None,
                "value_bool": None, "value_json": None, "failure_reason": None,
                "failure_description": None, "availability_json": None, "payload_version": 2,
                "topic": "t",
            }  # fmt: skip
            for name, value in row.items():
                columns[name].append(value)
        writer = PartitionedWriter(out, "telemetry", schema_name="telemetry.v1")
        writer.write(
            columns,
            first_lsn=first,
            last_lsn=last,
            date_column="timestamp",
            fallback_date_column="received_at",
        )
        if crash_after == "write":
            raise SimulatedCrash
        index.record([(key, lsn, T0_US) for key, lsn in dict(reversed(candidates)).items()])
        if crash_after == "record":
            raise SimulatedCrash
        store.commit(last)
        if crash_after == "commit":
            raise SimulatedCrash


def restart(state: Path, out: Path) -> None:
    """What start-up does: clear temporaries, replay a pending batch exactly, then go on."""
    PartitionedWriter(out, "telemetry", schema_name="telemetry.v1").remove_temporaries()
    checkpoint = CheckpointStore(state / "checkpoint.json").load()
    pending = checkpoint.pending
    if pending is not None:
        # As ingest.sink does: drop what the interrupted attempt wrote, so the comparison below
        # shows the replay itself reproduced every file (not that stale copies were left over).
        name = part_file_name(pending.first_lsn, pending.last_lsn)
        for path in (out / "telemetry").glob(f"*/{name}"):
            path.unlink()
        run_batch(state, out, pending.first_lsn, pending.last_lsn)
    for first, last in BATCHES:
        if first > CheckpointStore(state / "checkpoint.json").load().committed_lsn:
            run_batch(state, out, first, last)


def snapshot(out: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(out)): path.read_bytes()
        for path in sorted(out.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def expected_output(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    state, out = tmp_path_factory.mktemp("state"), tmp_path_factory.mktemp("out")
    for first, last in BATCHES:
        run_batch(state, out, first, last)
    return snapshot(out)


def test_uninterrupted_run_drops_repeats(tmp_path: Path, expected_output: dict[str, bytes]) -> None:
    for name, content in expected_output.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content)
    table = ds.dataset(tmp_path / "telemetry", partitioning="hive").to_table()
    # Each message once, at its first LSN (the value column carries the LSN).
    assert sorted(
        zip(
            table.column("message_id").to_pylist(),
            table.column("value_number").to_pylist(),
            strict=True,
        )
    ) == [("m1", 1.0), ("m2", 2.0), ("m3", 3.0), ("m4", 4.0), ("m5", 5.0), ("m6", 7.0)]
    assert sorted(expected_output) == [
        "telemetry/date=2026-11-28/part-00000000000000000001-00000000000000000004.parquet",
        "telemetry/date=2026-11-28/part-00000000000000000005-00000000000000000008.parquet",
        "telemetry/date=2026-11-29/part-00000000000000000001-00000000000000000004.parquet",
        "telemetry/date=2026-11-29/part-00000000000000000005-00000000000000000008.parquet",
        "telemetry/date=2026-11-30/part-00000000000000000001-00000000000000000004.parquet",
    ]


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("crash_after", [*STEPS, "first-file"])
def test_crash_at_any_step_then_restart_gives_the_same_files(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    expected_output: dict[str, bytes],
    batch: tuple[int, int],
    crash_after: str,
) -> None:
    state, out = tmp_path / "state", tmp_path / "out"
    state.mkdir()
    for first, last in BATCHES:
        if (first, last) != batch:
            run_batch(state, out, first, last)
            continue
        if crash_after == "first-file":
            # Killed between writing the first date's temporary file and renaming it.
            monkeypatch.setattr(os, "replace", crash_on_parquet_rename)
        with pytest.raises(SimulatedCrash):
            run_batch(state, out, first, last, crash_after=crash_after)
        monkeypatch.undo()
        break
    if crash_after == "first-file":
        assert any(path.name.endswith(".tmp") for path in out.rglob("*"))
    restart(state, out)

    assert snapshot(out) == expected_output
    assert CheckpointStore(state / "checkpoint.json").load() == Checkpoint(8, None)
