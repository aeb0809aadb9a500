"""Several replicas sharing one stream: exactly once, spread, and the take-over of a lost one.

    python -m bench.replicas_bench [--replicas 3] [--messages 30000] [--vins 5000]
                                   [--rate 1500] [--kill follower|leader|follower-logged-unacked]
                                   [--lease-s 4] [--heartbeat-s 1] [--mode shared|vin]
                                   [--protocol 3.1.1|5]
                                   [--scenario takeover|host-shutdown|resize|resize-r3-first|
                                               shrink]

Starts a mutual-TLS Mosquitto, N ``hm-ingest run`` replicas (one SQLite coordination file, one
output folder), publishes ``--messages`` across ``--vins`` VINs at ``--rate``, SIGKILLs one replica
a third of the way in, and restarts it once another has taken over its session. Prints one table:
messages lost and duplicated across all outputs, the per-replica share of the messages published
before the kill, the take-over time and the rejoin time.

``--mode shared`` (default): one shared subscription; take-over is SIGKILL to the adopted session
deleted on the broker. ``--mode vin``: per-VIN subscriptions by a hash over the members, the VINs
cleared at the HM emulator through the fleet file first (2 % of the stream are V2 envelopes on the
application's topic); take-over is SIGKILL to the leader hosting the session, and the table adds
the time the fleet took to be approved and subscribed, the restart-to-release time, and messages
written by a replica that does not own their VIN. ``--protocol 5`` (vin mode): half the stream
are V2 envelopes, which every replica's session takes and keeps by VIN (their owner is their
VIN's). Not part of the test suite; the same scenarios
at a fixed size are ``tests/replica/test_replicas_daemon.py`` and
``tests/replica/test_vin_replicas.py``.

``--scenario host-shutdown|resize|resize-r3-first|shrink`` runs a scenario of
``ingest.testing.vin_scenarios`` instead (vin mode, 3 replicas, 4 for the shrink to 3, ``--vins``,
``--rate``, the lease options, ``--protocol``; the stream lasts as long as the scenario) and prints
its figures phase by phase: ``tests/replica/test_vin_handovers.py`` at other sizes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from ingest.argtypes import positive
from ingest.testing.broker import MosquittoBroker
from ingest.testing.certs import make_certs
from ingest.testing.replicas import ReplicaGroup, TakeoverReport, run_takeover
from ingest.testing.vin_scenarios import (
    HostShutdownReport,
    ResizeReport,
    describe_phases,
    run_host_shutdown,
    run_resize,
    run_shrink,
)


def _table(report: TakeoverReport, lease_s: float) -> str:
    adopted = str(report.adopted_messages)
    rows = [
        ("mode", report.mode),
        ("replicas", str(report.replicas)),
        ("VINs / messages", f"{report.vins} / {report.published}"),
        ("publish rate", f"{report.publish_rate:,.0f} msg/s"),
        ("killed", f"{report.killed} ({report.killed_role})"),
        ("lost / duplicated", f"{report.tally.lost} / {report.tally.duplicated}"),
        ("telemetry rows", f"{report.tally.rows_written}"),
        (
            "share before the kill",
            ", ".join(f"{k} {v}" for k, v in sorted(report.spread.items()))
            + f" (max/min {report.spread_ratio:.3f})",
        ),
        ("take-over", f"{report.takeover_s:.1f} s (lease {lease_s:g} s)"),
        # vin mode: the killed replica's messages its session's host wrote
        ("messages hosted" if report.mode == "vin" else "messages adopted", adopted),
        ("rejoin (restart to ready)", f"{report.rejoin_s:.1f} s"),
    ]
    if report.mode == "vin":
        rows += _vin_rows(report)
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _vin_rows(report: TakeoverReport) -> list[tuple[str, str]]:
    """What vin mode adds to the table."""
    expected = ", ".join(f"{k} {v}" for k, v in sorted(report.expected_spread.items()))
    return [
        ("share its owners predict", expected),
        ("rejoin (restart to released)", f"{report.release_s or 0:.1f} s"),
        ("written by a non-owner", str(report.misrouted)),
        ("fleet approved and subscribed", f"{report.fleet_ready_s or 0:.1f} s after start"),
    ]


SCENARIO_REPLICAS = {"host-shutdown": 3, "resize": 3, "resize-r3-first": 3, "shrink": 4}


def _run_scenario(scenario: str, group: ReplicaGroup, vins: int, rate: float) -> int:
    """One of ingest.testing.vin_scenarios; prints its report, 0 when nothing was lost."""
    report: HostShutdownReport | ResizeReport
    if scenario == "host-shutdown":
        report = run_host_shutdown(group, vins=vins, rate=rate)
    elif scenario == "shrink":
        report = run_shrink(group, vins=vins, rate=rate)
    else:
        first = scenario == "resize-r3-first"
        report = run_resize(group, vins=vins, rate=rate, new_member_first=first)
    for name, value in vars(report).items():
        if name != "phases":
            print(f"{name:<32}  {value}")
    print(describe_phases(report.phases))
    return 0 if report.tally.lost == 0 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, choices=range(2, 10), default=3)
    parser.add_argument("--messages", type=int, default=30_000)
    parser.add_argument("--vins", type=int, default=5_000)
    parser.add_argument("--rate", type=positive("messages per second"), default=1_500.0)
    parser.add_argument(
        "--kill", choices=["follower", "leader", "follower-logged-unacked"], default="follower"
    )
    parser.add_argument("--lease-s", type=positive("seconds"), default=4.0)
    parser.add_argument("--heartbeat-s", type=positive("seconds"), default=1.0)
    parser.add_argument("--client", choices=["auto", "paho", "native"], default="auto")
    parser.add_argument("--mode", choices=["shared", "vin"], default="shared")
    parser.add_argument("--protocol", choices=["3.1.1", "5"], default="3.1.1")
    parser.add_argument(
        "--scenario",
        choices=["takeover", "host-shutdown", "resize", "resize-r3-first", "shrink"],
        default="takeover",
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="replicas-bench-") as folder:
        root = Path(folder)
        certs = make_certs(root / "certs")
        broker = MosquittoBroker(root / "broker", certs)
        broker.start()
        group = ReplicaGroup(
            broker,
            certs,
            root / "run",
            # The scenarios of ingest.testing.vin_scenarios are written for r0, r1 and r2 (and
            # r3, which the shrink removes).
            count=args.replicas
            if args.scenario == "takeover"
            else SCENARIO_REPLICAS[args.scenario],
            lease_s=args.lease_s,
            heartbeat_s=args.heartbeat_s,
            client=args.client,
            mode="vin" if args.scenario != "takeover" else args.mode,
            protocol=args.protocol,
        )
        try:
            if args.scenario != "takeover":
                return _run_scenario(args.scenario, group, args.vins, args.rate)
            report = run_takeover(
                group,
                messages=args.messages,
                vins=args.vins,
                rate=args.rate,
                kill=args.kill,
                progress=lambda line: print(f"... {line}", file=sys.stderr),
            )
        finally:
            group.kill_all()
            broker.stop()
    print(_table(report, args.lease_s))
    return 0 if report.tally.ok and report.misrouted == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
