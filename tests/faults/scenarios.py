"""The fault scenarios of issue 6, each a function returning an :class:`Outcome`.

Both the pytest suite (CI-sized arguments) and ``python -m tests.faults.report`` (``--full``)
call these. Each starts the real ``hm-ingest run`` process against the given mutual-TLS
Mosquitto, injects its faults while a stream is being published, lifts them, waits until every
published message is accounted for and stops the daemon with SIGTERM (exit code 0 required).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from ingest.testing import CertBundle, MosquittoBroker
from ingest.testing.accounting import rejected_copies, tally
from ingest.testing.faultpoints import CRASH_ENV, ENOSPC_ENV, POINTS
from ingest.testing.proxy import FaultyProxy
from tests.faults.harness import (
    FaultDaemon,
    Outcome,
    StreamPublisher,
    fault_config,
    finish,
    poll_until,
    wait_committed,
)
from tests.faults.hostile import hostile_corpus

# How long before a broker SIGKILL an acknowledged publish may not be on its disk yet. The test
# broker's autosave_interval is 1 s, yet Mosquitto 2.0.11 saves about every 2 s (its log says
# so), and first 2 s after a start. 3.5 s proved too short on a fully loaded CI machine (15
# acknowledged publishes lost by the broker in one run); re-sending more costs only repeats,
# which the daemon must drop anyway.
BROKER_UNSAVED_WINDOW_S = 10.0
# Peak RSS allowed while hostile payloads (up to 4 MB each) stream in: about 110 MB idle, the
# pending batch is capped by flush_bytes (8 MiB in that scenario), the broker's in-flight window
# by 20 messages; 400 MB leaves room for Arrow and Parquet buffers and fails on a leak.
RSS_LIMIT_MB = 400
# A crash point that is not reached within this long (no traffic got there) counts as missed.
CRASH_POINT_TIMEOUT_S = 20.0


# -- 1. SIGKILL at random moments and at named points ---------------------------------------------

# How the daemon reports a sink process that a crash point killed.
SINK_PROCESS_KILLED = "the sink process exited unexpectedly (exit code -9)"


def kill_schedule(kills: int, rng: random.Random) -> list[str]:
    """``kills`` ways to end a daemon's life: every named point and the two timed ones, cycled."""
    kinds = ["random", "shutdown", *POINTS]
    schedule: list[str] = []
    while len(schedule) < kills:
        batch = kinds[:]
        rng.shuffle(batch)
        schedule.extend(batch)
    return schedule[:kills]


