"""Committed batches through the real pipeline → Iceberg tables on a local warehouse.

Each test commits batches with ``open_pipeline`` (the daemon's own assembly, SQLite catalog under
the state folder) and reads the tables back through pyiceberg and DuckDB.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import duckdb
import pyarrow.compute as pc
import pytest

from ingest.errors import LogError, SinkError
from ingest.iceberg.catalog import SQLITE_FILE
from ingest.pipeline import Pipeline
from tests.iceberg.support import (
    commit_groups,
    data_files,
    keys,
    load,
    lsn_ranges,
    lsn_summaries,
    messages,
    plain_rows,
    settings_for,
    untimed_message,
)


def test_each_batch_is_one_snapshot_registering_the_plain_files(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    batch = messages(90, invalid_fraction=0.1)
    last = commit_groups(settings, [batch[:30], batch[30:60], batch[60:]])
    assert last == 90
    assert (tmp_path / "state" / SQLITE_FILE).exists()
    output = tmp_path / "data"
    for name in ("telemetry", "rejected"):
        table = load(settings, name)
        plain = plain_rows(output, name)
        assert plain.num_rows > 0
        scanned = table.scan().to_arrow()
        key = ("message_id", "item_index") if name == "telemetry" else ("lsn",)
        # Exactly the rows of the plain layout, each once.
        assert keys(scanned, key) == keys(plain, key)
        # No second copy: the table's data files are the plain layout's files.
        assert data_files(table) == sorted(
            f"file://{p}" for p in sorted((output / name).glob("*/*.parquet"))
        )
        # One snapshot per batch that wrote rows to this table (not every batch has rejects).
        ranges = lsn_ranges(output / name)
        assert lsn_summaries(table) == [last for _, last in ranges]
        assert lsn_summaries(table, "hm-ingest.first-lsn") == [first for first, _ in ranges]
        assert table.properties["hm-ingest.last-lsn"] == str(ranges[-1][1])
        assert table.properties["gc.enabled"] == "false"
        assert [f.name for f in table.spec().fields] == [
            "timestamp_day" if name == "telemetry" else "received_at_day"
        ]
    assert lsn_summaries(load(settings, "telemetry")) == [30, 60, 90]
    # Nothing was written under the warehouse but metadata.
    assert not list((output / "iceberg").rglob("data/*"))


def test_duckdb_reads_the_table_through_pyiceberg(tmp_path: Path) -> None:
    """DuckDB's own iceberg extension is downloaded on first use (no network here); pyiceberg's
    scan hands DuckDB the table's files instead, which works offline."""
    settings = settings_for(tmp_path)
    batch = messages(40)
    commit_groups(settings, [batch[:20], batch[20:]])
    connection = load(settings, "telemetry").scan().to_duckdb("telemetry")
    count, distinct = connection.execute(
        "SELECT count(*), count(DISTINCT (message_id, item_index)) FROM telemetry"
    ).fetchone()
    assert count == distinct == plain_rows(tmp_path / "data", "telemetry").num_rows
    # And DuckDB reading the planned files directly agrees (what an engine does).
    files = [p.removeprefix("file://") for p in data_files(load(settings, "telemetry"))]
    direct = duckdb.connect().execute(f"SELECT count(*) FROM read_parquet({files!r})").fetchall()
    assert direct == [(count,)]


def test_a_file_mixing_timed_and_untimed_rows_is_split_by_partition(tmp_path: Path) -> None:
    """Rows without their own timestamp go to the null partition of day(timestamp); registering
    their plain file under its date would hide them from ``timestamp IS NULL``."""
    settings = settings_for(tmp_path)
    timed = messages(10)
    commit_groups(settings, [[*timed, untimed_message("u-1"), untimed_message("u-2", 1)]])
    table = load(settings, "telemetry")
    untimed = table.scan(row_filter="timestamp IS NULL").to_arrow()
    assert sorted(untimed.column("message_id").to_pylist()) == ["u-1", "u-2"]
    on_the_day = table.scan(row_filter="timestamp >= '2026-11-28T00:00:00+00:00'").to_arrow()
    plain = plain_rows(tmp_path / "data", "telemetry")
    assert keys(on_the_day) == keys(plain.filter(pc.field("timestamp").is_valid()))
    assert keys(table.scan().to_arrow()) == keys(plain_rows(tmp_path / "data", "telemetry"))
    files = data_files(table)
    location = table.location().rstrip("/")
    assert files == [
        f"{location}/data/timestamp_day=2026-11-28/"
        "part-00000000000000000001-00000000000000000012.date-2026-11-28.parquet",
        f"{location}/data/timestamp_day=null/"
        "part-00000000000000000001-00000000000000000012.date-2026-11-28.parquet",
    ]
    partitions = sorted(str(task.file.partition[0]) for task in table.scan().plan_files())
    assert partitions == ["20785", "None"]  # 2026-11-28 is day 20785


