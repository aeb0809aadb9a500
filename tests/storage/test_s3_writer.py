"""PartitionedWriter on a real S3-compatible server (moto): whole objects, same layout, replays."""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs
import pytest

from ingest.errors import SinkError
from ingest.parquet import PartitionedWriter, part_file_name
from ingest.storage import OutputStore
from tests.storage.rows import write_batch
from tests.storage.s3_support import MotoS3, s3_dataset, s3_files


def _writer(uri: str) -> PartitionedWriter:
    return PartitionedWriter(OutputStore.open(uri), "telemetry", schema_name="telemetry.v1")


def test_batches_land_in_the_local_layout_and_read_back_over_s3(s3: MotoS3, tmp_path: Path) -> None:
    uri = f"s3://{s3.new_bucket()}/fleet/prod"
    remote = _writer(uri)
    local = PartitionedWriter(tmp_path, "telemetry", schema_name="telemetry.v1")
    for writer in (remote, local):
        write_batch(writer, 1, 40, days=(0, 1))
        write_batch(writer, 41, 45)

    bucket = uri.removeprefix("s3://").split("/")[0]
    keys = [path.removeprefix(f"{bucket}/fleet/prod/") for path in s3_files(uri, "telemetry")]
    local_keys = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.parquet"))
    assert keys == local_keys
    assert keys == [
        f"telemetry/date=2026-10-01/{part_file_name(1, 40)}",
        f"telemetry/date=2026-10-01/{part_file_name(41, 45)}",
        f"telemetry/date=2026-10-02/{part_file_name(1, 40)}",
    ]
    table = s3_dataset(uri, "telemetry").to_table()
    assert table.num_rows == 45 * 3
    assert sorted(set(table.column("date").to_pylist())) == ["2026-10-01", "2026-10-02"]
    # Byte for byte what the local writer produced: the same encoder, only the transport differs.
    filesystem, base = pafs.FileSystem.from_uri(uri)
    for key in keys:
        with filesystem.open_input_stream(f"{base}/{key}") as remote_file:
            assert remote_file.read() == (tmp_path / key).read_bytes()


def test_replay_overwrites_the_same_objects_and_remove_batch_clears_every_partition(
    s3: MotoS3,
) -> None:
    uri = f"s3://{s3.new_bucket()}/out"
    writer = _writer(uri)
    first = write_batch(writer, 1, 10, days=(0, 1, 2))
    before = s3_files(uri, "telemetry")
    again = write_batch(writer, 1, 10, days=(0, 1, 2))
    assert [f.path for f in again] == [f.path for f in first]
    assert s3_files(uri, "telemetry") == before
    assert s3_dataset(uri, "telemetry").to_table().num_rows == 30

    write_batch(writer, 11, 12)
    assert writer.remove_batch(1, 10) == 3
    assert writer.remove_batch(1, 10) == 0  # idempotent: a second replay finds nothing
    assert [p.rsplit("/", 1)[1] for p in s3_files(uri, "telemetry")] == [part_file_name(11, 12)]
    assert writer.remove_temporaries() == 0


def test_unreachable_store_is_a_retriable_error_and_leaves_no_object(s3: MotoS3) -> None:
    uri = f"s3://{s3.new_bucket()}/out"
    writer = _writer(uri)
    write_batch(writer, 1, 5)
    s3.stop()
    try:
        with pytest.raises(SinkError, match=r"could not upload s3://.*reachable") as caught:
            write_batch(writer, 6, 9)
        assert caught.value.retriable
    finally:
        s3.start()
    assert [p.rsplit("/", 1)[1] for p in s3_files(uri, "telemetry")] == [part_file_name(1, 5)]
    write_batch(writer, 6, 9)  # the store is back: the retried write succeeds
    assert s3_dataset(uri, "telemetry").to_table().num_rows == 9 * 3


def test_missing_bucket_names_the_uri(s3: MotoS3) -> None:
    writer = _writer("s3://no-such-bucket-here/out")
    with pytest.raises(SinkError, match="s3://no-such-bucket-here/out/telemetry/date=2026-10-01"):
        write_batch(writer, 1, 2)


def test_probe_reports_a_usable_store_and_explains_an_unusable_one(s3: MotoS3) -> None:
    uri = f"s3://{s3.new_bucket()}/out"
    assert OutputStore.open(uri).probe() is None
    assert s3_files(uri, "") == [], "the probe object is deleted again"
    problem = OutputStore.open("s3://no-such-bucket-here/out").probe()
    assert problem is not None
    assert "could not upload s3://no-such-bucket-here/out/.hm-ingest-probe-" in problem
