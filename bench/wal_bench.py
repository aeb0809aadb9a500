"""Append and read-back throughput of the write-ahead log, printed (not a test).

    python bench/wal_bench.py [directory]

Appends 200,000 records of ~300 bytes in batches of 500 in each durability mode, then reads them
back. CPU seconds are reported beside wall time: the goal is that 20,000 records/s cost well under
10% of a core besides fsync, i.e. under ~5 us of CPU per record.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

from ingest.wal import Durability, WriteAheadLog

RECORDS = 200_000
BATCH = 500
PAYLOAD_BYTES = 240  # plus a ~56-byte V1 topic: ~300 bytes per message
TARGET_RATE = 20_000  # records/s the daemon must sustain


def _batches() -> list[list[tuple[int, str, bytes]]]:
    payload = os.urandom(PAYLOAD_BYTES)
    now_us = time.time_ns() // 1_000
    entries = [
        (now_us + i, f"live/level13/app/VIN{i % 1_000:014d}/diagnostics/get/speed", payload)
        for i in range(RECORDS)
    ]
    return [entries[i : i + BATCH] for i in range(0, RECORDS, BATCH)]


def _report(label: str, wall_s: float, cpu_s: float, nbytes: int) -> None:
    per_record_us = cpu_s / RECORDS * 1e6
    print(
        f"{label:<16} {RECORDS / wall_s:>11,.0f} records/s {nbytes / wall_s / 1e6:>8.1f} MB/s"
        f"   cpu {per_record_us:5.2f} us/record"
        f" = {per_record_us * TARGET_RATE / 1e4:5.2f}% of a core at {TARGET_RATE:,}/s"
    )


def main(root: Path) -> None:
    batches = _batches()
    for durability in Durability:
        directory = root / durability.value
        with WriteAheadLog.open(directory, durability=durability) as wal:
            wall, cpu = time.perf_counter(), time.process_time()
            for batch in batches:
                wal.append_batch(batch)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            size = wal.size_bytes
            _report(f"append {durability.value}", wall, cpu, size)
            wall, cpu = time.perf_counter(), time.process_time()
            count = sum(1 for _ in wal.read_from(1))
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            assert count == RECORDS, count
            _report(f"read {durability.value}", wall, cpu, size)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
