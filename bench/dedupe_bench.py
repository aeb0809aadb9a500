"""Throughput of the dedupe index.

    python bench/dedupe_bench.py [entries]
    python bench/dedupe_bench.py --growth [--sizes 0,200000,1000000,3000000] [--batch 30000]

The first form prints entries/s for ``record()`` into an empty index and into one already holding
the entries, and candidates/s for ``duplicates()`` with half the keys known.

``--growth`` measures what one committed batch costs per message as the index fills up, the way
a long-running daemon sees it: for each index size, a batch of new message ids is looked up in
chunks of one intake group (``duplicates()``) and then recorded in one transaction
(``record()``), as the sink does per commit. It prints the wall time of each (the sink's thread
waits that long) and the CPU time of the whole process per id (a store with threads of its own
counts theirs too). ``PYTHONPATH=/other/tree`` measures another source tree's index.

The index holds every id of the last ``[state] dedupe_retention_s``, so its size is the message
rate times the retention: 3,000,000 ids are 10 minutes at 5,000 msg/s, or 35 days at 1 msg/s.
``--batch`` is the ids per commit: the message rate times ``[output] flush_age_s`` when batches
close by age, at most what ``[output] flush_rows`` allows.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from pathlib import Path

from ingest.dedupe import DedupeIndex

DEFAULT_ENTRIES = 200_000
SEEN_AT_US = 1_790_000_000_000_000
# Ids per duplicates() call during --growth: about one intake group.
LOOKUP_CHUNK = 800
# Ids per transaction while filling the index to the next size (not measured).
FILL_CHUNK = 100_000
BATCHES_PER_SIZE = 3
# At least this many ids are measured per size, in as many commits as that takes.
MEASURED_IDS = 60_000


def throughput(entries: int) -> None:
    # Message ids are UUID strings in HM's payloads; random ones defeat any locality in the B-tree.
    keys = [str(uuid.uuid4()) for _ in range(2 * entries)]
    known = [(key, lsn, SEEN_AT_US) for lsn, key in enumerate(keys[:entries], start=1)]
    # Half the candidates are known (redeliveries at later LSNs), half are new.
    candidates = [
        (key, entries + lsn)
        for lsn, key in enumerate(keys[entries // 2 : entries // 2 + entries], start=1)
    ]
    with tempfile.TemporaryDirectory() as folder, DedupeIndex(Path(folder) / "dedupe") as index:
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


def _seen_at(lsn: int) -> int:
    """A receive time that grows with the lsn, 200 us apart (5,000 msg/s), as a stream's do: the
    index by age then takes each commit's ids at its end. One time for every id would spread them
    over that index at random and double the pages each commit writes."""
    return SEEN_AT_US + 200 * lsn


def growth(sizes: list[int], batch: int) -> None:
    """Per-message cost of one commit's lookups and record() at each index size."""
    print(f"batch of {batch:,} new ids per commit, looked up {LOOKUP_CHUNK} at a time")
    print(
        "| ids in the index | duplicates() us/id | record() us/id | CPU us/id (all threads) "
        "| index on disk MB |"
    )
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder, DedupeIndex(Path(folder) / "dedupe") as index:
        held = 0
        lsn = 1
        batches = max(BATCHES_PER_SIZE, -(-MEASURED_IDS // batch))
        for size in sorted(sizes):
            while held < size:
                count = min(FILL_CHUNK, size - held)
                fill = [(str(uuid.uuid4()), lsn + i, _seen_at(lsn + i)) for i in range(count)]
                index.record(fill)
                lsn += count
                held += count
            lookup_s = record_s = cpu_s = 0.0
            # The first commit after filling is not measured: it also copies the fill's last
            # (100,000-id) transaction from the WAL into the database, which SQLite does at the
            # next commit; charged to a few small batches it would swamp them.
            for number in range(batches + 1):
                ids = [(str(uuid.uuid4()), lsn + i) for i in range(batch)]
                entries = [(key, at, _seen_at(at)) for key, at in ids]
                cpu_started = time.process_time()
                started = time.perf_counter()
                for start in range(0, batch, LOOKUP_CHUNK):
                    index.duplicates(ids[start : start + LOOKUP_CHUNK])
                looked_up = time.perf_counter()
                index.record(entries)
                if number:
                    lookup_s += looked_up - started
                    record_s += time.perf_counter() - looked_up
                    cpu_s += time.process_time() - cpu_started
                lsn += batch
                held += batch
            measured = batches * batch
            disk = sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())
            disk /= 1e6
            print(
                f"| {size:,} | {lookup_s / measured * 1e6:.1f} | "
                f"{record_s / measured * 1e6:.1f} | {cpu_s / measured * 1e6:.1f} | {disk:,.0f} |",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("entries", nargs="?", type=int, default=DEFAULT_ENTRIES)
    parser.add_argument("--growth", action="store_true", help="cost per id as the index fills")
    parser.add_argument("--sizes", default="0,200000,1000000,3000000")
    parser.add_argument("--batch", type=int, default=30_000, help="new ids per commit")
    args = parser.parse_args()
    if args.growth:
        growth([int(size) for size in args.sizes.split(",")], args.batch)
    else:
        throughput(args.entries)


if __name__ == "__main__":
    main()
