"""Throughput of the dedupe index: ``python bench/dedupe_bench.py [entries]``.

Prints entries/s for ``record()`` into an empty index and into one already holding the entries,
and candidates/s for ``duplicates()`` with half the keys known. Goal: >= 100k candidates/s.
"""

from __future__ import annotations

import sys
import tempfile
import time
import uuid
from pathlib import Path

from ingest.dedupe import DedupeIndex

DEFAULT_ENTRIES = 200_000
SEEN_AT_US = 1_790_000_000_000_000


def main(entries: int) -> None:
    # Message ids are UUID strings in HM's payloads; random ones defeat any locality in the B-tree.
    keys = [str(uuid.uuid4()) for _ in range(2 * entries)]
    known = [(key, lsn, SEEN_AT_US) for lsn, key in enumerate(keys[:entries], start=1)]
    # Half the candidates are known (redeliveries at later LSNs), half are new.
    candidates = [
        (key, entries + lsn)
        for lsn, key in enumerate(keys[entries // 2 : entries // 2 + entries], start=1)
    ]
    with tempfile.TemporaryDirectory() as folder, DedupeIndex(Path(folder) / "dedupe.db") as index:
        started = time.perf_counter()
        index.record(known)
        report("record() into an empty index", entries, time.perf_counter() - started, "entries")

        started = time.perf_counter()
        found = index.duplicates(candidates)
        report(
            "duplicates(), half known", len(candidates), time.perf_counter() - started, "candidates"
        )
        assert len(found) == entries // 2, "benchmark data is wrong"

        started = time.perf_counter()
        index.record(known)
        report(
            "record() again (all keys present)", entries, time.perf_counter() - started, "entries"
        )


def report(what: str, count: int, seconds: float, unit: str) -> None:
    print(f"{what:<40} {count:>9,} {unit:<10} {seconds:7.3f} s  {count / seconds:>12,.0f} {unit}/s")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_ENTRIES)
