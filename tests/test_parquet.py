"""PartitionedWriter: files read back with pyarrow and DuckDB, atomic and replay-safe."""

from __future__ import annotations

import errno
import os
import shutil
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest import schemas
from ingest.config import REPLICA_ID_PATTERN
from ingest.errors import SinkError
from ingest.parquet import (
    PartitionedWriter,
    PartName,
    parse_part_file_name,
    parse_temp_file_name,
    part_file_name,
    partition_name,
    temp_file_name,
)

DAY_MS = 86_400_000
NOV28_MS = int(datetime(2026, 11, 28, tzinfo=UTC).timestamp() * 1000)
NOV29_MS = NOV28_MS + DAY_MS
NOV30_MS = NOV29_MS + DAY_MS


def telemetry_row(**overrides: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "message_id": "m-1",
        "item_index": 0,
        "vin": "WBA00000000000001",
        "capability": "charging",
        "property": "battery_level",
        "timestamp": NOV28_MS + 1_000,
        "received_at": (NOV28_MS + 2_000) * 1000,
        "value_number": 0.5,
        "value_unit": None,
        "value_string": None,
        "value_bool": None,
        "value_json": None,
        "failure_reason": None,
        "failure_description": None,
        "availability_json": None,
        "payload_version": 2,
        "topic": "live/level13/app/WBA00000000000001",
    }
    row.update(overrides)
    return row