def sigkill(
    broker: MosquittoBroker,
    certs: CertBundle,
    workdir: Path,
    *,
    kills: int,
    seed: int = 1,
    sink: str = "thread",
) -> Outcome:
    """SIGKILL the daemon ``kills`` times mid-stream, restarting it each time.

    ``random``: SIGKILL at a random moment (mid-receive, mid-write, mid-commit, wherever it
    lands); ``shutdown``: SIGTERM, then SIGKILL while draining; a point name: the daemon kills
    itself there (ingest.testing.faultpoints), the n-th time it passes, n random in 1..3.

    ``sink = "process"``: the SIGKILLs hit the daemon alone, so its sink process must exit by
    itself; the sink's points (checkpoint, parquet, sink) kill the sink process, and the daemon
    must then stop with exit 1 naming it.
    """
    rng = random.Random(seed)
    tree = fault_config(broker, certs, workdir, ingest={"sink": sink})
    daemon = FaultDaemon(tree, workdir)
    output = workdir / "data"
    publisher = StreamPublisher(broker, certs, rate=1500, seed=seed, prefix=f"k{seed}")
    startup_s: list[float] = []
    missed: list[str] = []
    crashed: list[str] = []
    # A first, clean life creates the persistent session: from then on the broker queues the
    # stream for the daemon whether it is running or not.
    daemon.start()
    daemon.wait_ready()
    assert daemon.stop_cleanly() == 0
    publisher.start()
    try:
        for kind in kill_schedule(kills, rng):
            if kind in POINTS:
                daemon.start({CRASH_ENV: f"{kind}:{rng.randint(1, 3)}"})
                try:
                    code = daemon.wait(CRASH_POINT_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    missed.append(kind)
                    daemon.kill()
                    continue
                assert code == -signal.SIGKILL or (
                    sink == "process" and code == 1 and SINK_PROCESS_KILLED in daemon.log_text()
                ), f"{kind}: exit {code}\n{daemon.log_text()[-3000:]}"
                crashed.append(kind)
                continue
            daemon.start()
            startup_s.append(daemon.wait_ready())
            time.sleep(rng.uniform(0.2, 1.5))
            if kind == "shutdown":
                daemon.signal(signal.SIGTERM)
                time.sleep(rng.uniform(0.0, 0.4))
            daemon.kill()
        daemon.start()
        startup_s.append(daemon.wait_ready())
        time.sleep(1.0)
    finally:
        publisher.stop()
    try:
        notes = f"restart to ready: max {max(startup_s):.2f} s; crashed at {len(crashed)} points"
        if missed:
            notes += f"; crash points not reached: {', '.join(missed)}"
        return finish(
            f"1. SIGKILL x{kills} (random, mid-drain, {len(POINTS)} named points)",
            daemon,
            output,
            publisher.ids,
            recovery_s=max(startup_s),
            faults=kills,
            notes=notes,
        )
    finally:
        daemon.kill()


# -- 2. Broker SIGKILL and restart ----------------------------------------------------------------


def broker_kill(
    broker: MosquittoBroker, certs: CertBundle, workdir: Path, *, kills: int, seed: int = 2
) -> Outcome:
    """SIGKILL Mosquitto mid-stream ``kills`` times and restart it on the same port.

    Mosquitto persists by periodic autosave (every second here), so a SIGKILL loses what it
    acknowledged to the publisher since then: the broker's own loss, not the daemon's. The
    publisher therefore re-sends the chunks acknowledged in the last ``BROKER_UNSAVED_WINDOW_S``
    before each kill, as an at-least-once source would; the daemon must drop the repeats.
    """
    rng = random.Random(seed)
    tree = fault_config(broker, certs, workdir)
    daemon = FaultDaemon(tree, workdir)
    output = workdir / "data"
    publisher = StreamPublisher(broker, certs, rate=1500, seed=seed, prefix=f"b{seed}")
    recoveries: list[float] = []
    resent = 0
    daemon.start()
    daemon.wait_ready()
    publisher.start()
    try:
        for _ in range(kills):
            # Kills further apart than the window, so each re-send covers one kill only.
            time.sleep(rng.uniform(4.0, 6.0))
            killed_at = time.monotonic()
            broker.kill()
            time.sleep(rng.uniform(0.3, 2.0))
            broker.start()
            lifted = time.monotonic()
            resent += publisher.requeue_acked_between(
                killed_at - BROKER_UNSAVED_WINDOW_S, killed_at
            )
            poll_until(daemon.ready, 60, "the daemon to reconnect")
            recoveries.append(time.monotonic() - lifted)
        time.sleep(1.0)
    finally:
        publisher.stop()
    try:
        return finish(
            f"2. broker SIGKILL + restart x{kills}",
            daemon,
            output,
            publisher.ids,
            recovery_s=max(recoveries),
            faults=kills,
            notes=f"{resent} messages re-sent by the publisher; "
            f"{publisher.reconnects} publisher reconnects",
        )
    finally:
        daemon.kill()


# -- 3. Network cut, reset and stall --------------------------------------------------------------


def _reconnected(daemon: FaultDaemon, before: float) -> bool:
    samples = daemon.metrics()
    drops = sum(v for k, v in samples.items() if k.startswith("hm_ingest_mqtt_reconnects_total"))
    return drops > before and samples.get("hm_ingest_mqtt_connected") == 1.0


def _drops(daemon: FaultDaemon) -> float:
    samples = daemon.metrics()
    return sum(v for k, v in samples.items() if k.startswith("hm_ingest_mqtt_reconnects_total"))


def network(
    broker: MosquittoBroker,
    certs: CertBundle,
    workdir: Path,
    *,
    rounds: int,
    keepalive_s: float = 2.0,
    seed: int = 3,
) -> Outcome:
    """Cut (FIN), reset (RST) and freeze (longer than the keepalive) the daemon's connection.

    The daemon reaches the broker through :class:`FaultyProxy`; the publisher talks to the
    broker directly. A freeze lasts ``3 * keepalive_s + 1`` seconds: both ends must notice the
    dead connection by keepalive, and new connections hang in the frozen proxy until it thaws.
    """
    rng = random.Random(seed)
    output = workdir / "data"
    freeze_s = 3 * keepalive_s + 1
    recoveries: list[float] = []
    kinds = ["drop", "reset", "freeze"] * rounds
    with FaultyProxy(broker.host, broker.port) as proxy:
        tree = fault_config(
            broker, certs, workdir, mqtt={"port": proxy.port, "keepalive_s": keepalive_s}
        )
        daemon = FaultDaemon(tree, workdir)
        publisher = StreamPublisher(broker, certs, rate=1500, seed=seed, prefix=f"n{seed}")
        daemon.start()
        daemon.wait_ready()
        publisher.start()
        try:
            for kind in kinds:
                time.sleep(rng.uniform(0.5, 1.5))
                before = _drops(daemon)
                if kind == "drop":
                    proxy.drop_all()
                elif kind == "reset":
                    proxy.reset_all()
                else:
                    proxy.freeze()
                    time.sleep(freeze_s)
                    proxy.thaw()
                lifted = time.monotonic()
                poll_until(
                    lambda b=before: _reconnected(daemon, b), 60, f"a new session after {kind}"
                )
                recoveries.append(time.monotonic() - lifted)
            time.sleep(1.0)
        finally:
            publisher.stop()
        try:
            return finish(
                f"3. network: FIN, RST, freeze {freeze_s:g} s "
                f"(keepalive {keepalive_s:g} s) x{rounds}",
                daemon,
                output,
                publisher.ids,
                recovery_s=max(recoveries),
                faults=len(kinds),
                notes=f"proxy accepted {proxy.accepted} connections",
            )
        finally:
            daemon.kill()


# -- 4. Output disk full --------------------------------------------------------------------------


def can_mount_tmpfs(probe: Path) -> bool:
    probe.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe)],
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        return False
    subprocess.run(["umount", str(probe)], check=False)
    return True


