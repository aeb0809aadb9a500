"""Account for every published message in the daemon's Parquet output: lost and duplicated.

A message counts as *written* when rows with its ``message_id`` are in ``telemetry/`` and as
*quarantined* when a row for it is in ``rejected/`` (the id from the ``message_id`` column, or
read from the raw payload when the decoder could not parse one). Then::

    lost        = published - (written | quarantined)     (as sets of message ids)
    duplicated  = copies beyond one per message (a message in two committed batches, in both
                  tables, twice in ``rejected/``) plus telemetry rows (message_id, item_index)
                  repeated within one batch

One message's telemetry rows may span date partitions, but they all belong to one log range, so
the files of one range (``part-<first>-<last>.parquet`` in any partition) count as one copy.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

_MESSAGE_ID = re.compile(rb'"message_id"\s*:\s*"([^"\\]{1,200})"')


@dataclass(frozen=True, slots=True)
class Tally:
    published: int
    rows_written: int  # telemetry rows
    messages_written: int  # distinct published messages with telemetry rows
    quarantined: int  # rejected rows
    lost: int
    duplicated: int
    lost_examples: tuple[str, ...] = ()
    duplicated_examples: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.duplicated == 0

    def describe(self) -> str:
        return (
            f"published {self.published}, telemetry rows {self.rows_written} "
            f"({self.messages_written} messages), quarantined {self.quarantined}, "
            f"lost {self.lost} {list(self.lost_examples)}, "
            f"duplicated {self.duplicated} {list(self.duplicated_examples)}"
        )


def payload_message_id(payload: bytes) -> str | None:
    """The ``message_id`` string written in a raw payload, if one can be found by pattern."""
    match = _MESSAGE_ID.search(payload)
    return match.group(1).decode("ascii", "replace") if match else None


def _parquet_files(output: Path, table: str) -> list[Path]:
    return sorted((output / table).glob("*/*.parquet"))


def telemetry_copies(output: Path) -> tuple[Counter[str], int, int]:
    """(copies per message id, rows, duplicated rows) of ``telemetry/``."""
    # Per log range (file name): the message ids in it, and how often each row key occurs.
    ranges: dict[str, Counter[tuple[str, int]]] = {}
    rows = 0
    for path in _parquet_files(output, "telemetry"):
        table = pq.read_table(path, columns=["message_id", "item_index"])
        ids = table.column("message_id").to_pylist()
        items = table.column("item_index").to_pylist()
        rows += table.num_rows
        ranges.setdefault(path.name, Counter()).update(zip(ids, items, strict=True))
    copies: Counter[str] = Counter()
    duplicated_rows = 0
    for row_keys in ranges.values():
        copies.update({message_id for message_id, _ in row_keys})
        # A row written twice within one range (copies across ranges are counted per message).
        duplicated_rows += sum(n - 1 for n in row_keys.values() if n > 1)
    return copies, rows, duplicated_rows


def rejected_copies(output: Path) -> tuple[Counter[str], list[dict[str, object]]]:
    """(copies per message id, every rejected row without its payload) of ``rejected/``."""
    copies: Counter[str] = Counter()
    rows: list[dict[str, object]] = []
    for path in _parquet_files(output, "rejected"):
        table = pq.read_table(path, columns=["message_id", "topic", "reason", "detail", "payload"])
        for row in table.to_pylist():
            payload = row.pop("payload")
            message_id = row["message_id"] or payload_message_id(payload)
            row["message_id"] = message_id
            row["payload_bytes"] = len(payload)
            rows.append(row)
            if message_id is not None:
                copies[message_id] += 1
    return copies, rows


def tally(output: Path, published: Iterable[str]) -> Tally:
    """Compare the published message ids with what ``output`` holds."""
    expected = set(published)
    written, rows, duplicated_rows = telemetry_copies(output)
    quarantined, rejected_rows = rejected_copies(output)
    seen = written + quarantined
    lost = sorted(expected - set(seen))
    extra = {key: n - 1 for key, n in seen.items() if n > 1}
    return Tally(
        published=len(expected),
        rows_written=rows,
        messages_written=len(expected & set(written)),
        quarantined=len(rejected_rows),
        lost=len(lost),
        duplicated=sum(extra.values()) + duplicated_rows,
        lost_examples=tuple(lost[:5]),
        duplicated_examples=tuple(sorted(extra)[:5]),
    )
