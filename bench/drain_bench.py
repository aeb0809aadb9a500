"""Side-by-side drain benchmark over mutual TLS: mosquitto_sub, bare paho, ``hm-ingest run``.

    python bench/drain_bench.py                       # 200k backlog, all three, then live mode
    python bench/drain_bench.py --repeat 3            # report the spread of three rounds
    python bench/drain_bench.py --messages 1000000 --consumers hm-ingest --no-live   # peak RSS
    python bench/drain_bench.py --no-drain --rate 5000 --live-seconds 20             # live only
    python bench/drain_bench.py --no-drain --rate 5000 --dedupe-ids 3000000   # a mature index

Drain mode: one local Mosquitto, one backlog (realistic V1 and V2 payloads across ``--vehicles``
VINs, from ingest.testing.traffic) published with ``mosquitto_pub -l`` while each consumer's
persistent session is offline; then each consumer drains it: ``mosquitto_sub`` (C, the machine's
limit), a bare paho consumer (auto-ack, no work) and ``hm-ingest run`` end to end (log + fsync,
ordered PUBACKs, decode, dedupe, Parquet committed). Each is its own process; printed: msg/s,
CPU seconds per 100k messages, peak RSS, ratios, Parquet bytes per row against raw JSON.
Live mode: the daemon under a fixed publish rate: CPU % of one core, publish-to-Parquet latency.

Not a test: figures, not assertions. The machine is shared; run it when ``uptime`` is low.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python bench/drain_bench.py`: make `bench.` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.drain_live import LiveResult, run_live
from bench.drain_support import (
    POLL_S,
    Backlog,
    BenchDaemon,
    Result,
    bare_paho,
    bare_paho_session,
    cpu_seconds,
    hm_ingest,
    make_backlog,
    mosquitto_sub,
    mosquitto_sub_session,
    prefill_dedupe,
    preload,
)
from ingest.testing import CertBundle, MosquittoBroker, make_certs

CONSUMERS = ("mosquitto_sub", "paho", "hm-ingest")


def _overrides(pairs: list[str]) -> dict[str, dict[str, Any]]:
    """``section.key=value`` settings for the daemon's TOML (numbers and booleans parsed)."""
    tree: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        name, _, text = pair.partition("=")
        section, _, key = name.partition(".")
        value: Any = text
        if text in ("true", "false"):
            value = text == "true"
        else:
            for kind in (int, float):
                try:
                    value = kind(text)
                    break
                except ValueError:
                    pass
        tree.setdefault(section, {})[key] = value
    return tree


def _drain_round(  # noqa: PLR0917 - one call site, every argument differs in kind
    broker: MosquittoBroker,
    certs: CertBundle,
    backlog: Backlog,
    work: Path,
    consumers: list[str],
    overrides: dict[str, dict[str, Any]],
    round_no: int,
) -> list[Result]:
    results = []
    assert broker.pid is not None
    for name in consumers:
        took = preload(broker, certs, backlog)
        print(f"  round {round_no}: preloaded for {name} in {took:.1f} s", flush=True)
        # The broker shares the machine's cores with the consumer: what it spends sending the
        # backlog is CPU the consumer cannot have (see _print_drain's last column).
        broker_cpu0 = cpu_seconds(broker.pid)
        if name == "mosquitto_sub":
            results.append(mosquitto_sub(broker, certs, backlog))
        elif name == "paho":
            results.append(bare_paho(broker, certs, backlog))
        else:
            daemon = BenchDaemon(broker, certs, work / f"daemon-{round_no}", overrides=overrides)
            results.append(hm_ingest(daemon, backlog, "hm-ingest run (durable)"))
        r = results[-1]
        r.extra["broker_cpu_s"] = cpu_seconds(broker.pid) - broker_cpu0
        print(f"    {r.name}: {r.rate:,.0f} msg/s, {r.cpu_per_100k:.2f} CPU s/100k", flush=True)
    return results


def _spread(values: list[float], fmt: str) -> str:
    if len(values) == 1:
        return format(values[0], fmt)
    low, mid, high = (format(v, fmt) for v in (min(values), statistics.median(values), max(values)))
    return f"{mid} ({low}-{high})"