@contextlib.contextmanager
def small_filesystem(folder: Path, size: str) -> Iterator[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path) -> Path:
    """Append to ``folder/filler`` (created empty beforehand) until the filesystem is full."""
    filler = folder / "filler"
    block = b"\0" * 65536
    # Unbuffered: a buffered file would keep the bytes that did not fit and fail again on close.
    fd = os.open(filler, os.O_WRONLY | os.O_APPEND)
    try:
        while True:
            os.write(fd, block)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
    finally:
        os.close(fd)
    return filler


def disk_full(
    broker: MosquittoBroker,
    certs: CertBundle,
    workdir: Path,
    *,
    messages: int,
    log_on_full_disk: bool,
    use_tmpfs: bool,
    seed: int = 4,
) -> Outcome:
    """Fill the output disk mid-stream: acks stop, nothing is lost, it recovers by itself.

    With ``use_tmpfs`` the output folder (and, with ``log_on_full_disk``, the state folder: the
    write-ahead log, checkpoint and dedupe index) is a small tmpfs filled to the last byte; else
    Parquet writes fail with an injected ENOSPC while a flag file exists
    (``INGEST_TEST_ENOSPC_WHILE``). Space returns once the stream is fully published.
    """
    volume = workdir / "volume"
    output = volume / "data" if use_tmpfs else workdir / "data"
    state = volume / "state" if log_on_full_disk else workdir / "state"
    flag = workdir / "disk-full"
    env = {} if use_tmpfs else {ENOSPC_ENV: str(flag)}
    tree = fault_config(
        broker,
        certs,
        workdir,
        output={"path": str(output)},
        state={"path": str(state), "log_max_bytes": 1024 * 1024, "log_segment_bytes": 64 * 1024},
    )
    daemon = FaultDaemon(tree, workdir)
    publisher = StreamPublisher(
        broker, certs, rate=2000, seed=seed, prefix=f"d{seed}", limit=messages
    )
    mount = small_filesystem(volume, "16m") if use_tmpfs else contextlib.nullcontext(volume)
    with mount:
        output.mkdir(parents=True, exist_ok=True)
        state.mkdir(parents=True, exist_ok=True)
        if use_tmpfs:
            (volume / "filler").touch()  # created now, so filling it later needs no new inode
        daemon.start(env)
        daemon.wait_ready()
        try:
            publisher.start()
            # Fill the disk mid-stream, once batches are being committed: the checkpoint, the
            # dedupe index and (with the log on it) the log then all meet a full disk.
            poll_until(
                lambda: (
                    daemon.metrics().get("hm_ingest_files_committed_total{table=telemetry}", 0) >= 3
                ),
                60,
                "a few commits before the disk fills",
            )
            if use_tmpfs:
                filler = fill(volume)
            else:
                filler = flag
                flag.write_text("full")
            filled_at_acked = daemon.metrics().get("hm_ingest_messages_acked_total", 0.0)
            publisher.wait_done(300)
            # Acks must have stopped: the daemon holds back, the broker keeps the rest queued.
            poll_until(
                lambda: daemon.metrics().get("hm_ingest_backpressure_active") == 1.0,
                60,
                "back-pressure while the disk is full",
            )
            samples = daemon.metrics()
            acked = samples.get("hm_ingest_messages_acked_total", 0.0)
            failures = samples.get("hm_ingest_flush_failures_total", 0.0)
            assert acked < messages, f"acks did not stop: {acked} of {messages} acknowledged"
            if not log_on_full_disk:
                # (With the log's disk full too, nothing new reaches the sink, so no commit need
                # fail: /readyz may stay 200 and only hm_ingest_backpressure_active says so.)
                assert not daemon.ready(), "readiness must fail while the output is not writable"
            filler.unlink()
            ids = publisher.ids
            recovery = wait_committed(daemon, output, ids)
            return finish(
                "4. disk full: "
                + ("output + log" if log_on_full_disk else "output")
                + (" (tmpfs)" if use_tmpfs else " (injected ENOSPC)"),
                daemon,
                output,
                ids,
                recovery_s=recovery,
                faults=1,
                notes=f"disk filled at {filled_at_acked:.0f} acked, acks stopped at "
                f"{acked:.0f}/{messages}, {failures:.0f} failed flushes",
            )
        finally:
            publisher.stop()
            daemon.kill()


