"""Speed of the replicas' coordination database: ``python bench/coordination_bench.py [keys]``.

For SQLite (a temporary file) and PostgreSQL (a temporary schema in the database named by
``HM_BENCH_POSTGRES``, default ``postgresql://postgres@127.0.0.1:5432/test``; skipped, saying
why, when it does not answer) prints:

* ``record_adopted`` of ``keys`` dedupe keys (default 20,000: a large drained session) into an
  empty table and again (every key present, as when a drain is retried), then ``adopted_keys``
  and ``forget_adopted`` of them all, as a returning replica does;
* the latency of ``heartbeat`` and ``try_lead`` (median and worst of 200 calls), each one write
  transaction with the writer lock.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ingest.replica.coordination import Coordinator

DEFAULT_KEYS = 20_000
CALLS = 200
POSTGRES = os.environ.get("HM_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def main(count: int) -> None:
    keys = [str(uuid.uuid4()) for _ in range(count)]
    with tempfile.TemporaryDirectory() as folder:
        run("sqlite", f"sqlite:///{Path(folder) / 'coordination.sqlite3'}", keys)
    try:
        with postgres_schema() as url:
            run("postgresql", url, keys)
    except Exception as exc:  # any failure to reach it means: skip, say why
        print(f"postgresql: skipped, {POSTGRES} unusable: {' '.join(str(exc).split())}")


def run(backend: str, url: str, keys: list[str]) -> None:
    with (
        Coordinator.open(url, replica="leader", lease_s=60) as leader,
        Coordinator.open(url, replica="lost", lease_s=0.001) as lost,
    ):
        assert lost.try_join()
        time.sleep(0.01)  # its lease runs out
        assert leader.try_claim_drain("lost"), "benchmark setup is wrong"

        timed(
            backend,
            "record_adopted, new keys",
            len(keys),
            lambda: leader.record_adopted("lost", keys),
        )
        timed(
            backend,
            "record_adopted, all present",
            len(keys),
            lambda: leader.record_adopted("lost", keys),
        )
        loaded: list[str] = []
        timed(backend, "adopted_keys", len(keys), lambda: loaded.extend(lost.adopted_keys()))
        assert len(loaded) == len(keys), "benchmark data is wrong"
        timed(backend, "forget_adopted", len(keys), lambda: lost.forget_adopted(loaded))

        latency(backend, "heartbeat", leader.try_join, leader.heartbeat)
        latency(backend, "try_lead", None, leader.try_lead)


def timed(backend: str, what: str, count: int, call: Callable[[], object]) -> None:
    started = time.perf_counter()
    call()
    seconds = time.perf_counter() - started
    print(
        f"{backend:<11} {what:<30} {count:>7,} keys {seconds * 1000:8.1f} ms "
        f"{count / seconds:>12,.0f} keys/s"
    )


def latency(
    backend: str, what: str, setup: Callable[[], object] | None, call: Callable[[], object]
) -> None:
    if setup is not None:
        setup()
    times = []
    for _ in range(CALLS):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    print(
        f"{backend:<11} {what:<30} {CALLS:>7} calls median {statistics.median(times) * 1000:.2f} ms"
        f", worst {max(times) * 1000:.2f} ms"
    )


@contextmanager
def postgres_schema() -> Iterator[str]:
    import psycopg  # noqa: PLC0415 -- optional: only this half of the benchmark needs it

    schema = f"hm_coord_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(POSTGRES, autocommit=True, connect_timeout=3) as admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
        try:
            separator = "&" if "?" in POSTGRES else "?"
            yield f"{POSTGRES}{separator}options=-csearch_path%3D{schema}"
        finally:
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_KEYS)
