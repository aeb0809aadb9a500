"""Figures for docs/storage.md: upload throughput to an S3-compatible server (moto on loopback)
and compaction, local and S3. Not a test (pytest does not collect it); prints one line per figure.

    .venv/bin/python -m tests.storage.bench_storage [--batches 40] [--rows 20000] [--small 400]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from datetime import date
from pathlib import Path

import pyarrow as pa

from ingest.checkpoint import CheckpointStore
from ingest.compact import Compactor, Policy
from ingest.parquet import PartitionedWriter
from ingest.storage import OutputStore
from tests.storage.rows import batch_columns, write_batch
from tests.storage.s3_support import MotoS3

MIB = 1024 * 1024


def _writer(store: OutputStore) -> PartitionedWriter:
    return PartitionedWriter(store, "telemetry", schema_name="telemetry.v1")


def upload(store: OutputStore, label: str, batches: int, messages: int) -> None:
    """PartitionedWriter.write end to end (Arrow conversion, zstd encoding, fsync or upload)."""
    writer = _writer(store)
    columns = [batch_columns(i * messages + 1, (i + 1) * messages) for i in range(batches)]
    started = time.perf_counter()
    written = rows = 0
    for index, batch in enumerate(columns):
        first = index * messages + 1
        for file in writer.write(
            batch,
            first_lsn=first,
            last_lsn=first + messages - 1,
            date_column="timestamp",
            fallback_date_column="received_at",
        ):
            written += file.bytes
            rows += file.rows
    seconds = time.perf_counter() - started
    print(
        f"write {label}: {batches} files of {rows // batches:,} rows "
        f"({written / batches / MIB:.2f} MiB each): {batches / seconds:.1f} files/s, "
        f"{rows / seconds:,.0f} rows/s, {written / seconds / MIB:.1f} MiB/s"
    )


def transport(store: OutputStore, label: str, size_mib: int, count: int) -> None:
    """OutputStore.put of incompressible objects: the store's own throughput, no encoding."""
    data = pa.py_buffer(os.urandom(size_mib * MIB))
    started = time.perf_counter()
    for index in range(count):
        store.put(store.join("raw", f"object-{index}.bin"), data)
    seconds = time.perf_counter() - started
    print(
        f"put {label}: {count} objects of {size_mib} MiB: {count * size_mib / seconds:.1f} MiB/s, "
        f"{count / seconds:.1f} objects/s"
    )


def compaction(store: OutputStore, state: Path, label: str, files: int, messages: int) -> None:
    for index in range(files):
        first = index * messages + 1
        write_batch(_writer(store), first, first + messages - 1)
    state.mkdir(parents=True, exist_ok=True)
    checkpoints = CheckpointStore(state / "checkpoint.json")
    checkpoints.begin(1, files * messages)
    checkpoints.commit(files * messages)
    started = time.perf_counter()
    [report, *_] = Compactor(store, state, Policy(), today=date(2026, 10, 10)).run()
    seconds = time.perf_counter() - started
    print(
        f"compact {label}: files {report.files_before} -> {report.files_after}, "
        f"{report.rows_merged:,} rows, {report.bytes_merged / MIB:.1f} MiB in {seconds:.2f} s: "
        f"{report.rows_merged / seconds:,.0f} rows/s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, default=40, help="large files written")
    parser.add_argument("--rows", type=int, default=20000, help="messages per large file (x3 rows)")
    parser.add_argument("--small", type=int, default=400, help="small files written and compacted")
    args = parser.parse_args()
    s3 = MotoS3()
    os.environ.update(s3.environment())
    s3.start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            local = OutputStore.open(root / "data")
            remote = OutputStore.open(f"s3://{s3.new_bucket()}/bench")
            for size_mib, count in ((1, 40), (8, 10), (32, 4)):
                transport(remote, "moto S3", size_mib, count)
            upload(local, "local (fsync)", args.batches, args.rows)
            upload(remote, "moto S3", args.batches, args.rows)
            upload(OutputStore.open(root / "small"), "local small", args.small, 25)
            upload(
                OutputStore.open(f"s3://{s3.new_bucket()}/small"), "moto S3 small", args.small, 25
            )
            compaction(OutputStore.open(root / "c"), root / "c-state", "local", args.small, 25)
            compaction(
                OutputStore.open(f"s3://{s3.new_bucket()}/c"),
                root / "s-state",
                "moto S3",
                args.small,
                25,
            )
    finally:
        s3.stop()


if __name__ == "__main__":
    main()
