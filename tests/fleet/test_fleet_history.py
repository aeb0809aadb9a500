"""Transitions → clearance/ Parquet, exactly once, including across a crash mid-export."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds

from ingest.fleet import ClearanceStateStore, TransitionHistory
from ingest.hmapi import Clearance
from ingest.schemas import arrow_schema

from .conftest import vin

DAY1 = datetime(2026, 11, 27, 23, 59, tzinfo=UTC)
DAY2 = DAY1 + timedelta(minutes=2)


def observe(store: ClearanceStateStore, status: str, at: datetime, *numbers: int) -> None:
    listing = [Clearance(vin(n), status, "bmw", {}) for n in numbers]
    store.observe(listing, source="reconcile", at=at, complete=False)


def rows(out: Path) -> list[dict[str, Any]]:
    folder = out / "clearance"
    if not folder.exists():
        return []
    table = ds.dataset(folder, format="parquet", partitioning="hive").to_table()
    return sorted(table.to_pylist(), key=lambda row: int(row["transition_id"]))


def test_rows_land_in_date_partitions_with_the_schema(
    store: ClearanceStateStore, history: TransitionHistory, tmp_path: Path
) -> None:
    observe(store, "pending", DAY1, 1, 2)
    observe(store, "approved", DAY2, 1)
    files = history.export()
    assert sorted(f.partition for f in files) == ["date=2026-11-27", "date=2026-11-28"]
    assert {f.path.name for f in files} == {
        "part-00000000000000000001-00000000000000000003.parquet"
    }
    written = rows(tmp_path / "out")
    assert [(r["vin"], r["from_status"], r["to_status"]) for r in written] == [
        (vin(1), None, "pending"),
        (vin(2), None, "pending"),
        (vin(1), "pending", "approved"),
    ]
    assert written[2]["observed_at"] == DAY2
    assert written[0]["source"] == "reconcile"
    schema = ds.dataset(files[0].path, format="parquet").schema
    assert schema.remove_metadata().equals(arrow_schema("clearance.v1").remove_metadata())
    assert history.export() == []  # nothing new: no new file


def test_crash_before_export_loses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "clearance.sqlite3"
    with ClearanceStateStore(path) as store:
        observe(store, "pending", DAY1, 1, 2)
        # Crash: persisted to SQLite, never exported.
    with ClearanceStateStore(path) as store:
        TransitionHistory(store, tmp_path / "out").export()
        assert store.unexported() == 0
    assert [r["vin"] for r in rows(tmp_path / "out")] == [vin(1), vin(2)]


def test_crash_between_parquet_and_high_water_mark_duplicates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "clearance.sqlite3"
    with ClearanceStateStore(path) as store:
        observe(store, "pending", DAY1, 1, 2, 3)
        history = TransitionHistory(store, tmp_path / "out")
        batch = store.begin_export(100)
        assert batch is not None
        history.write(batch)
        # Crash here: the files exist, the high-water mark was never moved.
    # ...and a temporary file of a write that was cut short lies beside them.
    leftover = (
        tmp_path
        / "out"
        / "clearance"
        / "date=2026-11-27"
        / (".part-00000000000000000001-00000000000000000003.parquet.tmp")
    )
    leftover.touch()
    with ClearanceStateStore(path) as store:
        observe(store, "approved", DAY2, 1, 2)  # more changes arrive after the restart
        TransitionHistory(store, tmp_path / "out").export()
        assert store.unexported() == 0
    assert not leftover.exists()
    written = rows(tmp_path / "out")
    ids = Counter(int(r["transition_id"]) for r in written)
    assert ids == Counter({1: 1, 2: 1, 3: 1, 4: 1, 5: 1})
    assert [r["to_status"] for r in written] == ["pending"] * 3 + ["approved"] * 2


def test_export_batches_are_bounded(store: ClearanceStateStore, tmp_path: Path) -> None:
    observe(store, "pending", DAY1, *range(5))
    files = TransitionHistory(store, tmp_path / "out", batch_rows=2).export()
    assert [f.rows for f in files] == [2, 2, 1]
    assert len(rows(tmp_path / "out")) == 5


# -- replicas: only the leader exports; a follower skips what the leader writes --------------------

REPLICA = "hm-ingest-2"


def test_a_replicas_files_carry_its_id(store: ClearanceStateStore, tmp_path: Path) -> None:
    observe(store, "pending", DAY1, 1, 2)
    files = TransitionHistory(store, tmp_path / "out", replica=REPLICA).export()
    assert {f.path.name for f in files} == {
        "part-hm-ingest-2-00000000000000000001-00000000000000000002.parquet"
    }
    assert [r["vin"] for r in rows(tmp_path / "out")] == [vin(1), vin(2)]


def test_a_follower_skips_without_writing_then_exports_only_what_it_records_as_leader(
    store: ClearanceStateStore, tmp_path: Path
) -> None:
    history = TransitionHistory(store, tmp_path / "out", replica=REPLICA, batch_rows=2)
    observe(store, "pending", DAY1, 1, 2, 3)  # the leader exports these, not this replica

    assert history.skip_pending() == 3
    assert store.unexported() == 0
    assert not (tmp_path / "out" / "clearance").exists()
    assert history.skip_pending() == 0

    observe(store, "approved", DAY2, 1)  # recorded after this replica became leader
    [file] = history.export()
    assert file.path.name == "part-hm-ingest-2-00000000000000000004-00000000000000000004.parquet"
    assert [(r["vin"], r["to_status"]) for r in rows(tmp_path / "out")] == [(vin(1), "approved")]


def test_skipping_completes_an_export_cut_short_after_some_files(tmp_path: Path) -> None:
    """Leader, crash mid-export, back as follower: the half-written range is finished, not cut."""
    path = tmp_path / "clearance.sqlite3"
    with ClearanceStateStore(path) as store:
        observe(store, "pending", DAY1, 1, 2)
        observe(store, "approved", DAY2, 1)  # the next UTC day: two files for one range
        history = TransitionHistory(store, tmp_path / "out", replica=REPLICA)
        batch = store.begin_export(100)
        assert batch is not None
        [first_day, second_day] = history.write(batch)
        second_day.path.unlink()  # Path: a local root. The crash came before this file.
    with ClearanceStateStore(path) as store:
        observe(store, "revoked", DAY2, 2)  # recorded as a follower: the leader's to export
        history = TransitionHistory(store, tmp_path / "out", replica=REPLICA)
        assert history.skip_pending() == 1
        assert store.unexported() == 0
    assert first_day.path.exists()
    assert second_day.path.exists()
    assert [int(r["transition_id"]) for r in rows(tmp_path / "out")] == [1, 2, 3]


def test_skipping_an_intent_that_wrote_nothing_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "clearance.sqlite3"
    with ClearanceStateStore(path) as store:
        observe(store, "pending", DAY1, 1, 2)
        assert store.begin_export(100) is not None  # crash before any file
    with ClearanceStateStore(path) as store:
        assert TransitionHistory(store, tmp_path / "out", replica=REPLICA).skip_pending() == 2
        assert store.unexported() == 0
    assert rows(tmp_path / "out") == []


def test_replicas_and_a_single_daemon_share_the_clearance_folder(tmp_path: Path) -> None:
    """Same transition ids, one folder: every row once, and each start-up clears only its own."""
    out = tmp_path / "out"
    expected = []
    for replica in ("", "hm-ingest-0", "hm-ingest-1"):
        with ClearanceStateStore(tmp_path / (replica or "single") / "c.sqlite3") as store:
            observe(store, "pending", DAY1, 1, 2)
            TransitionHistory(store, out, replica=replica).export()
            expected += [vin(1), vin(2)]
    folder = out / "clearance" / "date=2026-11-27"
    other = folder / ".part-hm-ingest-1-00000000000000000003-00000000000000000003.parquet.tmp"
    other.write_bytes(b"being written by hm-ingest-1")
    with ClearanceStateStore(tmp_path / "single" / "c.sqlite3") as store:
        TransitionHistory(store, out)  # a restart removes its own temporaries only
    assert other.exists()
    assert sorted(r["vin"] for r in rows(out)) == sorted(expected)
    assert sorted(p.name for p in folder.glob("*.parquet")) == [
        "part-00000000000000000001-00000000000000000002.parquet",
        "part-hm-ingest-0-00000000000000000001-00000000000000000002.parquet",
        "part-hm-ingest-1-00000000000000000001-00000000000000000002.parquet",
    ]