def _print_drain(backlog: Backlog, rounds: list[list[Result]]) -> None:
    print()
    print(
        f"backlog: {backlog.messages:,} messages, {backlog.vehicles} VINs, "
        f"{len(backlog.by_topic)} topics, {backlog.raw_bytes / 1e6:.1f} MB raw JSON; "
        f"{len(rounds)} round(s): median (min-max)"
    )
    by_name: dict[str, list[Result]] = {}
    for results in rounds:
        for r in results:
            by_name.setdefault(r.name, []).append(r)
    rate = {name: statistics.median(r.rate for r in rs) for name, rs in by_name.items()}
    sub = next((v for k, v in rate.items() if k.startswith("mosquitto_sub")), None)
    paho = next((v for k, v in rate.items() if k.startswith("bare paho")), None)
    print(
        "| consumer | msg/s | CPU s per 100k | peak RSS MB | vs mosquitto_sub | vs bare paho "
        "| broker CPU s per 100k | cores busy (consumer + broker) |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    for name, rs in by_name.items():
        r_sub = f"{rate[name] / sub:.2f}" if sub else "-"
        r_paho = f"{rate[name] / paho:.2f}" if paho else "-"
        broker = [r.extra["broker_cpu_s"] / r.messages * 100_000 for r in rs]
        busy = [(r.cpu_s + r.extra["broker_cpu_s"]) / r.seconds for r in rs]
        print(
            f"| {name} | {_spread([r.rate for r in rs], ',.0f')} | "
            f"{_spread([r.cpu_per_100k for r in rs], '.2f')} | "
            f"{_spread([r.rss_bytes / 1e6 for r in rs], '.0f')} | {r_sub} | {r_paho} | "
            f"{_spread(broker, '.2f')} | {_spread(busy, '.2f')} of {os.cpu_count()} |"
        )
    for name, rs in by_name.items():
        last = rs[-1]
        if "parquet_bytes" in last.extra:
            rows = last.extra["rows"]
            parquet = last.extra["parquet_bytes"]
            print(
                f"{name}: {rows:,} rows ({last.extra['telemetry_rows']:,} telemetry); Parquet "
                f"{parquet / 1e6:.1f} MB = {parquet / rows:.1f} bytes/row against "
                f"{backlog.raw_bytes / rows:.1f} bytes/row of raw JSON "
                f"({parquet / backlog.raw_bytes:.3f} of raw); start-up before subscribed "
                f"{last.extra['startup_s']:.2f} s (not in msg/s); exit code "
                f"{last.extra['exit_code']}"
            )
            pss = [r.extra["peak_pss_bytes"] / 1e6 for r in rs]
            print(
                f"{name}: peak RSS above sums each process's peak (with a sink process, pyarrow's "
                f"shared pages count twice); their PSS together, sampled every "
                f"{POLL_S * 1000:.0f} ms until every message was acknowledged, peaked at "
                f"{_spread(pss, '.0f')} MB"
            )
            acked = [r.messages / r.extra["acked_s"] for r in rs]
            print(
                f"{name}: every message acknowledged at {_spread(acked, ',.0f')} msg/s; msg/s "
                "above runs until the shutdown (SIGTERM once all are acknowledged) has "
                "committed the last batch"
            )


def _print_live(results: list[LiveResult]) -> None:
    print()
    print(
        "| live rate msg/s | sent msg/s | received msg/s | daemon CPU % of one core (own + sink)"
        " | p50 s | p99 s | max s | peak RSS MB |\n|---|---|---|---|---|---|---|---|"
    )
    for r in results:
        print(
            f"| {r.rate_target:,} | {r.rate_sent:,.0f} | {r.rate_received:,.0f} | "
            f"{r.cpu_fraction * 100:.1f} ({r.daemon_cpu_fraction * 100:.1f} + "
            f"{(r.cpu_fraction - r.daemon_cpu_fraction) * 100:.1f}) | "
            f"{r.latency_p50_s:.2f} | {r.latency_p99_s:.2f} | {r.latency_max_s:.2f} | "
            f"{r.rss_bytes / 1e6:.0f} |"
        )
    if results:
        print(
            f"(latency = publish to Parquet file committed, with [output] flush_age_s = "
            f"{results[0].flush_age_s:g}; CPU over {results[0].seconds:.0f} s after warm-up)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--vehicles", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--consumers", default=",".join(CONSUMERS))
    parser.add_argument("--no-drain", action="store_true")
    parser.add_argument("--no-live", action="store_true")
    parser.add_argument("--rate", type=int, action="append", help="live msg/s (repeatable)")
    parser.add_argument("--live-seconds", type=float, default=20.0)
    parser.add_argument(
        "--sequential-ids",
        action="store_true",
        help="message ids in sequence (the bench's ids before 2026-11-29) instead of HM-like ones",
    )
    parser.add_argument(
        "--dedupe-ids",
        type=int,
        default=0,
        help="live mode: message ids in the dedupe index before the daemon starts (a mature one)",
    )
    parser.add_argument("--flush-age", type=float, default=1.0, help="[output] flush_age_s")
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="daemon setting"
    )
    parser.add_argument(
        "--daemon-code", type=Path, help="run the daemon from this source tree (PYTHONPATH)"
    )
    args = parser.parse_args()
    consumers = [c for c in args.consumers.split(",") if c]
    unknown = set(consumers) - set(CONSUMERS)
    if unknown:
        parser.error(f"unknown consumers {sorted(unknown)}; choose from {', '.join(CONSUMERS)}")
    overrides = _overrides(args.set)
    overrides.setdefault("output", {})["flush_age_s"] = args.flush_age
    if args.daemon_code:
        # Children only: this process has already imported its modules. `python -m` puts the
        # working folder first on sys.path, so the daemon must start from that tree as well.
        os.environ["PYTHONPATH"] = str(args.daemon_code.resolve())
        os.chdir(args.daemon_code)
    print(f"load before: {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="drain-bench-") as tmp:
        work = Path(tmp)
        certs = make_certs(work / "certs")
        queued = max(2 * args.messages, 1_000_000)
        broker_dir = work / "broker"
        with MosquittoBroker(
            broker_dir, certs, max_queued_messages=queued, autosave_interval_s=3600
        ) as broker:
            rounds: list[list[Result]] = []
            backlog = None
            if not args.no_drain:
                started = time.perf_counter()
                backlog = make_backlog(
                    args.messages, args.vehicles, random_ids=not args.sequential_ids
                )
                print(f"backlog generated in {time.perf_counter() - started:.1f} s", flush=True)
                if "mosquitto_sub" in consumers:
                    mosquitto_sub_session(broker, certs)
                if "paho" in consumers:
                    bare_paho_session(broker, certs)
                if "hm-ingest" in consumers:
                    session = BenchDaemon(broker, certs, work / "session", overrides=overrides)
                    session.create_session()
                for round_no in range(1, args.repeat + 1):
                    rounds.append(
                        _drain_round(broker, certs, backlog, work, consumers, overrides, round_no)
                    )
            live: list[LiveResult] = []
            if not args.no_live:
                for index, rate in enumerate(args.rate or [5000]):
                    daemon = BenchDaemon(
                        broker,
                        certs,
                        work / f"live-{index}",
                        client_id=f"bench-live-{index}",
                        overrides=overrides,
                    )
                    if args.dedupe_ids:
                        took = prefill_dedupe(daemon.work / "state", args.dedupe_ids)
                        print(f"dedupe index filled with {args.dedupe_ids:,} ids in {took:.0f} s")
                    live.append(
                        run_live(
                            broker,
                            certs,
                            daemon,
                            rate=rate,
                            seconds=args.live_seconds,
                            vehicles=args.vehicles,
                            flush_age_s=args.flush_age,
                            random_ids=not args.sequential_ids,
                        )
                    )
    print(f"load after: {os.getloadavg()}")
    if backlog is not None and rounds:
        _print_drain(backlog, rounds)
    _print_live(live)


if __name__ == "__main__":
    main()
