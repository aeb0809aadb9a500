"""Live mode of drain_bench.py: publish at a fixed rate, measure the daemon's CPU and latency.

The publisher is a paho client in the bench process, pacing QoS 1 publishes in 10 ms ticks and
noting when each message id went out. Latency is publish time to the modification time of the
Parquet file that holds the message's rows (written, fsynced, renamed into place), so it includes
the batching delay of ``[output] flush_age_s``.

paho keys its unacknowledged publishes by packet id, of which there are 65,535: a publisher that
falls further behind than that overwrites queued messages and never sends them. So the client's
queue is capped (MAX_QUEUED); a publish it refuses waits for the next tick, and the table reports
the rate the daemon actually received in the measured window beside the one asked for, so a run
whose publisher (or broker) could not keep the pace shows it.
"""

from __future__ import annotations

import ssl
import threading
import time
from dataclasses import dataclass

import httpx
import paho.mqtt.client as paho
import pyarrow.parquet as pq
from paho.mqtt.enums import CallbackAPIVersion

from bench.drain_support import BenchDaemon, cpu_by_process, proc_stats
from ingest.testing import CertBundle, MosquittoBroker
from ingest.testing.daemon import APP_ID
from ingest.testing.traffic import stream

# The publisher sends what is due every TICK_S: 5 messages per tick at 5,000 msg/s, close to a
# fleet's messages spread over time. Until 2026-11-30 it was 10 ms (bursts of 50), which let
# the daemon log and acknowledge each burst as one group and measured less CPU than an even
# stream costs.
TICK_S = 0.001
WARMUP_S = 2.0
# Publishes paho may hold unacknowledged: well under its 65,535 packet ids (see above).
MAX_QUEUED = 20_000


@dataclass
class LiveResult:
    rate_target: int
    rate_sent: float
    rate_received: float  # by the daemon, over the measured window
    seconds: float
    cpu_fraction: float  # of one core, over the measured window
    daemon_cpu_fraction: float  # its own process (receive, log, acks); the rest: the sink's
    latency_p50_s: float
    latency_p99_s: float
    latency_max_s: float
    messages: int
    flush_age_s: float
    rss_bytes: int


def _publisher(broker: MosquittoBroker, certs: CertBundle) -> paho.Client:
    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="bench-live")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(certs.ca_file))
    ctx.load_cert_chain(str(certs.client_cert), str(certs.client_key))
    client.tls_set_context(ctx)
    client.max_inflight_messages_set(2000)
    client.max_queued_messages_set(MAX_QUEUED)
    connected = threading.Event()
    client.on_connect = lambda *a: connected.set()
    client.connect(broker.host, broker.port)
    client.loop_start()
    if not connected.wait(10):
        raise RuntimeError("live publisher could not connect")
    return client


def _received(http: httpx.Client, url: str) -> int:
    """The daemon's hm_ingest_messages_received_total."""
    for line in http.get(url).text.splitlines():
        if line.startswith("hm_ingest_messages_received_total "):
            return int(float(line.split()[1]))
    raise RuntimeError(f"{url} has no hm_ingest_messages_received_total")


def _percentile(sorted_values: list[float], fraction: float) -> float:
    index = min(len(sorted_values) - 1, round(fraction * (len(sorted_values) - 1)))
    return sorted_values[index]


def run_live(
    broker: MosquittoBroker,
    certs: CertBundle,
    daemon: BenchDaemon,
    *,
    rate: int,
    seconds: float,
    vehicles: int,
    flush_age_s: float,
    random_ids: bool = True,
) -> LiveResult:
    total = int(rate * (seconds + WARMUP_S))
    # Made before the daemon starts (13 us each: not in the measured window), as plain tuples:
    # 1.5M Message objects (a 300 s run) took 7 GB.
    messages = iter(
        [
            (m.topic, m.payload, m.message_id)
            for m in stream(APP_ID, total, vehicles=vehicles, prefix="live", random_ids=random_ids)
        ]
    )
    sent_at: dict[str, float] = {}
    daemon.start()
    daemon.wait_subscribed()
    client = _publisher(broker, certs)
    metrics_url = f"http://{daemon.tree['metrics']['listen']}/metrics"
    http = httpx.Client(timeout=2.0)
    started = time.perf_counter()
    wall0 = time.time()
    sent = 0
    held: tuple[str, bytes, str] | None = None  # refused by a full client queue: next tick
    window_start: float | None = None
    cpu_start: dict[int, float] = {}
    received_start = 0
    while sent < total:
        now = time.perf_counter()
        if window_start is None and now - started >= WARMUP_S:
            window_start = now
            cpu_start = cpu_by_process(daemon.pid)
            received_start = _received(http, metrics_url)
        due = min(total, int((now - started) * rate))
        stamp = wall0 + (now - started)
        while sent < due:
            message = held if held is not None else next(messages)
            topic, payload, message_id = message
            info = client.publish(topic, payload, qos=1)
            if info.rc == paho.MQTT_ERR_QUEUE_SIZE:
                held = message
                break
            held = None
            sent_at[message_id] = stamp
            sent += 1
        time.sleep(TICK_S)
    ended = time.perf_counter()
    cpu_end = cpu_by_process(daemon.pid)
    received_end = _received(http, metrics_url)
    assert window_start is not None
    measured = ended - window_start
    while daemon.committed_lsn() < total:
        time.sleep(0.05)
    _, peak = proc_stats(daemon.pid)
    http.close()
    client.disconnect()
    client.loop_stop()
    daemon.stop()
    latencies: list[float] = []
    for path in daemon.parquet_files():
        committed = path.stat().st_mtime
        ids = pq.read_table(path, columns=["message_id"]).column("message_id").to_pylist()
        for message_id in set(ids):
            if message_id in sent_at:
                latencies.append(committed - sent_at[message_id])
    latencies.sort()
    return LiveResult(
        rate_target=rate,
        rate_sent=total / (ended - started),
        rate_received=(received_end - received_start) / measured,
        seconds=measured,
        cpu_fraction=sum(cpu_end[p] - cpu_start.get(p, 0.0) for p in cpu_end) / measured,
        daemon_cpu_fraction=(cpu_end[daemon.pid] - cpu_start[daemon.pid]) / measured,
        latency_p50_s=_percentile(latencies, 0.5),
        latency_p99_s=_percentile(latencies, 0.99),
        latency_max_s=latencies[-1],
        messages=len(latencies),
        flush_age_s=flush_age_s,
        rss_bytes=peak,
    )