# -- 5. Torn log tail and leftover temporary files ------------------------------------------------


def torn_tail(
    broker: MosquittoBroker, certs: CertBundle, workdir: Path, *, messages: int, seed: int = 5
) -> Outcome:
    """Crash mid-Parquet-write, then mid-log-write, add debris, restart: all of it is cleaned up.

    Life 1 dies with a complete temporary Parquet file not yet renamed; life 2 dies with half a
    group of log frames written (a torn tail). Before life 3 the test appends a partial frame
    header to the last segment and drops stray temporary files into both tables.
    """
    tree = fault_config(broker, certs, workdir)
    daemon = FaultDaemon(tree, workdir)
    output = workdir / "data"
    publisher = StreamPublisher(
        broker, certs, rate=1500, seed=seed, prefix=f"t{seed}", limit=messages
    )
    daemon.start({CRASH_ENV: "parquet.temp_written:2"})
    daemon.wait_ready()
    publisher.start()
    try:
        daemon.wait(CRASH_POINT_TIMEOUT_S)
        temporaries = sorted(output.glob("*/*/.part-*.parquet.tmp"))
        assert temporaries, "the first crash left no temporary Parquet file"
        daemon.start({CRASH_ENV: "wal.torn_write:3"})
        daemon.wait(CRASH_POINT_TIMEOUT_S)
        segments = sorted((workdir / "state" / "log").glob("*.wal"))
        with segments[-1].open("ab") as f:
            f.write(b"\x17\x00\x00")  # 3 bytes of a 26-byte frame header
        for table in ("telemetry", "rejected"):
            stray = output / table / "date=2026-11-28" / f".part-{9:020d}-{99:020d}.parquet.tmp"
            stray.parent.mkdir(parents=True, exist_ok=True)
            stray.write_bytes(b"PAR1 half a file")
        daemon.start()
        recovery = daemon.wait_ready()
        publisher.wait_done(300)
    finally:
        publisher.stop()
    try:
        outcome = finish(
            "5. torn log tail + leftover temporary Parquet files",
            daemon,
            output,
            publisher.ids,
            recovery_s=recovery,
            faults=2,
        )
    finally:
        daemon.kill()
    text = daemon.log_text()
    assert "cutting torn tail" in text, text[-3000:]
    assert "temporary file(s) left by an interrupted write" in text, text[-3000:]
    assert not list(output.glob("*/*/.part-*.tmp")), "temporary files survived the restart"
    outcome.notes = f"{len(temporaries)} real + 2 stray temporary files removed; torn tail cut"
    return outcome


