"""The tables on an object store: output and warehouse on a moto S3 server."""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs

from tests.iceberg.support import (
    commit_groups,
    data_files,
    keys,
    load,
    lsn_summaries,
    messages,
    settings_for,
    untimed_message,
)
from tests.storage.s3_support import MotoS3, s3_dataset


def test_batches_on_s3_are_registered_in_place(s3: MotoS3, tmp_path: Path) -> None:
    bucket = s3.new_bucket()
    output = f"s3://{bucket}/out"
    settings = settings_for(tmp_path, output=output)
    batch = messages(40, invalid_fraction=0.1)
    commit_groups(settings, [batch[:20], [*batch[20:], untimed_message("u-1")]])

    table = load(settings, "telemetry")
    assert table.location().startswith(f"s3://{bucket}/out/iceberg/")
    plain = s3_dataset(output, "telemetry").to_table()
    assert keys(table.scan().to_arrow()) == keys(plain)
    assert lsn_summaries(table) == [20, 41]
    files = data_files(table)
    # Batch 1's file is the plain object itself; batch 2's mixes untimed rows and is split.
    assert (
        f"s3://{bucket}/out/telemetry/date=2026-11-28/part-00000000000000000001-00000000000000000020.parquet"
        in files
    )
    assert sum(f.startswith(table.location()) for f in files) == 2
    assert table.scan(row_filter="timestamp IS NULL").to_arrow().num_rows == 1
    # The metadata lives in the bucket too: nothing but the catalog's SQLite file is local.
    filesystem, _ = pafs.FileSystem.from_uri(output)
    metadata = filesystem.get_file_info(pafs.FileSelector(f"{bucket}/out/iceberg", recursive=True))
    assert any(info.path.endswith(".metadata.json") for info in metadata)