def columns_of(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    return {
        name: [row[name] for row in rows] for name in schemas.arrow_schema("telemetry.v1").names
    }


def telemetry_writer(root: Path, **kwargs: Any) -> PartitionedWriter:
    return PartitionedWriter(root, "telemetry", schema_name="telemetry.v1", **kwargs)


def write_telemetry(
    writer: PartitionedWriter, rows: list[dict[str, Any]], first: int = 1, last: int = 10
) -> list[Any]:
    return writer.write(
        columns_of(rows),
        first_lsn=first,
        last_lsn=last,
        date_column="timestamp",
        fallback_date_column="received_at",
    )


def as_ints(table: pa.Table) -> list[dict[str, Any]]:
    """Rows with timestamps as their stored integers, to compare with the input exactly."""
    arrays = [
        column.cast(pa.int64()) if pa.types.is_timestamp(column.type) else column
        for column in table.columns
    ]
    rows: list[dict[str, Any]] = pa.Table.from_arrays(arrays, names=table.column_names).to_pylist()
    return rows


def files_under(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())


def test_round_trip_keeps_values_nulls_unicode_and_timestamp_units(tmp_path: Path) -> None:
    rows = [
        telemetry_row(),
        telemetry_row(
            message_id="m-2",
            item_index=3,
            timestamp=None,
            received_at=(NOV28_MS + 5_000) * 1000 + 123,
            value_number=None,
            value_string="Zürich \u2013 東京 🚗",
            value_json='{"a": [1, null]}',
            value_bool=False,
            failure_reason="vehicle_asleep",
            failure_description="le véhicule dort",
            availability_json='{"rate_limit": 1}',
            payload_version=1,
        ),
    ]
    [written] = write_telemetry(telemetry_writer(tmp_path), rows)

    table = pq.read_table(written.path)
    assert table.schema.field("timestamp").type == pa.timestamp("ms", tz="UTC")
    assert table.schema.field("received_at").type == pa.timestamp("us", tz="UTC")
    assert as_ints(table) == rows
    assert table.schema.field("received_at").metadata == {
        b"doc": b"when this daemon received the MQTT message"
    }
    assert written.rows == 2
    assert written.bytes == written.path.stat().st_size
    assert written.partition == "date=2026-11-28"
    assert written.path == tmp_path / "telemetry" / "date=2026-11-28" / part_file_name(1, 10)


def test_binary_payloads_round_trip(tmp_path: Path) -> None:
    payloads = [b"", b"\x00\xff\xfe binary \x00", "{ü}".encode(), bytes(range(256))]
    received_at = (NOV29_MS * 1000) + 7
    writer = PartitionedWriter(tmp_path, "rejected", schema_name="rejected.v1")
    written = writer.write(
        {
            "lsn": [5, 6, 7, 8],
            "message_id": [None, "m", None, "n"],
            "vin": [None, "V1", "V1", None],
            "topic": ["t"] * 4,
            "received_at": [received_at] * 4,
            "reason": ["bad_json"] * 4,
            "detail": ["x"] * 4,
            "payload": payloads,
        },
        first_lsn=5,
        last_lsn=8,
        date_column="received_at",
    )

    [file] = written
    table = pq.read_table(file.path)
    assert table.column("payload").to_pylist() == payloads
    assert table.column("message_id").to_pylist() == [None, "m", None, "n"]
    assert table.schema.field("payload").type == pa.binary()
    assert file.partition == "date=2026-11-29"


def test_multi_date_batch_gives_one_file_per_date_using_fallback_for_null_dates(
    tmp_path: Path,
) -> None:
    rows = [
        telemetry_row(message_id="a", timestamp=NOV29_MS + 10),
        telemetry_row(message_id="b", timestamp=NOV28_MS + 10),
        # No item timestamp: the receive time (30 Nov) decides.
        telemetry_row(message_id="c", timestamp=None, received_at=(NOV30_MS + 1) * 1000),
        telemetry_row(message_id="d", timestamp=NOV29_MS + 5),
        # The item timestamp wins over a receive time on another day.
        telemetry_row(message_id="e", timestamp=NOV28_MS + DAY_MS - 1, received_at=NOV30_MS * 1000),
    ]
    written = write_telemetry(telemetry_writer(tmp_path), rows, first=100, last=104)

    assert [file.partition for file in written] == [
        "date=2026-11-28",
        "date=2026-11-29",
        "date=2026-11-30",
    ]
    ids = {
        file.partition: pq.read_table(file.path).column("message_id").to_pylist()
        for file in written
    }
    # Input order is kept within each file (d after a).
    assert ids == {
        "date=2026-11-28": ["b", "e"],
        "date=2026-11-29": ["a", "d"],
        "date=2026-11-30": ["c"],
    }
    assert [file.rows for file in written] == [2, 2, 1]
    assert {file.path.name for file in written} == {part_file_name(100, 104)}


def test_null_date_without_fallback_is_refused(tmp_path: Path) -> None:
    writer = telemetry_writer(tmp_path)
    with pytest.raises(ValueError, match="no date"):
        writer.write(
            columns_of([telemetry_row(timestamp=None)]),
            first_lsn=1,
            last_lsn=1,
            date_column="timestamp",
        )
    assert files_under(tmp_path) == []


def test_same_batch_twice_gives_identical_files_and_no_duplicate_rows(tmp_path: Path) -> None:
    rows = [
        telemetry_row(message_id=f"m-{i}", timestamp=NOV28_MS + i * DAY_MS // 2) for i in range(6)
    ]
    writer = telemetry_writer(tmp_path)
    first = write_telemetry(writer, rows, first=7, last=12)
    first_bytes = {file.path: file.path.read_bytes() for file in first}

    second = write_telemetry(telemetry_writer(tmp_path), rows, first=7, last=12)

    assert [file.path for file in second] == [file.path for file in first]
    assert {file.path: file.path.read_bytes() for file in second} == first_bytes
    assert len(files_under(tmp_path)) == 3
    dataset = ds.dataset(tmp_path / "telemetry", partitioning="hive")
    assert sorted(dataset.to_table().column("message_id").to_pylist()) == [
        f"m-{i}" for i in range(6)
    ]


def test_dataset_and_duckdb_read_partitions(tmp_path: Path) -> None:
    writer = telemetry_writer(tmp_path)
    write_telemetry(writer, [telemetry_row(message_id="a", timestamp=NOV28_MS)], first=1, last=1)
    write_telemetry(writer, [telemetry_row(message_id="b", timestamp=NOV29_MS)], first=2, last=3)

    table = ds.dataset(tmp_path / "telemetry", partitioning="hive").to_table()
    by_id = dict(
        zip(table.column("message_id").to_pylist(), table.column("date").to_pylist(), strict=True)
    )
    assert {key: str(value) for key, value in by_id.items()} == {
        "a": "2026-11-28",
        "b": "2026-11-29",
    }
    assert table.schema.field("timestamp").type == pa.timestamp("ms", tz="UTC")

    glob = str(tmp_path / "telemetry" / "*" / "*.parquet")
    with duckdb.connect() as db:
        result = db.execute(
            "SELECT message_id, CAST(date AS VARCHAR), typeof(timestamp), typeof(received_at) "
            "FROM read_parquet(?, hive_partitioning = true) ORDER BY message_id",
            [glob],
        ).fetchall()
    assert result == [
        ("a", "2026-11-28", "TIMESTAMP WITH TIME ZONE", "TIMESTAMP WITH TIME ZONE"),
        ("b", "2026-11-29", "TIMESTAMP WITH TIME ZONE", "TIMESTAMP WITH TIME ZONE"),
    ]


def test_leftover_temporaries_are_ignored_by_readers_and_removed(tmp_path: Path) -> None:
    writer = telemetry_writer(tmp_path)
    [file] = write_telemetry(writer, [telemetry_row()], first=1, last=5)
    # What a crash between write and rename leaves: a complete file under the temporary name.
    # Being valid Parquet, it would add rows if a reader picked it up.
    temp = file.path.with_name(f".{part_file_name(6, 9)}.tmp")
    shutil.copyfile(file.path, temp)
    unrelated = file.path.with_name(".keep")
    unrelated.write_bytes(b"")

    assert ds.dataset(tmp_path / "telemetry", partitioning="hive").count_rows() == 1
    glob = str(tmp_path / "telemetry" / "*" / "*.parquet")
    with duckdb.connect() as db:
        [(count,)] = db.execute(
            "SELECT count(*) FROM read_parquet(?, hive_partitioning = true)", [glob]
        ).fetchall()
    assert count == 1

    assert writer.remove_temporaries() == 1
    assert not temp.exists()
    assert file.path.exists()
    assert unrelated.exists()
    assert writer.remove_temporaries() == 0


def test_remove_temporaries_without_output_folder(tmp_path: Path) -> None:
    assert telemetry_writer(tmp_path / "missing").remove_temporaries() == 0


def _raise_enospc(*_args: object, **_kwargs: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("failing", ["write", "fsync"])
def test_disk_full_raises_sink_error_and_leaves_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    temporaries_seen: list[Path] = []
    real_write_table = pq.write_table

    def write_then_fail(table: pa.Table, where: Path, **kwargs: Any) -> None:
        # Part of the file reaches the disk before space runs out.
        real_write_table(table, where, **kwargs)
        temporaries_seen.append(Path(where))
        if failing == "write":
            _raise_enospc()

    real_fsync = os.fsync

    def fsync_fails_once_the_file_exists(fd: int) -> None:
        # Folder fsyncs before the write succeed; the data file's fsync reports the full disk
        # (as delayed allocation does on ext4/XFS and thin-provisioned volumes).
        if temporaries_seen:
            _raise_enospc()
        real_fsync(fd)

    monkeypatch.setattr(pq, "write_table", write_then_fail)
    if failing == "fsync":
        monkeypatch.setattr(os, "fsync", fsync_fails_once_the_file_exists)
    writer = telemetry_writer(tmp_path)

    with pytest.raises(SinkError, match="disk is full") as caught:
        write_telemetry(writer, [telemetry_row()], first=3, last=4)

    final = tmp_path / "telemetry" / "date=2026-11-28" / part_file_name(3, 4)
    assert str(final) in str(caught.value)
    assert "ENOSPC" in str(caught.value)
    assert caught.value.retriable
    assert isinstance(caught.value.__cause__, OSError)
    assert caught.value.__cause__.errno == errno.ENOSPC
    # The temporary file did exist, and is gone.
    assert [path.name for path in temporaries_seen] == [f".{part_file_name(3, 4)}.tmp"]
    assert files_under(tmp_path / "telemetry") == []


def test_permission_error_is_not_retriable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(SinkError, match="Permission denied") as caught:
        write_telemetry(telemetry_writer(tmp_path), [telemetry_row()])
    assert not caught.value.retriable
    assert files_under(tmp_path / "telemetry") == []


def test_dictionary_columns_and_zstd_in_file_metadata(tmp_path: Path) -> None:
    rows = [telemetry_row(message_id=f"m-{i}", value_string=f"s{i % 3}") for i in range(50)]
    [file] = write_telemetry(telemetry_writer(tmp_path), rows)

    metadata = pq.ParquetFile(file.path).metadata
    dictionary = set(schemas.dictionary_columns("telemetry.v1"))
    assert dictionary  # the schema does name some
    row_group = metadata.row_group(0)
    for index in range(row_group.num_columns):
        column = row_group.column(index)
        encoded = {"RLE_DICTIONARY", "PLAIN_DICTIONARY"} & set(column.encodings)
        assert bool(encoded) == (column.path_in_schema in dictionary), column.path_in_schema
        assert column.compression == "ZSTD", column.path_in_schema


def test_row_groups_follow_row_group_rows(tmp_path: Path) -> None:
    rows = [telemetry_row(message_id=f"m-{i}") for i in range(25)]
    [file] = write_telemetry(telemetry_writer(tmp_path, row_group_rows=10), rows)
    metadata = pq.ParquetFile(file.path).metadata
    assert [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)] == [10, 10, 5]


def test_zero_rows_write_nothing(tmp_path: Path) -> None:
    assert write_telemetry(telemetry_writer(tmp_path), []) == []
    assert not (tmp_path / "telemetry").exists()


def test_arrow_table_input_is_cast_to_the_schema(tmp_path: Path) -> None:
    rows = [telemetry_row(), telemetry_row(message_id="m-2", timestamp=None)]
    # Integers for timestamps, and columns in another order than the schema's.
    table = pa.table(dict(reversed(list(columns_of(rows).items()))))
    [file] = telemetry_writer(tmp_path).write(
        table, first_lsn=1, last_lsn=2, date_column="timestamp", fallback_date_column="received_at"
    )
    read = pq.read_table(file.path)
    assert read.schema.names == schemas.arrow_schema("telemetry.v1").names
    assert as_ints(read) == rows


def test_lossy_nanosecond_input_is_refused(tmp_path: Path) -> None:
    columns: dict[str, Any] = columns_of([telemetry_row()])
    table = pa.table(columns).set_column(
        5, "timestamp", pa.array([NOV28_MS * 1_000_000 + 1], pa.timestamp("ns", tz="UTC"))
    )
    with pytest.raises(ValueError, match="'timestamp'"):
        telemetry_writer(tmp_path).write(table, first_lsn=1, last_lsn=1, date_column="timestamp")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"vin": None}, "not nullable"),
        ({"item_index": "three"}, "'item_index'"),
        ({"payload_version": 300}, "'payload_version'"),
    ],
)
def test_rows_that_do_not_fit_the_schema_are_refused(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        write_telemetry(telemetry_writer(tmp_path), [telemetry_row(**change)])
    assert files_under(tmp_path) == []


def test_missing_and_unexpected_columns_are_named(tmp_path: Path) -> None:
    columns = columns_of([telemetry_row()])
    del columns["topic"]
    columns["speed"] = [1.0]
    with pytest.raises(ValueError, match=r"missing \['topic'\], unexpected \['speed'\]"):
        telemetry_writer(tmp_path).write(columns, first_lsn=1, last_lsn=1, date_column="timestamp")


@pytest.mark.parametrize(("first", "last"), [(-1, 3), (5, 4), (0, 10**20)])
def test_invalid_lsn_ranges_are_refused(first: int, last: int) -> None:
    with pytest.raises(ValueError, match="LSN range"):
        part_file_name(first, last)


@pytest.mark.parametrize(
    "name", ["part-1-2.parquet", ".part-00000000000000000001-00000000000000000002.parquet.tmp", "x"]
)
def test_parse_file_name_refuses_other_names(name: str) -> None:
    with pytest.raises(ValueError, match="not a part file name"):
        parse_part_file_name(name)


LSNS = st.integers(min_value=0, max_value=10**20 - 1)


@given(st.lists(st.tuples(LSNS, LSNS).map(sorted), min_size=1, max_size=20))
def test_file_names_parse_back_and_sort_by_lsn(ranges: list[list[int]]) -> None:
    names = [part_file_name(first, last) for first, last in ranges]
    assert [parse_part_file_name(name) for name in names] == [
        ("", first, last) for first, last in ranges
    ]
    assert sorted(names) == [part_file_name(first, last) for first, last in sorted(ranges)]


# Milliseconds from year 1900 to 2200, and nulls, so days before 1970 are covered too.
TIMESTAMPS_MS = st.integers(min_value=-2_208_988_800_000, max_value=7_258_118_400_000)


@settings(max_examples=40, deadline=None)
@given(
    item_times=st.lists(st.none() | TIMESTAMPS_MS, min_size=1, max_size=30),
    received_ms=st.lists(TIMESTAMPS_MS, min_size=30, max_size=30),
    lsn_range=st.tuples(LSNS, LSNS).map(sorted),
)
def test_every_row_lands_in_the_partition_of_its_utc_date(
    tmp_path_factory: pytest.TempPathFactory,
    item_times: list[int | None],
    received_ms: list[int],
    lsn_range: list[int],
) -> None:
    root = tmp_path_factory.mktemp("out")
    rows = [
        telemetry_row(message_id=str(i), timestamp=ts, received_at=received_ms[i] * 1000 + 999)
        for i, ts in enumerate(item_times)
    ]
    first, last = lsn_range
    written = write_telemetry(telemetry_writer(root), rows, first=first, last=last)

    expected: dict[str, list[str]] = {}
    for row in rows:
        ms = row["timestamp"] if row["timestamp"] is not None else row["received_at"] // 1000
        day = date(1970, 1, 1) + timedelta(milliseconds=ms)
        expected.setdefault(partition_name(day), []).append(row["message_id"])
    assert {
        file.partition: pq.read_table(file.path).column("message_id").to_pylist()
        for file in written
    } == expected
    assert [file.partition for file in written] == sorted(expected)
    for file in written:
        assert file.path.parent.name == file.partition
        assert parse_part_file_name(file.path.name) == ("", first, last)


# -- replicas: one shared output folder, LSNs per replica ----------------------------------------

REPLICA_IDS = st.from_regex(REPLICA_ID_PATTERN.removesuffix("$") + r"\Z")


def test_single_daemon_names_are_unchanged() -> None:
    assert part_file_name(1, 10) == "part-00000000000000000001-00000000000000000010.parquet"
    assert part_file_name(1, 10, "") == part_file_name(1, 10)
    assert part_file_name(1, 10, "hm-ingest-2") == (
        "part-hm-ingest-2-00000000000000000001-00000000000000000010.parquet"
    )


@pytest.mark.parametrize(
    "replica",
    [
        "hm-ingest-2",
        "a",
        "0",
        "12345678901234567890",  # looks like an LSN group
        "00000000000000000001-00000000000000000002",  # looks like two of them
        "x-00000000000000000003",
        "pod.name_with-everything-",
        "z" * 63,
    ],
)
def test_replica_names_parse_unambiguously(replica: str) -> None:
    name = part_file_name(7, 9, replica)
    assert parse_part_file_name(name) == PartName(replica, 7, 9)
    assert parse_temp_file_name(temp_file_name(name)) == PartName(replica, 7, 9)
    assert parse_temp_file_name(name) is None  # a final name is not a temporary one


@pytest.mark.parametrize("replica", ["-lead", "a b", "a/b", "z" * 64, "é", ".hidden"])
def test_invalid_replica_ids_are_refused_with_the_rule(tmp_path: Path, replica: str) -> None:
    with pytest.raises(ValueError, match=r"replica id .* is not valid: use 1 to 63"):
        part_file_name(1, 2, replica)
    with pytest.raises(ValueError, match="replica id"):
        telemetry_writer(tmp_path, replica=replica)


@given(REPLICA_IDS, st.tuples(LSNS, LSNS).map(sorted))
def test_any_valid_replica_id_round_trips(replica: str, lsn_range: list[int]) -> None:
    first, last = lsn_range
    assert parse_part_file_name(part_file_name(first, last, replica)) == (replica, first, last)


def test_replicas_share_a_folder_without_touching_each_others_files(tmp_path: Path) -> None:
    """Same LSNs in the same partition: two files; each writer replaces and removes only its own."""
    one = telemetry_writer(tmp_path, replica="hm-ingest-0")
    two = telemetry_writer(tmp_path, replica="hm-ingest-1")
    single = telemetry_writer(tmp_path)
    [a] = write_telemetry(one, [telemetry_row(message_id="a")], first=1, last=10)
    [b] = write_telemetry(two, [telemetry_row(message_id="b")], first=1, last=10)
    [c] = write_telemetry(single, [telemetry_row(message_id="c")], first=1, last=10)
    assert len({a.path, b.path, c.path}) == 3
    assert a.path.parent == b.path.parent == c.path.parent

    # A replayed intent of replica 0 overwrites its own file, and removes only its own.
    write_telemetry(one, [telemetry_row(message_id="a")], first=1, last=10)
    assert one.remove_batch(1, 10) == 1
    assert not a.path.exists()
    assert b.path.exists()
    assert c.path.exists()
    assert two.remove_batch(1, 10) == 1
    assert single.remove_batch(1, 10) == 1
    assert files_under(tmp_path / "telemetry") == []


def test_remove_temporaries_leaves_other_replicas_in_flight_files(tmp_path: Path) -> None:
    """Replica 1 starting up must not delete the file replica 0 is about to rename."""
    one = telemetry_writer(tmp_path, replica="hm-ingest-0")
    two = telemetry_writer(tmp_path, replica="hm-ingest-1")
    single = telemetry_writer(tmp_path)
    folder = tmp_path / "telemetry" / "date=2026-11-28"
    folder.mkdir(parents=True)
    temps = {
        "hm-ingest-0": folder / temp_file_name(part_file_name(1, 5, "hm-ingest-0")),
        "hm-ingest-1": folder / temp_file_name(part_file_name(1, 5, "hm-ingest-1")),
        # A prefix of another id must not count as the same replica.
        "hm-ingest-10": folder / temp_file_name(part_file_name(1, 5, "hm-ingest-10")),
        "": folder / temp_file_name(part_file_name(1, 5)),
    }
    for temp in temps.values():
        temp.write_bytes(b"half a parquet file")

    assert two.remove_temporaries() == 1
    assert {name for name, path in temps.items() if path.exists()} == {
        "hm-ingest-0",
        "hm-ingest-10",
        "",
    }
    assert single.remove_temporaries() == 1
    assert one.remove_temporaries() == 1
    assert [p.name for p in folder.iterdir()] == [temps["hm-ingest-10"].name]


def test_batch_written_looks_only_at_the_given_partitions_and_replica(tmp_path: Path) -> None:
    one = telemetry_writer(tmp_path, replica="r1")
    two = telemetry_writer(tmp_path, replica="r2")
    write_telemetry(one, [telemetry_row()], first=1, last=5)
    assert one.batch_written(1, 5, ["date=2026-11-28"])
    assert not one.batch_written(1, 5, ["date=2026-11-29"])
    assert not one.batch_written(1, 6, ["date=2026-11-28"])
    assert not two.batch_written(1, 5, ["date=2026-11-28"])


def test_readers_see_every_replicas_rows_once(tmp_path: Path) -> None:
    """DuckDB and pyarrow over telemetry/**/*.parquet: overlapping LSNs of replicas all count."""
    expected = set()
    for replica in ("", "hm-ingest-0", "hm-ingest-1"):
        writer = telemetry_writer(tmp_path, replica=replica)
        for first in (1, 11):
            rows = [
                telemetry_row(message_id=f"{replica}/{first}", timestamp=NOV28_MS),
                telemetry_row(message_id=f"{replica}/{first}", timestamp=NOV29_MS, item_index=1),
            ]
            write_telemetry(writer, rows, first=first, last=first + 9)
            expected |= {(row["message_id"], row["item_index"]) for row in rows}
    glob = str(tmp_path / "telemetry" / "**" / "*.parquet")
    with duckdb.connect() as db:
        seen = db.execute(
            "SELECT message_id, item_index FROM read_parquet(?, hive_partitioning = true)", [glob]
        ).fetchall()
    assert sorted(seen) == sorted(expected)
    assert len(seen) == 12
    table = ds.dataset(tmp_path / "telemetry", partitioning="hive").to_table()
    ids, items = table.column("message_id").to_pylist(), table.column("item_index").to_pylist()
    assert sorted(zip(ids, items, strict=True)) == sorted(expected)
