"""Drain a preloaded backlog over mutual TLS: bare paho consumer vs ``hm-ingest run`` end to end.

    python bench/drain_bench.py [--messages 200000]

Both consumers face the same broker and the same backlog (published with paho
while their persistent sessions were offline). The bare consumer auto-acks and does nothing else;
the daemon logs, fsyncs, acks, decodes and commits Parquet. Prints messages/s, CPU seconds per
100k messages, peak RSS and the ratio. Not a test: figures, not assertions.
"""

from __future__ import annotations

import argparse
import os
import signal
import ssl
import tempfile
import threading
import time
from pathlib import Path

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from ingest.testing import CertBundle, MosquittoBroker, Publisher, make_certs
from ingest.testing.daemon import APP_ID, DaemonProcess, daemon_config, wait_ready, write_toml
from ingest.testing.traffic import stream

TOPIC = f"live/level13/{APP_ID}/#"


def _preload(broker: MosquittoBroker, certs: CertBundle, lines: list[tuple[str, bytes]]) -> None:
    # paho, not `mosquitto_pub -l`: the backlog spans thousands of per-VIN topics and
    # mosquitto_pub takes one topic per process.
    with Publisher(broker, certs, timeout_s=600) as publisher:
        for start in range(0, len(lines), 10_000):
            publisher.publish_many(lines[start : start + 10_000])


def _proc_stats(pid: int) -> tuple[float, int]:
    """(CPU seconds, peak RSS bytes) of a live process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    peak = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            peak = int(line.split()[1]) * 1024
    return cpu, peak


def _bare_client(broker: MosquittoBroker, certs: CertBundle, on_message: object) -> paho.Client:
    client = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id="bench-bare-paho",
        clean_session=False,
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(certs.ca_file))
    ctx.load_cert_chain(str(certs.client_cert), str(certs.client_key))
    client.tls_set_context(ctx)
    client.on_message = on_message  # type: ignore[assignment]
    return client


def bare_paho(
    broker: MosquittoBroker, certs: CertBundle, lines: list[tuple[str, bytes]]
) -> dict[str, float]:
    subscribed = threading.Event()
    client = _bare_client(broker, certs, None)
    client.on_subscribe = lambda *a: subscribed.set()
    client.connect(broker.host, broker.port)
    client.subscribe(TOPIC, qos=1)
    client.loop_start()
    subscribed.wait(10)
    client.disconnect()
    client.loop_stop()
    _preload(broker, certs, lines)

    count = 0
    done = threading.Event()
    total = len(lines)

    def on_message(_c: object, _u: object, _m: object) -> None:
        nonlocal count
        count += 1
        if count >= total:
            done.set()

    client = _bare_client(broker, certs, on_message)
    cpu0 = time.process_time()
    started = time.perf_counter()
    client.connect(broker.host, broker.port)
    client.loop_start()
    done.wait(600)
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu0
    client.disconnect()
    client.loop_stop()
    # RSS is not reported: this consumer shares its process with the benchmark's own data.
    return {"messages": count, "seconds": elapsed, "cpu": cpu, "rss": 0.0}


def daemon(
    broker: MosquittoBroker, certs: CertBundle, lines: list[tuple[str, bytes]], work: Path
) -> dict[str, float]:
    work.mkdir(parents=True, exist_ok=True)
    tree = daemon_config(broker, certs, work, overrides={"output": {"flush_age_s": 1.0}})
    config = write_toml(tree, work / "bench.toml")
    process = DaemonProcess(config, work / "daemon.log")
    process.start()  # first run: create the persistent session, then go offline
    wait_ready(tree)
    process.signal(signal.SIGTERM)
    process.wait(30)
    _preload(broker, certs, lines)

    checkpoint = work / "state" / "checkpoint.json"
    total = len(lines)
    started = time.perf_counter()
    process.start()
    assert process.proc is not None
    pid = process.proc.pid
    cpu = peak = 0.0
    while True:
        cpu, peak = _proc_stats(pid)
        committed = (
            orjson.loads(checkpoint.read_bytes())["committed_lsn"] if checkpoint.exists() else 0
        )
        if committed >= total:
            break
        time.sleep(0.05)
    elapsed = time.perf_counter() - started
    process.signal(signal.SIGTERM)
    process.wait(60)
    parquet = sum(p.stat().st_size for p in (work / "data").rglob("*.parquet"))
    return {"messages": total, "seconds": elapsed, "cpu": cpu, "rss": peak, "parquet": parquet}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--vehicles", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        certs = make_certs(work / "certs")
        lines = [
            (m.topic, m.payload) for m in stream(APP_ID, args.messages, vehicles=args.vehicles)
        ]
        raw = sum(len(p) for _, p in lines)
        with MosquittoBroker(work / "broker", certs) as broker:
            bare = bare_paho(broker, certs, lines)
            full = daemon(broker, certs, lines, work / "daemon")
    print(f"backlog: {args.messages} messages, {args.vehicles} VINs, {raw / 1e6:.1f} MB raw JSON")
    print(f"{'consumer':<28}{'msg/s':>10}{'CPU s/100k':>12}{'peak RSS MB':>13}")
    for name, result in (("bare paho (auto-ack)", bare), ("hm-ingest run (durable)", full)):
        rate = result["messages"] / result["seconds"]
        cpu = result["cpu"] / result["messages"] * 100_000
        rss = f"{result['rss'] / 1e6:.0f}" if result["rss"] else "-"
        print(f"{name:<28}{rate:>10.0f}{cpu:>12.2f}{rss:>13}")
    ratio = (full["messages"] / full["seconds"]) / (bare["messages"] / bare["seconds"])
    print(f"ratio hm-ingest / bare paho: {ratio:.2f}")
    print(
        f"Parquet bytes: {full['parquet'] / 1e6:.1f} MB ({full['parquet'] / raw:.3f} of raw JSON)"
    )


if __name__ == "__main__":
    main()