# -- 6. Hostile payloads --------------------------------------------------------------------------


def hostile(
    broker: MosquittoBroker,
    certs: CertBundle,
    workdir: Path,
    *,
    count: int,
    big: int,
    seed: int = 6,
) -> Outcome:
    """Publish ``count`` hostile messages (``big`` of them multi-megabyte) among valid traffic.

    Every hostile message must land in ``rejected/`` with a reason; the daemon must stay up with
    bounded memory (peak RSS reported, asserted under ``RSS_LIMIT_MB``).
    """
    corpus = hostile_corpus(count, big=big, seed=seed)
    tree = fault_config(broker, certs, workdir, output={"flush_bytes": 8 * 1024 * 1024})
    daemon = FaultDaemon(tree, workdir)
    output = workdir / "data"
    valid = StreamPublisher(
        broker, certs, rate=1500, seed=seed, prefix=f"v{seed}", limit=2000, invalid_fraction=0
    )
    daemon.start()
    daemon.wait_ready()
    baseline_kb = daemon.status_kb("VmRSS")
    hostile_pub = StreamPublisher(
        broker, certs, rate=400, chunk=20, messages=iter(corpus), prefix="h"
    )
    valid.start()
    hostile_pub.start()
    peak_kb = baseline_kb
    try:
        for pub in (hostile_pub, valid):
            deadline = time.monotonic() + 300
            while pub.running and time.monotonic() < deadline:
                peak_kb = max(peak_kb, daemon.status_kb("VmRSS"))
                time.sleep(0.1)
            pub.wait_done(1)
    finally:
        hostile_pub.stop()
        valid.stop()
    ids = hostile_pub.ids + valid.ids
    try:
        outcome = finish(
            f"6. hostile payloads x{count} ({big} multi-MB) + 2000 valid",
            daemon,
            output,
            ids,
            recovery_s=0.0,
            faults=count,
        )
        peak_kb = max(peak_kb, daemon.status_kb("VmHWM"))
    finally:
        daemon.kill()
    _, rejected_rows = rejected_copies(output)
    reasons: dict[str, str] = {str(r["message_id"]): str(r["reason"]) for r in rejected_rows}
    hostile_ids = {m.message_id for m in corpus}
    not_rejected = sorted(hostile_ids - set(reasons))
    assert not not_rejected, f"hostile messages not in rejected/: {not_rejected[:10]}"
    assert all(r["reason"] and r["detail"] for r in rejected_rows)
    by_reason: dict[str, int] = {}
    for message_id in hostile_ids:
        by_reason[reasons[message_id]] = by_reason.get(reasons[message_id], 0) + 1
    outcome.notes = (
        f"RSS {baseline_kb // 1024} MB idle, peak {peak_kb // 1024} MB; reasons "
        + ", ".join(f"{k} {v}" for k, v in sorted(by_reason.items()))
    )
    outcome.peak_rss_mb = peak_kb / 1024
    return outcome


# -- 8. Security (MQTT side) ----------------------------------------------------------------------


