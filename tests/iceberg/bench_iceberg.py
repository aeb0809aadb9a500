"""Benchmark: time per Iceberg append of a 10k-row telemetry batch, and how it grows.

Run: ``.venv/bin/python -m tests.iceberg.bench_iceberg [batches] [rows] [local|s3]``. Prints
figures; asserts nothing about speed. Each batch is written by the real Parquet writer (one file,
one day), then appended by :class:`ingest.iceberg.appender.IcebergTables` to the SQLite catalog;
``copy`` rows are the same batches with one timestamp-less row, whose file is split by partition.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

from ingest.config import Settings
from ingest.iceberg import open_tables
from ingest.parquet import PartitionedWriter
from ingest.schemas import TELEMETRY
from tests.storage.rows import batch_columns


def run(batches: int, rows: int, tmp: Path, *, untimed: bool) -> tuple[list[float], list[float]]:
    """Seconds per append and per Parquet write of each batch."""
    settings = Settings.model_validate(
        {
            "output": {"path": str(tmp / "data")},
            "state": {"path": str(tmp / "state")},
            "iceberg": {"enabled": True},
        }
    )
    tables = open_tables(settings)
    writer = PartitionedWriter(tmp / "data", "telemetry", schema_name=TELEMETRY)
    per_message = 3
    messages = rows // per_message
    seconds, writes = [], []
    for n in range(batches):
        first, last = n * messages + 1, (n + 1) * messages
        columns = batch_columns(first, last)
        if untimed:
            columns["timestamp"][0] = None
        started = time.perf_counter()
        written = writer.write(
            columns,
            first_lsn=first,
            last_lsn=last,
            date_column="timestamp",
            fallback_date_column="received_at",
        )
        writes.append(time.perf_counter() - started)
        started = time.perf_counter()
        tables.append(first, last, {"telemetry": written})
        seconds.append(time.perf_counter() - started)
    tables.close()
    return seconds, writes


def main() -> None:
    batches = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    rows = int(sys.argv[2]) if len(sys.argv) > 2 else 10_000
    for untimed in (False, True):
        with tempfile.TemporaryDirectory() as folder:
            seconds, writes = run(batches, rows, Path(folder), untimed=untimed)
        kind = "copy " if untimed else "register"
        print(
            f"{kind}: {batches} appends of {rows} rows: first {seconds[0] * 1000:.0f} ms, "
            f"median {statistics.median(seconds) * 1000:.0f} ms, "
            f"last 10 mean {statistics.mean(seconds[-10:]) * 1000:.0f} ms, "
            f"max {max(seconds) * 1000:.0f} ms; the Parquet write itself: median "
            f"{statistics.median(writes) * 1000:.0f} ms"
        )


if __name__ == "__main__":
    main()
