"""``hm-ingest compact``: every row exactly once, idempotent, crash-safe, beside the sink."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds
import pytest

from ingest import cli
from ingest.checkpoint import CheckpointStore
from ingest.compact import CompactionError, Compactor, Policy
from ingest.parquet import TEMP_PREFIX, TEMP_SUFFIX, PartitionedWriter, part_file_name
from ingest.storage import OutputStore
from ingest.storage.layout import PartFile, live_files
from ingest.testing.daemon import write_toml
from tests.storage.daemon_support import s3_settings
from tests.storage.rows import write_batch
from tests.storage.s3_support import MotoS3

TODAY = date(2026, 10, 10)  # the rows are dated Oct 1 and 2: closed with older_than_days=2


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OutputStore]:
    if request.param == "local":
        yield OutputStore.open(tmp_path / "data")
        return
    s3: MotoS3 = request.getfixturevalue("s3")
    yield OutputStore.open(f"s3://{s3.new_bucket()}/out")


def writer(store: OutputStore) -> PartitionedWriter:
    return PartitionedWriter(store, "telemetry", schema_name="telemetry.v1")


def commit_through(state: Path, last: int) -> None:
    checkpoints = CheckpointStore(state / "checkpoint.json")
    state.mkdir(parents=True, exist_ok=True)
    checkpoints.begin(1, last)
    checkpoints.commit(last)


def names(store: OutputStore, partition: str) -> list[str]:
    return [f.name for f in store.list_files(store.join("telemetry", partition))]


def rows(store: OutputStore) -> Counter[tuple[Any, ...]]:
    """Every telemetry row as a tuple, counted: equal Counters = same rows, same multiplicity."""
    files = [
        f.path for f in store.list_files(store.join("telemetry")) if f.name.endswith(".parquet")
    ]
    table = ds.dataset(files, filesystem=store.filesystem, format="parquet").to_table()
    return Counter(zip(*(c.to_pylist() for c in table.columns), strict=True))


def compactor(store: OutputStore, state: Path, **policy: Any) -> Compactor:
    return Compactor(store, state, Policy(**policy), today=TODAY)


def write_batches(store: OutputStore, ranges: list[tuple[int, int]]) -> None:
    for first, last in ranges:
        write_batch(writer(store), first, last, days=(0, 1))


BATCHES = [(1, 5), (6, 10), (11, 15), (16, 20), (21, 25), (26, 30)]


def test_merges_committed_files_of_closed_partitions_keeping_every_row_once(
    store: OutputStore, tmp_path: Path
) -> None:
    write_batches(store, [*BATCHES, (31, 33)])
    write_batch(writer(store), 34, 35, days=(9,))  # Oct 10 = today: an open partition
    commit_through(tmp_path / "state", 30)  # 31..35 are not committed yet
    before = rows(store)

    [telemetry, rejected, clearance] = compactor(store, tmp_path / "state").run()

    assert rows(store) == before
    assert max(before.values()) == 1
    for partition in ("date=2026-10-01", "date=2026-10-02"):
        assert names(store, partition) == [part_file_name(1, 30), part_file_name(31, 33)]
    assert names(store, "date=2026-10-10") == [part_file_name(34, 35)]
    # Rows keep LSN order, so a rerun of the same run writes the same file.
    merged = store.read_table(store.join("telemetry", "date=2026-10-01", part_file_name(1, 30)))
    ids = merged.column("message_id").to_pylist()
    assert ids == sorted(ids)
    assert (telemetry.partitions, telemetry.files_before, telemetry.files_after) == (2, 14, 4)
    assert (telemetry.runs, telemetry.rows_merged) == (2, 30 * 3)
    assert rejected.partitions == clearance.partitions == 0


def test_second_pass_changes_nothing(store: OutputStore, tmp_path: Path) -> None:
    write_batches(store, BATCHES)
    commit_through(tmp_path / "state", 30)
    compactor(store, tmp_path / "state").run()
    files = store.list_files(store.join("telemetry"))

    [again, *_] = compactor(store, tmp_path / "state").run()

    assert (again.runs, again.superseded_removed, again.files_after) == (0, 0, 2)
    assert [(f.path, f.size) for f in store.list_files(store.join("telemetry"))] == [
        (f.path, f.size) for f in files
    ]


class CrashAfterWrite(Compactor):
    """Stops the pass where a SIGKILL between writing the merged file and deleting its inputs
    would: the merged file is complete, every input is still there."""

    def inputs_written(self, run: list[PartFile]) -> None:
        raise KeyboardInterrupt("crash")


def test_crash_between_write_and_delete_costs_nothing_after_a_rerun(
    store: OutputStore, tmp_path: Path
) -> None:
    write_batches(store, BATCHES)
    commit_through(tmp_path / "state", 30)
    before = rows(store)
    with pytest.raises(KeyboardInterrupt):
        CrashAfterWrite(store, tmp_path / "state", Policy(), today=TODAY).run()

    partition = store.join("telemetry", "date=2026-10-01")
    left = store.list_files(partition)
    assert part_file_name(1, 30) in [f.name for f in left]
    assert len(left) == len(BATCHES) + 1  # a naive reader sees rows twice until the rerun ...
    assert [f.name for f in live_files(left)] == [part_file_name(1, 30)]  # ... live_files never

    [report, *_] = compactor(store, tmp_path / "state").run()

    assert report.superseded_removed == len(BATCHES)
    assert names(store, "date=2026-10-01") == [part_file_name(1, 30)]
    assert names(store, "date=2026-10-02") == [part_file_name(1, 30)]
    assert rows(store) == before


def test_temporary_file_of_an_interrupted_local_merge_is_removed(tmp_path: Path) -> None:
    store = OutputStore.open(tmp_path / "data")
    write_batches(store, BATCHES)
    commit_through(tmp_path / "state", 30)
    folder = tmp_path / "data" / "telemetry" / "date=2026-10-01"
    dead = folder / f"{TEMP_PREFIX}{part_file_name(1, 30)}{TEMP_SUFFIX}"
    dead.write_bytes(b"half a file")
    in_flight = folder / f"{TEMP_PREFIX}{part_file_name(31, 40)}{TEMP_SUFFIX}"  # the sink's
    in_flight.write_bytes(b"being written")

    [report, *_] = compactor(store, tmp_path / "state").run()

    assert report.temporaries_removed == 1
    assert not dead.exists()
    assert in_flight.exists(), "a temporary file above the committed bound belongs to the sink"


def test_pending_intent_is_left_for_the_replay_which_then_adds_nothing_twice(
    store: OutputStore, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    write_batches(store, BATCHES)
    commit_through(state, 25)
    CheckpointStore(state / "checkpoint.json").begin(26, 30)  # written, crashed before commit
    expected = rows(store)

    compactor(store, state).run()
    assert names(store, "date=2026-10-01") == [part_file_name(1, 25), part_file_name(26, 30)]
    # The replay of the intent: the sink removes exactly that range's files and writes them again.
    assert writer(store).remove_batch(26, 30) == 2
    write_batch(writer(store), 26, 30, days=(0, 1))

    assert rows(store) == expected


def test_runs_stay_consecutive_and_within_the_target_size(
    store: OutputStore, tmp_path: Path
) -> None:
    write_batches(store, BATCHES)
    commit_through(tmp_path / "state", 30)
    size = max(f.size for f in store.list_files(store.join("telemetry")))
    before = rows(store)

    compactor(store, tmp_path / "state", target_bytes=2 * size).run()

    assert names(store, "date=2026-10-01") == [
        part_file_name(1, 10),
        part_file_name(11, 20),
        part_file_name(21, 30),
    ]
    assert rows(store) == before


def test_overlapping_ranges_are_reported_and_left_alone(tmp_path: Path) -> None:
    store = OutputStore.open(tmp_path / "data")
    write_batches(store, [(1, 10), (5, 12), (13, 20)])  # 5..12 overlaps 1..10: a reset state
    commit_through(tmp_path / "state", 20)

    [report, *_] = compactor(store, tmp_path / "state").run()

    assert len(report.skipped) == 2
    assert "overlaps" in report.skipped[0]
    assert (report.files_before, report.files_after) == (6, 6)
    assert len(names(store, "date=2026-10-01")) == 3


def test_rows_in_the_wrong_partition_are_left_alone_without_touching_another(
    tmp_path: Path,
) -> None:
    store = OutputStore.open(tmp_path / "data")
    write_batches(store, BATCHES)
    commit_through(tmp_path / "state", 30)
    compactor(store, tmp_path / "state").run()  # both partitions now hold part-1-30
    write_batches(store, [(31, 35), (36, 40)])
    checkpoints = CheckpointStore(tmp_path / "state" / "checkpoint.json")
    checkpoints.begin(31, 40)
    checkpoints.commit(40)
    # A file moved into the wrong partition by hand: its rows belong to Oct 2.
    oct1 = tmp_path / "data" / "telemetry" / "date=2026-10-01"
    oct2 = tmp_path / "data" / "telemetry" / "date=2026-10-02"
    (oct2 / part_file_name(31, 35)).rename(oct1 / part_file_name(41, 45))
    checkpoints.begin(41, 45)
    checkpoints.commit(45)
    before = rows(store)

    [report, *_] = compactor(store, tmp_path / "state").run()

    assert len(report.skipped) == 1
    assert "do not all belong to date=2026-10-01" in report.skipped[0]
    assert rows(store) == before
    assert names(store, "date=2026-10-01") == [
        part_file_name(1, 30),
        part_file_name(31, 35),
        part_file_name(36, 40),
        part_file_name(41, 45),
    ]
    assert names(store, "date=2026-10-02") == [part_file_name(1, 40)]  # merged as usual


def test_a_second_compaction_is_refused_while_one_runs(tmp_path: Path) -> None:
    store = OutputStore.open(tmp_path / "data")
    write_batches(store, BATCHES)
    commit_through(tmp_path / "state", 30)

    class Nested(Compactor):
        def inputs_written(self, run: list[PartFile]) -> None:
            with pytest.raises(CompactionError, match=r"another compaction holds .*compact.lock"):
                compactor(store, tmp_path / "state").run()

    Nested(store, tmp_path / "state", Policy(), today=TODAY).run()


def test_command_dry_run_changes_nothing_then_compacts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = OutputStore.open(tmp_path / "data")
    write_batches(store, BATCHES)
    commit_through(tmp_path / "state", 30)
    config = write_toml(
        {"output": {"path": str(tmp_path / "data")}, "state": {"path": str(tmp_path / "state")}},
        tmp_path / "ingest.toml",
    )
    before = [f.path for f in store.list_files(store.join("telemetry"))]

    assert cli.main(["compact", "--config", str(config), "--dry-run"]) == 0
    assert [f.path for f in store.list_files(store.join("telemetry"))] == before
    assert "telemetry: 2 closed partition(s), files 12 -> 2; would merge 2 run(s)" in (
        capsys.readouterr().out
    )

    assert cli.main(["compact", "--config", str(config), "--older-than-days", "0"]) == 0
    out = capsys.readouterr().out
    assert "files 12 -> 2; merged 2 run(s), 90 rows" in out
    assert len(store.list_files(store.join("telemetry"))) == 2


def test_command_without_the_daemons_state_refuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_toml({"state": {"path": str(tmp_path / "nowhere")}}, tmp_path / "ingest.toml")
    assert cli.main(["compact", "--config", str(config)]) == 1
    assert "no checkpoint in" in capsys.readouterr().err


def test_command_compacts_an_object_store(
    s3: MotoS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = f"s3://{s3.new_bucket()}/hm"
    store = OutputStore.open(uri)
    write_batches(store, BATCHES)
    commit_through(tmp_path / "state", 30)
    tree: dict[str, dict[str, Any]] = {"output": {}, "state": {"path": str(tmp_path / "state")}}
    s3_settings(tree, uri, monkeypatch)
    config = write_toml(tree, tmp_path / "ingest.toml")
    before = rows(store)

    assert cli.main(["compact", "--config", str(config)]) == 0

    assert "files 12 -> 2; merged 2 run(s), 90 rows" in capsys.readouterr().out
    assert names(store, "date=2026-10-01") == [part_file_name(1, 30)]
    assert rows(store) == before
