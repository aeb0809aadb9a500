"""Telemetry rows for storage and compaction tests, on fixed past dates."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from ingest import schemas
from ingest.parquet import PartitionedWriter

DAY_MS = 86_400_000
OCT01_MS = int(datetime(2026, 10, 1, tzinfo=UTC).timestamp() * 1000)


def telemetry_rows(first: int, last: int, *, day: int = 0, per_message: int = 3) -> list[dict]:
    """``per_message`` items for each "message" ``first..last`` (one per LSN), dated Oct 1 + day."""
    rows = []
    for lsn in range(first, last + 1):
        for item in range(per_message):
            stamp = OCT01_MS + day * DAY_MS + lsn * 1000 + item
            rows.append(
                {
                    "message_id": f"m-{lsn:06d}",
                    "item_index": item,
                    "vin": f"WBA{lsn % 7:014d}",
                    "capability": "diagnostics",
                    "property": "odometer",
                    "timestamp": stamp,
                    "received_at": stamp * 1000 + 5,
                    "value_number": float(lsn * 10 + item),
                    "value_unit": "kilometers",
                    "value_string": None,
                    "value_bool": None,
                    "value_json": None,
                    "failure_reason": None,
                    "failure_description": None,
                    "availability_json": None,
                    "payload_version": 1,
                    "topic": "live/level13/app/x",
                }
            )
    return rows


def batch_columns(first: int, last: int, *, days: tuple[int, ...] = (0,)) -> dict[str, list]:
    """The columns of sink batch ``[first, last]``: its messages spread over ``days``."""
    rows: list[dict[str, Any]] = []
    for lsn in range(first, last + 1):
        rows += telemetry_rows(lsn, lsn, day=days[lsn % len(days)])
    return {
        name: [row[name] for row in rows] for name in schemas.arrow_schema("telemetry.v1").names
    }


def write_batch(writer: PartitionedWriter, first: int, last: int, *, days: tuple[int, ...] = (0,)):  # type: ignore[no-untyped-def]
    """Write sink batch ``[first, last]`` as the sink would (one file per day)."""
    return writer.write(
        batch_columns(first, last, days=days),
        first_lsn=first,
        last_lsn=last,
        date_column="timestamp",
        fallback_date_column="received_at",
    )
