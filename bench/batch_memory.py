"""Memory and CPU of one pending batch, without a broker: decode → PendingBatch → Parquet.

    python bench/batch_memory.py                    # 250,000 telemetry rows, 3 processes
    python bench/batch_memory.py --rows 100000 --code /path/to/other/tree   # another ingest/

Feeds the same realistic traffic as drain_bench.py through the sink's own steps (decode, dedupe
key, PendingBatch, commit to Parquet in a temporary folder) in one process and prints what the
batch costs: RSS growth while filling it, the peak during the commit, Arrow's share, and CPU
seconds per 100k messages for filling and for committing. The messages are generated first and
their memory is not counted. Not a test: figures, not assertions.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/batch_memory.py`; PYTHONPATH (--code) first
    sys.path.append(str(Path(__file__).resolve().parent.parent))

import orjson
import pyarrow as pa

from ingest.batch import PendingBatch, dedupe_key
from ingest.decode import Decoder
from ingest.parquet import PartitionedWriter
from ingest.testing.daemon import APP_ID
from ingest.testing.traffic import stream
from ingest.wal import LogRecord

CHUNK = 1024  # records per _add_chunk call, about one intake group


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> None:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux ≥ 4.0).
    Path("/proc/self/clear_refs").write_text("5")


def _records(rows: int) -> list[LogRecord]:
    """Enough messages for ``rows`` telemetry rows (1.6 rows per message in this traffic)."""
    records: list[LogRecord] = []
    total = 0
    now_us = time.time_ns() // 1000
    for lsn, message in enumerate(stream(APP_ID, int(rows / 1.4) + 1000, vehicles=1000), 1):
        records.append(LogRecord(lsn, now_us + lsn, message.topic, message.payload))
        total += message.items
        if total >= rows:
            break
    return records


def _fill(records: list[LogRecord], decoder: Decoder) -> PendingBatch:
    """What Sink._add_chunk does, minus the dedupe index and the clearance gate."""
    batch = PendingBatch(first_lsn=records[0].lsn, oldest_received_us=records[0].received_at_us)
    for start in range(0, len(records), CHUNK):
        chunk = records[start : start + CHUNK]
        decoded = [decoder.decode(r.topic, r.payload, r.received_at_us) for r in chunk]
        keys = [dedupe_key(d, r) for d, r in zip(decoded, chunk, strict=True)]
        for record, message, key in zip(chunk, decoded, keys, strict=True):
            batch.last_lsn = record.lsn
            batch.payload_bytes += len(record.payload)
            batch.add(record, message, key)
    return batch


def _one_batch(rows: int) -> dict[str, float]:
    """Fill and commit one batch in this process; figures are growth over the generated input."""
    records = _records(rows)
    decoder = Decoder(app_id=APP_ID)
    gc.collect()
    base = _status("VmRSS")
    _reset_peak()
    cpu0 = time.process_time()
    batch = _fill(records, decoder)
    cpu_fill = time.process_time() - cpu0
    figures = {
        "messages": len(records),
        "rows": batch.telemetry.rows,
        "fill_mb": (_status("VmHWM") - base) / 1e6,
        "arrow_mb": pa.total_allocated_bytes() / 1e6,
    }
    with tempfile.TemporaryDirectory(prefix="batch-memory-") as tmp:
        writer = PartitionedWriter(Path(tmp), "telemetry", schema_name="telemetry.v1")
        cpu0 = time.process_time()
        table = batch.telemetry.table()
        figures["table_mb"] = (_status("VmHWM") - base) / 1e6
        writer.write(
            table,
            first_lsn=batch.first_lsn,
            last_lsn=batch.last_lsn,
            date_column="timestamp",
            fallback_date_column="received_at",
        )
        figures["write_mb"] = (_status("VmHWM") - base) / 1e6
        del table
        keys = [(key, lsn, batch.seen_at_us[key]) for key, lsn in batch.seen.items()]
        figures["keys_mb"] = (_status("VmHWM") - base) / 1e6
        cpu_commit = time.process_time() - cpu0
    del keys
    figures["fill_cpu"] = cpu_fill / len(records) * 1e5
    figures["commit_cpu"] = cpu_commit / len(records) * 1e5
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=250_000, help="telemetry rows in the batch")
    parser.add_argument("--repeat", type=int, default=3, help="processes, one batch each")
    parser.add_argument("--code", type=Path, help="measure the ingest package of this tree")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(orjson.dumps(_one_batch(args.rows)).decode())
        return
    runs = []
    for _ in range(args.repeat):
        # One process per batch: freed memory a previous batch left with the allocators would
        # hide part of the next batch's growth.
        argv = [sys.executable, __file__, "--child", "--rows", str(args.rows)]
        env = dict(os.environ)
        if args.code:
            env["PYTHONPATH"] = str(args.code.resolve())
        done = subprocess.run(argv, check=True, capture_output=True, env=env)
        runs.append(orjson.loads(done.stdout.splitlines()[-1]))
        r = runs[-1]
        print(
            f"{r['messages']:,} messages, {r['rows']:,} rows | peak RSS growth MB: fill "
            f"{r['fill_mb']:.0f} (Arrow {r['arrow_mb']:.0f}), table() {r['table_mb']:.0f}, "
            f"write {r['write_mb']:.0f}, dedupe keys {r['keys_mb']:.0f} | CPU s per 100k "
            f"messages: fill {r['fill_cpu']:.2f}, commit {r['commit_cpu']:.2f}",
            flush=True,
        )
    if len(runs) > 1:
        mid = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(
            f"median: peak RSS growth {mid['keys_mb']:.0f} MB (fill {mid['fill_mb']:.0f}), "
            f"CPU s per 100k messages fill {mid['fill_cpu']:.2f} + commit {mid['commit_cpu']:.2f}"
        )


if __name__ == "__main__":
    main()