def refused_certificates(broker: MosquittoBroker, certs: CertBundle, workdir: Path) -> Outcome:
    """A client certificate from another CA and an expired one: exit 2, a clear line, no output."""
    cases = {
        # Start-up checks only warn (the CA file need not hold the client's issuer); the broker
        # refuses the handshake and the daemon names the certificate and the TLS alert.
        "another CA": (
            certs.other_client_cert,
            certs.other_client_key,
            ["is not signed by a CA the broker trusts", str(certs.other_client_cert)],
        ),
        # Refused by the start-up checks before any connection is tried.
        "expired": (
            certs.expired_client_cert,
            certs.expired_client_key,
            ["mqtt.cert_file", "expired on"],
        ),
    }
    lines = []
    for name, (cert, key, expected) in cases.items():
        folder = workdir / name.replace(" ", "-")
        folder.mkdir()
        tree = fault_config(
            broker,
            certs,
            folder,
            mqtt={"cert_file": str(cert), "key_file": str(key), "connect_timeout_s": 15},
        )
        daemon = FaultDaemon(tree, folder)
        daemon.start()
        try:
            code = daemon.wait(60)
        finally:
            daemon.kill()
        text = daemon.log_text()
        assert code == 2, f"{name}: exit {code}\n{text[-2000:]}"
        assert all(e in text for e in expected), f"{name}: unclear refusal:\n{text[-2000:]}"
        assert not list((folder / "data").glob("*/*/*.parquet"))
        line = next(line for line in text.splitlines() if expected[0] in line)
        lines.append(f"{name}: {line.split('ERROR', 1)[-1].strip()[:230]}")
    return Outcome(
        "8. client cert from another CA / expired",
        tally(workdir / "none", []),
        recovery_s=0.0,
        faults=len(cases),
        notes=" | ".join(lines),
    )


# -- 7. HM API faults while streaming -------------------------------------------------------------


@contextlib.contextmanager
def hm_emulator(workdir: Path, *, token_ttl_s: int) -> Iterator[dict[str, str]]:
    """``hm-ingest emulator`` as a child process; yields the JSON line it prints on start."""
    log = (workdir / "emulator.log").open("ab")
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "ingest.cli", "emulator",
            "--api-listen", "127.0.0.1:0",
            "--state-dir", str(workdir / "emulator"),
            "--token-ttl-s", str(token_ttl_s),
        ],
        stdout=subprocess.PIPE,
        stderr=log,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, f"emulator exited: {(workdir / 'emulator.log').read_text()[-2000:]}"
        yield json.loads(line)
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def _api_samples(daemon: FaultDaemon) -> dict[str, float]:
    return {k: v for k, v in daemon.metrics().items() if k.startswith("hm_ingest_")}


def _sum(samples: dict[str, float], prefix: str, label: str = "") -> float:
    return sum(v for k, v in samples.items() if k.startswith(prefix) and label in k)


# Each rule is added in turn while the stream runs; api.timeout_s is 1 s, so the delay times out.
API_FAULTS: list[tuple[str, dict[str, object]]] = [
    ("5xx", {"kind": "5xx", "status": 503, "count": 6}),
    ("429", {"kind": "429", "count": 4, "retry_after_s": 1, "retry_after_header": True}),
    ("timeout", {"kind": "delay", "delay_s": 3.0, "count": 3}),
    ("500 half the time", {"kind": "5xx", "status": 500, "fraction": 0.5}),
]


def api_faults(
    broker: MosquittoBroker, certs: CertBundle, workdir: Path, *, seed: int = 7
) -> Outcome:
    """HM's REST API fails (5xx, 429, timeouts; access tokens expire every 2 s) while the stream
    runs: the fleet control loop backs off and reports, ingestion goes on untouched."""
    with hm_emulator(workdir, token_ttl_s=2) as info:
        tree = fault_config(
            broker,
            certs,
            workdir,
            api={
                "base_url": info["base_url"],
                "client_id": info["client_id"],
                "client_secret": info["client_secret"],
                "timeout_s": 1.0,
            },
            fleet={"enabled": True, "interval_s": 0.5},
            webhook={"secret": info["webhook_secret"]},
        )
        daemon = FaultDaemon(tree, workdir)
        publisher = StreamPublisher(broker, certs, rate=1500, seed=seed, prefix=f"a{seed}")
        admin = info["admin_url"]
        daemon.start()
        daemon.wait_ready()
        publisher.start()
        recoveries: list[float] = []
        try:
            for _name, rule in API_FAULTS:
                before = _api_samples(daemon)
                httpx.post(f"{admin}/faults", json=rule, timeout=5).raise_for_status()
                time.sleep(3.0)
                during = _api_samples(daemon)
                # Ingestion went on while the API failed.
                acked = "hm_ingest_messages_acked_total"
                assert during.get(acked, 0) > before.get(acked, 0), "acks stalled during API faults"
                assert daemon.ready(), "an HM API fault made the daemon unready"
                httpx.delete(f"{admin}/faults", timeout=5).raise_for_status()
                lifted = time.monotonic()
                mark = during.get("hm_ingest_last_reconcile_timestamp_seconds", 0.0)
                poll_until(
                    lambda m=mark: (
                        _api_samples(daemon).get("hm_ingest_last_reconcile_timestamp_seconds", 0.0)
                        > m
                    ),
                    60,
                    "a complete reconcile after the fault",
                )
                recoveries.append(time.monotonic() - lifted)
        finally:
            publisher.stop()
        samples = _api_samples(daemon)
        try:
            outcome = finish(
                "7. HM API faults: 5xx, 429, timeouts, tokens expiring every 2 s",
                daemon,
                workdir / "data",
                publisher.ids,
                recovery_s=max(recoveries),
                faults=len(API_FAULTS),
            )
        finally:
            daemon.kill()
    failures = _sum(samples, "hm_ingest_api_requests_total", "status=5") + _sum(
        samples, "hm_ingest_api_requests_total", "status=429"
    )
    failures += _sum(samples, "hm_ingest_api_requests_total", "status=0")
    retries = _sum(samples, "hm_ingest_api_retries_total")
    renewals = samples.get("hm_ingest_token_renewals_total", 0.0)
    assert failures > 0, f"no failed API request was counted: {samples}"
    assert renewals >= 2, f"tokens were not renewed: {renewals}"
    text = daemon.log_text()
    assert "fleet reconcile incomplete" in text or "retry" in text.lower(), text[-3000:]
    outcome.notes = (
        f"{failures:.0f} failed API requests, {retries:.0f} retries, {renewals:.0f} token "
        f"renewals, none failed ingestion; malformed JSON responses not injected (the emulator "
        f"has no such fault)"
    )
    return outcome


