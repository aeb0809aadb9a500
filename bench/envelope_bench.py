"""What deciding a V2 envelope's owner costs each replica (VIN-sharded mode under MQTT 5).

    python -m bench.envelope_bench [--messages 50000] [--members 3] [--vins 5000]

Every replica's session takes every V2 envelope and keeps its VINs' share
(:class:`ingest.replica.envelopes.EnvelopeOwnership`, on the intake thread): this times that
decision on the test stream's envelopes, under a settled rule (one member list) and under a
widened one (two lists, while a member-list change settles), and prints microseconds per
envelope and the share kept. Not a test.
"""

from __future__ import annotations

import argparse
import time

from ingest.mqtt import Delivery
from ingest.replica.envelopes import EnvelopeOwnership, EnvelopeRule
from ingest.testing.daemon import APP_ID
from ingest.testing.traffic import stream

PREFIX = f"live/level13/{APP_ID}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--vins", type=int, default=5_000)
    args = parser.parse_args(argv)
    members = [f"r{i}" for i in range(args.members)]
    lists = {1: members, 2: [*members, f"r{args.members}"]}
    envelopes = [
        m.payload
        for m in stream(APP_ID, args.messages, vehicles=args.vins, v2_fraction=1.0, seed=5)
    ]
    size = sum(len(p) for p in envelopes) / len(envelopes)
    ownership = EnvelopeOwnership(
        prefix=PREFIX,
        member_of=lambda _channel: "r0",
        member_list=lists.get,
        max_payload_bytes=1 << 20,
    )
    print(f"{len(envelopes)} V2 envelopes of {size:.0f} bytes on average, {args.vins} VINs")
    print(f"{'rule':<34} {'us/envelope':>12} {'envelopes/s':>12} {'kept':>7}")
    for label, rule in (
        (f"settled: list 1 ({args.members} members)", EnvelopeRule.of(1)),
        ("widened: lists 1 and 2 (one more)", EnvelopeRule(1, 2)),
    ):
        delivery = Delivery(1, 1, 1, 0, rule.identifier)
        keep = ownership.keep
        started = time.perf_counter()
        kept = sum(keep(PREFIX, payload, delivery) for payload in envelopes)
        elapsed = time.perf_counter() - started
        per_us = elapsed / len(envelopes) * 1e6
        print(
            f"{label:<34} {per_us:>12.2f} {len(envelopes) / elapsed:>12,.0f} "
            f"{kept / len(envelopes):>7.1%}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
