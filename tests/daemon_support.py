"""Reading the daemon's output back for end-to-end accounting."""

from __future__ import annotations

import re
import signal
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds
import pyarrow.parquet as pq

from ingest.testing.daemon import DaemonProcess, wait_for

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


def assert_exactly_once(output: Path, message_ids_published: Iterable[str]) -> None:
    """Every published message id is in the output exactly once; names what is lost or doubled."""
    counts = message_ids(output)
    expected = set(message_ids_published)
    missing = expected - set(counts)
    repeated = {k: v for k, v in counts.items() if v > 1}
    assert not missing, f"{len(missing)} message(s) lost, e.g. {sorted(missing)[:5]}"
    assert not repeated, f"{len(repeated)} message(s) duplicated, e.g. {list(repeated.items())[:5]}"
    assert set(counts) == expected


def all_committed(output: Path, message_ids_published: Iterable[str]) -> bool:
    return set(message_ids(output)) >= set(message_ids_published)


def stop_once_all_committed(
    daemon: DaemonProcess, output: Path, message_ids_published: Iterable[str], timeout_s: float
) -> None:
    """Wait until every published message is committed, then SIGTERM: the daemon must exit 0."""
    expected = list(message_ids_published)
    wait_for(lambda: all_committed(output, expected), timeout_s, "every message committed")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(60) == 0, daemon.log_text()[-3000:]
