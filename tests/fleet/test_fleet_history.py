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
