"""Running the real daemon against a store: settings with an output URI, metrics, accounting."""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from ingest.app import Daemon
from ingest.config import Settings
from ingest.storage import OutputStore
from ingest.testing.traffic import Message

_MESSAGE_ID = re.compile(rb'"message_id":\s*"([^"]+)"')


def s3_settings(
    tree: dict[str, dict[str, Any]], uri: str, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    tree["output"]["path"] = uri
    return Settings.model_validate(tree)


def scrape(daemon: Daemon, name: str) -> float:
    for metric in daemon.metrics.registry.collect():
        for sample in metric.samples:
            if sample.name == name and not sample.labels:
                return float(sample.value)
    raise AssertionError(f"metric {name} not found")


async def run_until(daemon: Daemon, scenario: Callable[[], None], timeout_s: float) -> int:
    task = asyncio.create_task(daemon.run())
    try:
        async with asyncio.timeout(timeout_s):
            await daemon.started.wait()
            await asyncio.to_thread(scenario)
    finally:
        daemon.shutdown.set()
    return await asyncio.wait_for(task, 60)


def table_of(store: OutputStore, table: str, columns: list[str]) -> pa.Table:
    """Every file of ``table`` as a plain listing-based reader sees it."""
    files = [f.path for f in store.list_files(store.join(table)) if f.name.endswith(".parquet")]
    return ds.dataset(files, filesystem=store.filesystem, format="parquet").to_table(columns)


def assert_exactly_once(store: OutputStore, messages: list[Message]) -> None:
    """Every item of every valid message once in telemetry, every invalid message once in
    rejected, nothing else."""
    telemetry = table_of(store, "telemetry", ["message_id", "item_index"])
    items = Counter(
        zip(telemetry.column(0).to_pylist(), telemetry.column(1).to_pylist(), strict=True)
    )
    assert max(items.values()) == 1, "an item was written twice"
    assert set(items) == {(m.message_id, i) for m in messages for i in range(m.items)}
    invalid = {m.message_id for m in messages if m.items == 0}
    rejected: Counter[str] = Counter()
    if invalid:
        payloads = table_of(store, "rejected", ["payload"]).column(0)
        for payload in payloads.to_pylist():
            match = _MESSAGE_ID.search(payload)
            assert match is not None
            rejected[match.group(1).decode()] += 1
    assert set(rejected) == invalid
    assert max(rejected.values(), default=1) == 1


def telemetry_rows_written(daemon: Daemon) -> float:
    for metric in daemon.metrics.registry.collect():
        for sample in metric.samples:
            if sample.name == "hm_ingest_rows_written_total" and sample.labels == {
                "table": "telemetry"
            }:
                return float(sample.value)
    return 0.0
