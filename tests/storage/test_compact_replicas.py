"""Compaction of an output shared by several replicas: per (partition, replica), rows once."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import duckdb
import pytest

from ingest import cli
from ingest.checkpoint import CheckpointStore
from ingest.compact import Compactor, Policy, replica_bounds
from ingest.parquet import PartitionedWriter, part_file_name, temp_file_name
from ingest.storage import OutputStore, StoredFile
from ingest.storage.layout import OverlappingFilesError, live_files, part_files, superseded
from ingest.testing.daemon import write_toml
from tests.storage.rows import batch_columns
from tests.storage.s3_support import MotoS3

TODAY = date(2026, 10, 10)  # rows dated Oct 1 and 2: closed with older_than_days=2
BATCHES = [(1, 5), (6, 10), (11, 15), (16, 20), (21, 25), (26, 30)]
OWN, ZERO, ONE = "", "hm-ingest-0", "hm-ingest-1"


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OutputStore]:
    if request.param == "local":
        yield OutputStore.open(tmp_path / "data")
        return
    s3: MotoS3 = request.getfixturevalue("s3")
    yield OutputStore.open(f"s3://{s3.new_bucket()}/out")


def write(store: OutputStore, replica: str, first: int, last: int, days: tuple[int, ...] = (0, 1)):  # type: ignore[no-untyped-def]
    """Replica ``replica``'s sink batch ``[first, last]``; message ids name the replica, so
    replicas' rows differ although their LSNs are the same."""
    columns = batch_columns(first, last, days=days)
    columns["message_id"] = [f"{replica or 'single'}/{m}" for m in columns["message_id"]]
    writer = PartitionedWriter(store, "telemetry", schema_name="telemetry.v1", replica=replica)
    return writer.write(
        columns,
        first_lsn=first,
        last_lsn=last,
        date_column="timestamp",
        fallback_date_column="received_at",
    )


def commit_through(state: Path, last: int) -> None:
    state.mkdir(parents=True, exist_ok=True)
    if last == 0:
        return  # no checkpoint file yet: nothing committed
    checkpoints = CheckpointStore(state / "checkpoint.json")
    checkpoints.begin(1, last)
    checkpoints.commit(last)


def names(store: OutputStore, partition: str) -> list[str]:
    return [f.name for f in store.list_files(store.join("telemetry", partition))]


def rows(store: OutputStore, *, live_only: bool = False) -> Counter[tuple[str, int]]:
    """(message_id, item_index) of every row, counted."""
    files = [f for f in store.list_files(store.join("telemetry")) if f.name.endswith(".parquet")]
    if live_only:
        folders = sorted({f.folder for f in files})
        files = [
            f for folder in folders for f in live_files([g for g in files if g.folder == folder])
        ]
    if not files:
        return Counter()
    table = store.read_tables([f.path for f in files])
    return Counter(
        zip(
            table.column("message_id").to_pylist(),
            table.column("item_index").to_pylist(),
            strict=True,
        )
    )


def compactor(store: OutputStore, state: Path, replica: str = OWN) -> Compactor:
    return Compactor(store, state, Policy(), today=TODAY, replica=replica)


def test_each_replica_is_merged_on_its_own_under_its_own_name(
    store: OutputStore, tmp_path: Path
) -> None:
    for replica in (OWN, ZERO, ONE):
        for first, last in BATCHES:
            write(store, replica, first, last)
    write(store, ZERO, 31, 33)  # ZERO's newest batch: maybe its pending intent
    commit_through(tmp_path / "state", 30)  # the own replica's (single daemon's) exact bound
    before = rows(store)
    assert max(before.values()) == 1
    assert len(before) == (3 * 30 + 3) * 3

    [telemetry, *_] = compactor(store, tmp_path / "state").run()

    assert rows(store) == before
    assert telemetry.bounds == {OWN: 30, ZERO: 30, ONE: 25}  # others: below their newest range
    for partition in ("date=2026-10-01", "date=2026-10-02"):
        assert names(store, partition) == [
            part_file_name(1, 30),
            part_file_name(1, 30, ZERO),
            part_file_name(31, 33, ZERO),
            part_file_name(1, 25, ONE),
            part_file_name(26, 30, ONE),
        ]
    assert (telemetry.runs, telemetry.files_before, telemetry.files_after) == (6, 38, 10)

    [again, *_] = compactor(store, tmp_path / "state").run()
    assert (again.runs, again.superseded_removed, again.files_after) == (0, 0, 10)
    assert rows(store) == before


