"""Reading the daemon's output back for end-to-end accounting."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds
import pyarrow.parquet as pq

_MESSAGE_ID = re.compile(rb'"message_id":\s*"([^"]+)"')


def read_table(output: Path, table: str) -> list[dict[str, Any]]:
    root = output / table
    if not root.exists():
        return []
    dataset = ds.dataset(root, format="parquet", partitioning="hive")
    return dataset.to_table().to_pylist()


def message_ids(output: Path) -> Counter[str]:
    """How often each message id appears: once per message in telemetry/ (any number of rows)
    and once per quarantined message in rejected/, counted per committed file."""
    seen: Counter[str] = Counter()
    # One message's rows may span date partitions, but all lie in one log range (one file name).
    by_range: dict[str, set[str]] = {}
    for path in sorted((output / "telemetry").glob("*/*.parquet")):
        ids = pq.read_table(path, columns=["message_id"]).column("message_id").to_pylist()
        by_range.setdefault(path.name, set()).update(ids)
    for ids in by_range.values():
        seen.update(ids)
    for row in read_table(output, "rejected"):
        message_id = row["message_id"]
        if message_id is None:
            match = _MESSAGE_ID.search(row["payload"])
            message_id = match.group(1).decode() if match else None
        if message_id is not None:
            seen[message_id] += 1
    return seen


def committed_files(output: Path) -> list[Path]:
    return sorted(output.glob("*/*/*.parquet"))