def test_a_batch_spanning_two_days_registers_one_file_per_day(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    before_midnight = dt.datetime(2026, 11, 28, 23, 59, 30, tzinfo=dt.UTC)
    batch = messages(60, base=before_midnight)  # item timestamps run past midnight
    commit_groups(settings, [batch])
    table = load(settings, "telemetry")
    by_partition = {
        task.file.partition[0]: task.file.file_path for task in table.scan().plan_files()
    }
    assert sorted(by_partition) == [20785, 20786]
    assert "date=2026-11-28/" in by_partition[20785]
    assert "date=2026-11-29/" in by_partition[20786]
    next_day = table.scan(row_filter="timestamp >= '2026-11-29T00:00:00+00:00'")
    assert {t.file.partition[0] for t in next_day.plan_files()} == {20786}


def test_a_commit_retried_after_the_append_does_not_append_again(tmp_path: Path) -> None:
    """The dedupe index (state disk full) fails once after the Iceberg append: the sink retries
    the whole commit, and the retry finds the batch already in the tables."""
    settings = settings_for(tmp_path)

    def fail_once(pipeline: Pipeline) -> None:
        assert pipeline.opened is not None  # the thread sink: its dedupe index is ours
        real = pipeline.opened.dedupe.record
        failures = [LogError("could not write dedupe index: No space left on device")]

        def record(entries: list[tuple[str, int, int]]) -> None:
            if failures:
                raise failures.pop()
            real(entries)

        pipeline.opened.dedupe.record = record  # type: ignore[method-assign]

    batch = messages(20, invalid_fraction=0.2)
    commit_groups(settings, [batch], prepare=fail_once)
    for name in ("telemetry", "rejected"):
        table = load(settings, name)
        assert lsn_summaries(table) == [20]
        key = ("message_id", "item_index") if name == "telemetry" else ("lsn",)
        assert keys(table.scan().to_arrow(), key) == keys(plain_rows(tmp_path / "data", name), key)


def test_replicas_record_their_own_lsns(tmp_path: Path) -> None:
    coordination = f"sqlite:///{tmp_path / 'coordination.sqlite3'}"
    shared_catalog = f"sqlite:///{tmp_path / 'catalog.sqlite3'}"
    iceberg = {"uri": shared_catalog}
    first = settings_for(
        tmp_path / "a",
        output=str(tmp_path / "data"),
        iceberg=iceberg,
        replica={"id": "pod-0", "coordination": coordination},
    )
    second = settings_for(
        tmp_path / "b",
        output=str(tmp_path / "data"),
        iceberg=iceberg,
        replica={"id": "pod-1", "coordination": coordination},
    )
    commit_groups(first, [messages(10, prefix="a")])
    commit_groups(second, [messages(5, prefix="b"), messages(5, prefix="c")])
    table = load(first, "telemetry")
    assert table.properties["hm-ingest.pod-0.last-lsn"] == "10"
    assert table.properties["hm-ingest.pod-1.last-lsn"] == "10"
    assert lsn_summaries(table, "hm-ingest.pod-0.last-lsn") == [10]
    assert lsn_summaries(table, "hm-ingest.pod-1.last-lsn") == [5, 10]
    assert table.scan().to_arrow().num_rows == plain_rows(tmp_path / "data", "telemetry").num_rows


def test_a_table_ahead_of_the_state_folder_stops_the_sink(tmp_path: Path) -> None:
    """State reset under an existing table: the new run's LSNs restart at 1, below what the
    table holds. Appending or skipping would both be wrong; the sink stops and says why."""
    shared_catalog = f"sqlite:///{tmp_path / 'catalog.sqlite3'}"
    settings = settings_for(
        tmp_path / "one", output=str(tmp_path / "data"), iceberg={"uri": shared_catalog}
    )
    commit_groups(settings, [messages(10, prefix="a"), messages(10, prefix="b")])
    reset = settings_for(
        tmp_path / "two",
        output=str(tmp_path / "data2"),
        iceberg={"uri": shared_catalog, "warehouse": f"file://{tmp_path / 'data' / 'iceberg'}"},
    )
    with pytest.raises(SinkError, match=r"older than the table") as raised:
        commit_groups(reset, [messages(5, prefix="c")])
    assert not raised.value.retriable
    assert lsn_summaries(load(settings, "telemetry")) == [10, 20]


def test_old_snapshots_are_expired_but_no_file_is_deleted(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, iceberg={"keep_snapshots": 2})
    batch = messages(60)
    commit_groups(settings, [batch[i : i + 10] for i in range(0, 60, 10)])
    table = load(settings, "telemetry")
    # Expired in steps: at most keep + keep // 5 (at least 1) snapshots remain.
    assert 2 <= len(table.snapshots()) <= 3
    assert lsn_summaries(table)[-1] == 60
    assert table.properties["hm-ingest.last-lsn"] == "60"
    plain = plain_rows(tmp_path / "data", "telemetry")
    assert keys(table.scan().to_arrow()) == keys(plain)
    assert len(list((tmp_path / "data" / "telemetry").glob("*/*.parquet"))) == 6
