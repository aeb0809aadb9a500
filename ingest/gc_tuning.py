"""Garbage-collector settings for the daemon's processes (``hm-ingest run`` and its sink process).

Every message allocates container objects: orjson's dicts and lists, the row tuples, the log
records. With CPython's default thresholds ``(700, 10, 10)`` a young collection runs every 700 of
them, and the rows a batch holds until it seals them into Arrow survive into the older
generations, whose collections then walk them again and again. In the sink that was 11-15 % of
its thread's samples (py-spy). A young collection every 100,000 allocations, and the objects from
start-up (modules, pyarrow, settings) moved out of the collector's sight with ``gc.freeze()``,
raised the drain from 11,421-14,324 to 16,147-17,762 msg/s on the same machine
(``bench/drain_bench.py``, sink process, two rounds each).

Memory stays bounded: objects without reference cycles (nearly everything here) are freed by
reference counting the moment they are dropped, whatever the thresholds; only cyclic garbage waits
longer, for a young collection at most 100,000 allocations later (milliseconds at full rate).
"""

from __future__ import annotations

import gc

# Allocations between young collections; young collections per middle one; middle per full one.
THRESHOLDS = (100_000, 50, 100)


def tune() -> None:
    """Call once start-up has imported everything: ``freeze`` keeps what exists now out of every
    later collection."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