def webhook_attacks(broker: MosquittoBroker, certs: CertBundle, workdir: Path) -> Outcome:
    """Forged, unsigned, oversized and replayed webhooks against the running daemon: each refused
    (or, replayed, dropped) with a log line, and only the genuine delivery acted on."""
    secret = "webhook-secret-for-tests"
    tree = fault_config(broker, certs, workdir, webhook={"secret": secret, "max_body_bytes": 4096})
    daemon = FaultDaemon(tree, workdir)
    daemon.start()
    daemon.wait_ready()
    url = daemon.base_url + "/webhook"
    body = json.dumps(
        {
            "event": {"type": "fleet_clearance_changed", "action": "revoked"},
            "vehicle": {"vin": "WHMTESTV000000001"},
        }
    ).encode()

    def sign(data: bytes, key: str = secret) -> str:
        return "sha256=" + hmac.new(key.encode(), data, hashlib.sha256).hexdigest()

    attempts = {
        "forged": (body, {"X-HM-Signature-256": sign(body, "not-the-secret")}, 401),
        "unsigned": (body, {}, 401),
        "tampered": (
            body.replace(b"revoked", b"approved"),
            {"X-HM-Signature-256": sign(body)},
            401,
        ),
        "oversized": (b"x" * 100_000, {"X-HM-Signature-256": sign(b"x" * 100_000)}, 413),
        "genuine": (body, {"X-HM-Signature-256": sign(body), "X-HM-Delivery": "d-1"}, 200),
        "replayed": (body, {"X-HM-Signature-256": sign(body), "X-HM-Delivery": "d-1"}, 200),
    }
    answers = {}
    try:
        for name, (data, headers, expected) in attempts.items():
            response = httpx.post(url, content=data, headers=headers, timeout=5)
            answers[name] = response.status_code
            assert response.status_code == expected, (name, response.status_code, response.text)
        assert daemon.stop_cleanly() == 0
    finally:
        daemon.kill()
    text = daemon.log_text()
    refusals = [line for line in text.splitlines() if "webhook refused" in line]
    assert len(refusals) == 4, refusals
    assert text.count("webhook: WHMTESTV000000001 is now") == 1, "the replay was acted on again"
    return Outcome(
        "8. webhooks: forged, unsigned, tampered, oversized, replayed",
        tally(workdir / "none", []),
        recovery_s=0.0,
        faults=len(attempts) - 1,
        notes=" / ".join(f"{k} {v}" for k, v in answers.items())
        + "; refusals logged e.g. "
        + refusals[0].split("WARNING", 1)[-1].strip()[:120],
    )
