"""Committing batches through the real pipeline (``open_pipeline``) and reading the tables back."""

from __future__ import annotations

import datetime as dt
import re
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.dataset as ds
from prometheus_client import CollectorRegistry
from pyiceberg.table import Table

from ingest.config import Settings
from ingest.iceberg.catalog import open_catalog
from ingest.metrics import Metrics
from ingest.pipeline import Pipeline, open_pipeline
from ingest.testing.daemon import APP_ID, wait_for
from ingest.testing.traffic import Message, make_vin, stream

_RANGE = re.compile(r"(\d{20})-(\d{20})\.parquet$")
# Fixed receive time: 2026-11-28 12:00 UTC, so every row's date is known.
RECEIVED_AT_US = int(dt.datetime(2026, 11, 28, 12, tzinfo=dt.UTC).timestamp() * 1_000_000)


def settings_for(tmp_path: Path, **kwargs: Any) -> Settings:
    return Settings.model_validate(settings_tree(tmp_path, **kwargs))


def settings_tree(
    tmp_path: Path,
    *,
    output: str | None = None,
    iceberg: dict[str, Any] | None = None,
    replica: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Settings as a plain tree (JSON-able, for child processes)."""
    tree: dict[str, Any] = {
        "mqtt": {"app_id": APP_ID},
        "output": {
            "path": output or str(tmp_path / "data"),
            "flush_rows": 1,  # every submitted group is one batch
            "flush_age_s": 3600.0,
        },
        "state": {"path": str(tmp_path / "state"), "durability": "write"},
        "iceberg": {"enabled": True, **(iceberg or {})},
        # commit_groups drives the sink itself, on a thread of this process.
        "ingest": {"sink": "thread"},
    }
    if replica:
        tree["replica"] = replica
    return tree


def commit_groups(
    settings: Settings,
    groups: Sequence[Sequence[Message]],
    *,
    prepare: Callable[[Pipeline], object] | None = None,
    received_at_us: int = RECEIVED_AT_US,
) -> int:
    """Open the pipeline (replaying what the last run left), log and commit each group as one
    batch, and close. Returns the committed LSN."""
    pipeline = open_pipeline(settings, Metrics(CollectorRegistry()))
    if prepare is not None:
        prepare(pipeline)
    try:
        # The sink thread as in the daemon: failures are retried until the commit lands.
        stop = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                pipeline.sink.run(stop)
            except BaseException as exc:
                failure.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        try:
            for group in groups:
                entries = [(received_at_us, m.topic, m.payload) for m in group]
                first, last = pipeline.wal.append_batch(entries)
                pipeline.sink.submit(first, entries)
                # Committed before the next group is handed over: the sink takes groups queued
                # together as one chunk, and so one batch.
                wait_for(
                    lambda: bool(failure) or pipeline.sink.committed_lsn >= last,  # noqa: B023
                    60,
                    "the commit",
                )
                if failure:
                    break
        finally:
            stop.set()
            thread.join(60)
        if failure:
            raise failure[0]
        return pipeline.sink.committed_lsn
    finally:
        pipeline.close()  # the catalog's connections too


def messages(count: int, *, seed: int = 1, prefix: str = "m", **kwargs: Any) -> list[Message]:
    return list(stream(APP_ID, count, seed=seed, prefix=prefix, **kwargs))


def untimed_message(message_id: str, seq: int = 0) -> Message:
    """A V1 message whose item has no timestamp: its row's ``timestamp`` is null."""
    vin = make_vin(seq)
    payload = {
        "version": 1,
        "message_id": message_id,
        "vin": vin,
        "capability": "diagnostics",
        "property": "odometer",
        "data": {"diagnostics": {"odometer": {"data": {"value": 1.0 + seq, "unit": "kilometers"}}}},
    }
    topic = f"live/level13/{APP_ID}/{vin}/diagnostics/get/odometer"
    return Message(topic, orjson.dumps(payload), message_id, vin, 1)


def load(settings: Settings, name: str) -> Table:
    return open_catalog(settings).load_table((settings.iceberg.namespace, name))


def plain_rows(output: Path, table: str) -> pa.Table:
    """Every row of the plain Parquet layout of ``table`` (no partition column)."""
    return ds.dataset(output / table, format="parquet", partitioning=None).to_table()


def keys(table: pa.Table, columns: Iterable[str] = ("message_id", "item_index")) -> list[tuple]:
    return sorted(zip(*(table.column(c).to_pylist() for c in columns), strict=True))


def data_files(table: Table) -> list[str]:
    return sorted(task.file.file_path for task in table.scan().plan_files())


def lsn_ranges(folder: Path) -> list[tuple[int, int]]:
    """The (first, last) LSN ranges of the part files under ``folder``, sorted."""
    found = {_RANGE.search(p.name) for p in folder.glob("*/*.parquet")}
    return sorted((int(m.group(1)), int(m.group(2))) for m in found if m is not None)


def lsn_summaries(table: Table, key: str = "hm-ingest.last-lsn") -> list[int]:
    """The ``key`` of every snapshot, oldest first."""
    # Summary["missing"] is None rather than a KeyError, so "key in summary" is always true.
    values = [s.summary.get(key) if s.summary else None for s in table.snapshots()]
    return [int(value) for value in values if value is not None]


if __name__ == "__main__":  # pragma: no cover - used by the crash tests as a child process
    # python -m tests.iceberg.support <settings.json> <groups.json>: commit, crash where
    # INGEST_TEST_CRASH_AT says.
    settings = Settings.model_validate(orjson.loads(Path(sys.argv[1]).read_bytes()))
    spec = orjson.loads(Path(sys.argv[2]).read_bytes())
    groups = [
        [
            Message(m["topic"], m["payload"].encode(), m["message_id"], m["vin"], m["items"])
            for m in group
        ]
        for group in spec
    ]
    commit_groups(settings, groups)