def test_another_replicas_file_inside_a_merged_range_is_never_superseded(tmp_path: Path) -> None:
    """Overlapping ranges of different replicas are normal: the old rule would delete ONE's file."""
    store = OutputStore.open(tmp_path / "data")
    for first, last in BATCHES:
        write(store, OWN, first, last)
    commit_through(tmp_path / "state", 30)
    compactor(store, tmp_path / "state").run()  # OWN: part-1-30
    write(store, ONE, 6, 10)
    write(store, ONE, 11, 12)
    before = rows(store)

    [report, *_] = compactor(store, tmp_path / "state").run()

    assert report.superseded_removed == 0
    assert not report.skipped
    assert rows(store) == before
    assert names(store, "date=2026-10-01") == [
        part_file_name(1, 30),
        part_file_name(6, 10, ONE),
        part_file_name(11, 12, ONE),
    ]


def test_layout_rules_compare_ranges_within_one_replica_only() -> None:
    def stored(name: str) -> StoredFile:
        return StoredFile(f"t/date=2026-10-01/{name}", 1, None)

    files = [
        stored(part_file_name(1, 30)),
        stored(part_file_name(1, 5)),  # inside part-1-30: a leftover input
        stored(part_file_name(3, 8, ZERO)),  # overlaps part-1-30 and part-1-5: another replica
        stored(part_file_name(1, 30, ONE)),
        stored(part_file_name(6, 10, ONE)),  # inside ONE's part-1-30
        stored(".hidden"),
    ]
    parts = part_files(files)
    assert [(p.replica, p.first, p.last) for p in parts] == [
        (OWN, 1, 30),
        (OWN, 1, 5),
        (ZERO, 3, 8),
        (ONE, 1, 30),
        (ONE, 6, 10),
    ]
    assert [(p.replica, p.first) for p in superseded(parts)] == [(OWN, 1), (ONE, 6)]
    assert [f.name for f in live_files(files)] == [
        part_file_name(1, 30),
        part_file_name(3, 8, ZERO),
        part_file_name(1, 30, ONE),
    ]
    with pytest.raises(OverlappingFilesError, match="hm-ingest-0"):
        superseded(part_files([*files, stored(part_file_name(5, 12, ZERO))]))


def test_bounds_of_other_replicas_never_exceed_what_they_committed() -> None:
    def part(name: str) -> StoredFile:
        return StoredFile(f"t/date=2026-10-01/{name}", 1, None)

    parts = part_files(
        [
            part(part_file_name(1, 30, ZERO)),  # merged earlier
            part(part_file_name(31, 40, ZERO)),  # newest: maybe the pending intent
            part(part_file_name(21, 40, ONE)),  # merged, and its input 31..40 still there
            part(part_file_name(31, 40, ONE)),
        ]
    )
    assert replica_bounds(parts, own=OWN, own_bound=7) == {OWN: 7, ZERO: 30, ONE: 20}


def test_another_replicas_pending_intent_is_left_for_its_replay(
    store: OutputStore, tmp_path: Path
) -> None:
    for first, last in BATCHES:
        write(store, ONE, first, last)  # 26..30 written, crashed before ONE's commit
    commit_through(tmp_path / "state", 0)
    expected = rows(store)

    compactor(store, tmp_path / "state").run()
    assert names(store, "date=2026-10-01") == [
        part_file_name(1, 25, ONE),
        part_file_name(26, 30, ONE),
    ]
    # ONE's replay: it removes exactly that range's files (its own) and writes them again.
    replay = PartitionedWriter(store, "telemetry", schema_name="telemetry.v1", replica=ONE)
    assert replay.remove_batch(26, 30) == 2
    write(store, ONE, 26, 30)
    assert rows(store) == expected


def test_dead_temporaries_are_judged_by_their_own_replicas_bound(tmp_path: Path) -> None:
    store = OutputStore.open(tmp_path / "data")
    for replica in (OWN, ONE):
        for first, last in BATCHES:
            write(store, replica, first, last)
    commit_through(tmp_path / "state", 30)
    folder = tmp_path / "data" / "telemetry" / "date=2026-10-01"
    temps = {
        "own merge": temp_file_name(part_file_name(1, 30)),  # dead: OWN committed 30
        "one merge": temp_file_name(part_file_name(1, 25, ONE)),  # dead: ONE's bound is 25
        "one in flight": temp_file_name(part_file_name(26, 30, ONE)),  # ONE's newest: alive
        "zero unknown": temp_file_name(part_file_name(1, 2, ZERO)),  # no file of ZERO: alive
    }
    for name in temps.values():
        (folder / name).write_bytes(b"half a file")

    [report, *_] = compactor(store, tmp_path / "state").run()

    assert report.temporaries_removed == 2
    assert {k for k, name in temps.items() if (folder / name).exists()} == {
        "one in flight",
        "zero unknown",
    }


def test_command_with_a_replica_id_uses_its_exact_bound_and_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = OutputStore.open(tmp_path / "data")
    for replica in (ZERO, ONE):
        for first, last in [*BATCHES, (31, 33)]:
            write(store, replica, first, last)
    commit_through(tmp_path / "state", 33)  # ZERO's state: everything committed
    config = write_toml(
        {
            "output": {"path": str(tmp_path / "data")},
            "state": {"path": str(tmp_path / "state")},
            "replica": {"id": ZERO, "coordination": f"sqlite:///{tmp_path}/coordination.sqlite3"},
        },
        tmp_path / "ingest.toml",
    )
    before = rows(store)

    assert cli.main(["compact", "--config", str(config)]) == 0

    assert "files 28 -> 6; merged 4 run(s)" in capsys.readouterr().out
    assert names(store, "date=2026-10-02") == [
        part_file_name(1, 33, ZERO),  # its own bound: exact, so its newest batch merges too
        part_file_name(1, 30, ONE),
        part_file_name(31, 33, ONE),
    ]
    assert rows(store) == before


def test_compaction_beside_replicas_writing_keeps_every_row_exactly_once(tmp_path: Path) -> None:
    """Two replicas write late data into closed partitions while compaction passes run."""
    store = OutputStore.open(tmp_path / "data")
    state = tmp_path / "state"
    commit_through(state, 0)
    stop = threading.Event()
    errors: list[BaseException] = []

    def replica_sink(replica: str, checkpoint: bool) -> None:
        checkpoints = CheckpointStore(state / "checkpoint.json") if checkpoint else None
        try:
            first = 1
            while not stop.is_set() or first < 200:
                last = first + 1 + first % 3
                if checkpoints is not None:
                    checkpoints.begin(first, last)
                write(store, replica, first, last, days=(0, 1, 9))  # Oct 10 = today: open
                if checkpoints is not None:
                    checkpoints.commit(last)
                first = last + 1
                if first > 400:
                    return
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    writers = [
        threading.Thread(target=replica_sink, args=(OWN, True)),
        threading.Thread(target=replica_sink, args=(ONE, False)),
    ]
    for thread in writers:
        thread.start()
    merged_runs = 0
    try:
        while any(thread.is_alive() for thread in writers):
            [report, *_] = Compactor(store, state, Policy(older_than_days=1), today=TODAY).run()
            assert not report.skipped, report.skipped
            merged_runs += report.runs
    finally:
        stop.set()
        for thread in writers:
            thread.join()
    assert not errors, errors
    [final, *_] = Compactor(store, state, Policy(older_than_days=1), today=TODAY).run()
    merged_runs += final.runs

    seen = rows(store)
    assert seen == rows(store, live_only=True)
    assert max(seen.values()) == 1
    assert {message.split("/")[0] for message, _ in seen} == {"single", ONE}
    # Every LSN written by each replica, three items each, once.
    for prefix in ("single", ONE):
        lsns = sorted({int(m.split("-")[-1]) for m, _ in seen if m.startswith(prefix + "/")})
        assert lsns == list(range(1, lsns[-1] + 1))
        assert sum(1 for m, _ in seen if m.startswith(prefix + "/")) == 3 * lsns[-1]
    assert merged_runs > 0
    glob = str(tmp_path / "data" / "telemetry" / "**" / "*.parquet")
    with duckdb.connect() as db:
        [(count, distinct)] = db.execute(
            "SELECT count(*), count(DISTINCT (message_id, item_index)) FROM read_parquet(?)",
            [glob],
        ).fetchall()
    assert count == distinct == sum(seen.values())


def test_replica_writers_on_an_object_store_touch_only_their_own_objects(s3: MotoS3) -> None:
    store = OutputStore.open(f"s3://{s3.new_bucket()}/out")
    zero = PartitionedWriter(store, "telemetry", schema_name="telemetry.v1", replica=ZERO)
    one = PartitionedWriter(store, "telemetry", schema_name="telemetry.v1", replica=ONE)
    write(store, ZERO, 1, 10)
    write(store, ONE, 1, 10)
    assert zero.batch_written(1, 10, ["date=2026-10-02"])
    assert not zero.batch_written(1, 11, ["date=2026-10-02"])

    assert zero.remove_batch(1, 10) == 2  # both partitions of ZERO's batch, none of ONE's
    assert not zero.batch_written(1, 10, ["date=2026-10-01", "date=2026-10-02"])
    assert one.batch_written(1, 10, ["date=2026-10-01"])
    assert names(store, "date=2026-10-01") == [part_file_name(1, 10, ONE)]
    assert Counter(m.split("/")[0] for m, _ in rows(store)) == Counter({ONE: 30})
