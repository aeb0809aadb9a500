"""The pieces of drain_bench.py: the backlog, its preload, and the three consumers it times.

Every consumer runs as its own process (the daemon with its sink process, if it runs one) so
that its CPU seconds and peak RSS are its own:
``mosquitto_sub`` (C, the machine's limit), ``bench/bare_paho.py`` (paho, auto-ack, no work) and
``hm-ingest run`` (log + fsync, ordered PUBACKs, decode, dedupe, Parquet committed).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pyarrow.parquet as pq

from ingest.dedupe import DEDUPE_FILE, DedupeIndex
from ingest.testing import CertBundle, MosquittoBroker, Publisher, publish_lines
from ingest.testing.daemon import APP_ID, DaemonProcess, daemon_config, write_toml
from ingest.testing.traffic import stream

TOPIC = f"live/level13/{APP_ID}/#"
BARE_PAHO = Path(__file__).with_name("bare_paho.py")
# A topic with at least this many messages is preloaded with `mosquitto_pub -l`.
BULK_TOPIC_MIN = 1000
# Messages per `mosquitto_pub -l` process. Past 65,535 the 16-bit packet ids wrap and mosquitto_pub
# 2.0.11 can take an early PUBACK carrying the last id for the last one and exit with messages
# still unsent (the broker then logs a bogus "disconnected due to out of memory").
PUB_PROCESS_MAX = 50_000
PAHO_CHUNK = 10_000
PRELOAD_TIMEOUT_S = 1800.0
POLL_S = 0.05
STALL_S = 90.0  # the default flush_age_s is 60 s
TREE_REFRESH_S = 1.0
DEDUPE_FILL_CHUNK = 100_000


@dataclass
class Backlog:
    """Messages grouped by topic, ready for ``mosquitto_pub -l``."""

    messages: int
    vehicles: int
    by_topic: dict[str, list[bytes]]
    raw_bytes: int


@dataclass
class Result:
    """One consumer draining one backlog."""

    name: str
    messages: int
    seconds: float
    cpu_s: float
    rss_bytes: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.messages / self.seconds

    @property
    def cpu_per_100k(self) -> float:
        return self.cpu_s / self.messages * 100_000


def make_backlog(messages: int, vehicles: int, *, random_ids: bool = True) -> Backlog:
    by_topic: dict[str, list[bytes]] = {}
    raw = 0
    for message in stream(APP_ID, messages, vehicles=vehicles, random_ids=random_ids):
        by_topic.setdefault(message.topic, []).append(message.payload)
        raw += len(message.payload)
    return Backlog(messages, vehicles, by_topic, raw)


def preload(broker: MosquittoBroker, certs: CertBundle, backlog: Backlog) -> float:
    """Publish the whole backlog and wait for the broker's PUBACKs; returns the seconds it took.

    Topics with many messages (V2's one topic per application) go through `mosquitto_pub -l`
    (C, ~145k msg/s). The thousands of per-VIN V1 topics go through a paho publisher instead:
    `mosquitto_pub` takes one topic per process and costs ~0.2 s per process here, which would
    make a 1,000-VIN backlog take minutes to load.
    """
    bulk = [t for t, payloads in backlog.by_topic.items() if len(payloads) >= BULK_TOPIC_MIN]
    rest = [t for t in backlog.by_topic if t not in set(bulk)]
    started = time.perf_counter()

    def publish_bulk() -> int:
        sent = 0
        for topic in bulk:
            payloads = backlog.by_topic[topic]
            for start in range(0, len(payloads), PUB_PROCESS_MAX):
                chunk = payloads[start : start + PUB_PROCESS_MAX]
                sent += publish_lines(
                    broker, certs, ((topic, p) for p in chunk), timeout_s=PRELOAD_TIMEOUT_S
                )
        return sent

    with ThreadPoolExecutor(1) as pool:
        bulk_sent = pool.submit(publish_bulk)
        sent = 0
        with Publisher(broker, certs, timeout_s=PRELOAD_TIMEOUT_S) as publisher:
            pairs = [(t, p) for t in rest for p in backlog.by_topic[t]]
            for start in range(0, len(pairs), PAHO_CHUNK):
                sent += publisher.publish_many(pairs[start : start + PAHO_CHUNK])
        sent += bulk_sent.result()
    assert sent == backlog.messages, (sent, backlog.messages)
    return time.perf_counter() - started


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (the sink process, with ``[ingest] sink = "process"``)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(ppid, []).append(int(entry.name))
    tree, pending = [], [pid]
    while pending:
        current = pending.pop()
        tree.append(current)
        pending.extend(parents.get(current, []))
    return tree


class WatchedTree:
    """``pid`` and its descendants, found once a second rather than at every poll.

    Finding them reads ``/proc/<pid>/stat`` of every process on the machine (~1 ms); a poll every
    50 ms that did so three times took ~6 % of a core from the 2-core machine the daemon is
    measured on, which bare paho (reporting its own figures) never paid.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._members: list[int] = []
        self._found_at = float("-inf")

    @property
    def members(self) -> list[int]:
        now = time.monotonic()
        if now - self._found_at >= TREE_REFRESH_S:
            self._members = process_tree(self.pid)
            self._found_at = now
        return self._members

    def stats(self) -> tuple[float, int]:
        """(CPU seconds, summed peak RSS bytes) of the members, from /proc."""
        return _stats(self.members)

    def pss(self) -> int:
        return _pss(self.members)


def _hwm(pid: int) -> int:
    """VmHWM of a live process (reset at exec, unlike wait4's ru_maxrss), 0 once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    for line in text.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (not its children), 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pss(members: list[int]) -> int:
    """Proportional set size of ``members``, summed: what they use together now, each shared
    page (pyarrow's libraries, mapped by the daemon and its sink process) counted once. RSS
    summed counts those pages in every process that maps them."""
    total = 0
    for member in members:
        try:
            text = Path(f"/proc/{member}/smaps_rollup").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        for line in text.splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1]) * 1024
                break
    return total


def proc_stats(pid: int) -> tuple[float, int]:
    """(CPU seconds, peak RSS bytes) of a live process and its descendants, from /proc."""
    return _stats(process_tree(pid))


def cpu_by_process(pid: int) -> dict[int, float]:
    """CPU seconds of ``pid`` and of each descendant, by pid (the daemon and its sink process)."""
    return {member: cpu_seconds(member) for member in process_tree(pid)}


def _stats(members: list[int]) -> tuple[float, int]:
    return sum(cpu_seconds(member) for member in members), sum(_hwm(member) for member in members)


def _wait_measured(
    proc: subprocess.Popen[bytes], tree: WatchedTree | None = None
) -> tuple[int, float, int]:
    """(exit status, CPU seconds, peak RSS bytes) of a child, polling its VmHWM until it ends.

    Not wait4's ru_maxrss: that counts the memory of this (forked) process before the exec.
    wait4's CPU times include the child's own children that it waited for (the daemon waits
    for its sink process).
    """
    watched = tree if tree is not None else WatchedTree(proc.pid)
    peak = 0
    while True:
        peak = max(peak, watched.stats()[1])
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage.ru_utime + usage.ru_stime, peak
        time.sleep(0.02)


# -- mosquitto_sub ------------------------------------------------------------------------------


def _sub_argv(broker: MosquittoBroker, certs: CertBundle) -> list[str]:
    binary = shutil.which("mosquitto_sub")
    if binary is None:
        raise RuntimeError("mosquitto_sub is not on PATH; apt-get install -y mosquitto-clients")
    return [
        binary,
        "-h", broker.host,
        "-p", str(broker.port),
        "--cafile", str(certs.ca_file),
        "--cert", str(certs.client_cert),
        "--key", str(certs.client_key),
        "-i", "bench-mosquitto-sub",
        "-c", "-q", "1", "-t", TOPIC,
    ]  # fmt: skip


def mosquitto_sub_session(broker: MosquittoBroker, certs: CertBundle) -> None:
    subprocess.run([*_sub_argv(broker, certs), "-E"], check=True, timeout=30)


def mosquitto_sub(broker: MosquittoBroker, certs: CertBundle, backlog: Backlog) -> Result:
    argv = [*_sub_argv(broker, certs), "-C", str(backlog.messages)]
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    code, cpu, rss = _wait_measured(proc)
    elapsed = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"mosquitto_sub exited with {code}")
    return Result("mosquitto_sub (C, auto-ack)", backlog.messages, elapsed, cpu, rss)


# -- bare paho ----------------------------------------------------------------------------------


def _paho_argv(broker: MosquittoBroker, certs: CertBundle, count: int) -> list[str]:
    return [
        sys.executable,
        str(BARE_PAHO),
        broker.host,
        str(broker.port),
        str(certs.ca_file),
        str(certs.client_cert),
        str(certs.client_key),
        TOPIC,
        str(count),
    ]


def bare_paho_session(broker: MosquittoBroker, certs: CertBundle) -> None:
    subprocess.run(_paho_argv(broker, certs, 0), check=True, timeout=60, capture_output=True)


def bare_paho(broker: MosquittoBroker, certs: CertBundle, backlog: Backlog) -> Result:
    argv = _paho_argv(broker, certs, backlog.messages)
    done = subprocess.run(argv, stdout=subprocess.PIPE, check=False, timeout=PRELOAD_TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"bare paho consumer exited with {done.returncode}: {done.stdout!r}")
    report = orjson.loads(done.stdout)
    # Its own clocks cover connect to last message, like the daemon's figures; it reports its
    # own VmHWM.
    return Result(
        "bare paho (auto-ack)", report["messages"], report["seconds"], report["cpu"], report["rss"]
    )


# -- hm-ingest run ------------------------------------------------------------------------------


class BenchDaemon:
    """``hm-ingest run`` with a persistent session on the bench broker, in ``work``."""

    def __init__(
        self,
        broker: MosquittoBroker,
        certs: CertBundle,
        work: Path,
        *,
        client_id: str = "bench-hm-ingest",
        overrides: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        work.mkdir(parents=True, exist_ok=True)
        # The product's default sink placement ("auto"), not the tests' (daemon_config pins
        # a thread); --set ingest.sink=thread|process picks one.
        merged: dict[str, dict[str, Any]] = {
            "output": {"flush_age_s": 1.0},
            "ingest": {"sink": "auto"},
        }
        for section, values in (overrides or {}).items():
            merged.setdefault(section, {}).update(values)
        self.work = work
        self.tree = daemon_config(broker, certs, work, client_id=client_id, overrides=merged)
        self.config = write_toml(self.tree, work / "bench.toml")
        self.process = DaemonProcess(self.config, work / "daemon.log")
        self.checkpoint = work / "state" / "checkpoint.json"

    @property
    def pid(self) -> int:
        assert self.process.proc is not None
        return self.process.proc.pid

    def start(self) -> None:
        self.process.start()

    def wait_subscribed(self, timeout_s: float = 60.0) -> float:
        """Poll /readyz until the session is up; returns the perf_counter time it was seen."""
        url = f"http://{self.tree['metrics']['listen']}/readyz"
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=1.0) as http:
            while time.monotonic() < deadline:
                try:
                    if http.get(url).status_code == 200:
                        return time.perf_counter()
                except httpx.HTTPError:
                    pass
                if self.process.proc is not None and self.process.proc.poll() is not None:
                    break
                time.sleep(0.01)
        raise RuntimeError(f"daemon not ready; log:\n{self.process.log_text()[-3000:]}")

    def committed_lsn(self) -> int:
        try:
            return int(orjson.loads(self.checkpoint.read_bytes())["committed_lsn"])
        except (FileNotFoundError, orjson.JSONDecodeError):
            return 0

    def stop(self) -> int:
        self.process.signal(signal.SIGTERM)
        return self.process.wait(120)

    def create_session(self) -> None:
        """First run: subscribe (the broker keeps the session), then go offline."""
        self.start()
        self.wait_subscribed()
        self.stop()

    def parquet_files(self) -> list[Path]:
        return sorted((self.work / "data").rglob("*.parquet"))


def _hm_like_id() -> str:
    # The shape of the traffic's ids (ingest.testing.traffic, random_ids): 32 upper-case hex
    # digits. UUID strings (lower-case, with dashes) sort apart from them, so a new id would
    # land among few of the prefilled ones and the index would cost less than a real one.
    return uuid.uuid4().hex.upper()


def prefill_dedupe(state_dir: Path, ids: int) -> float:
    """Put ``ids`` random HM-like message ids into a daemon's dedupe index before it first starts,
    as a daemon that has run for a while holds them (the rate times ``dedupe_retention_s``); returns
    the seconds it took. Recorded at lsn 0 and received now, so none is a replay or past
    retention, and no message of the bench's traffic shares one."""
    started = time.perf_counter()
    state_dir.mkdir(parents=True, exist_ok=True)
    now_us = time.time_ns() // 1000
    with DedupeIndex(state_dir / DEDUPE_FILE) as index:
        for start in range(0, ids, DEDUPE_FILL_CHUNK):
            count = min(DEDUPE_FILL_CHUNK, ids - start)
            index.record([(_hm_like_id(), 0, now_us) for _ in range(count)])
    return time.perf_counter() - started


def parquet_rows(files: list[Path]) -> int:
    return sum(pq.ParquetFile(p).metadata.num_rows for p in files)


def _acked(http: httpx.Client, url: str) -> int:
    """The daemon's hm_ingest_messages_acked_total, 0 while /metrics does not answer."""
    try:
        text = http.get(url).text
    except httpx.HTTPError:
        return 0
    for line in text.splitlines():
        if line.startswith("hm_ingest_messages_acked_total "):
            return int(float(line.split()[1]))
    return 0


def hm_ingest(daemon: BenchDaemon, backlog: Backlog, name: str) -> Result:
    """Drain the preloaded backlog; timed from the moment the daemon is subscribed.

    Once every message is acknowledged (so logged), the daemon gets SIGTERM and its shutdown
    commits the last batch: waiting for ``flush_age_s`` instead would add up to a minute of idle
    time (the default 60 s) to the drain. The drain ends when the process has exited with
    everything committed; CPU and peak RSS include that last commit.
    """
    started = time.perf_counter()
    daemon.start()
    connected = daemon.wait_subscribed()
    tree = WatchedTree(daemon.pid)
    cpu0, _ = tree.stats()  # start-up (imports, opening the log) is not drain work
    peak = 0
    progress = (0, time.monotonic())
    metrics = f"http://{daemon.tree['metrics']['listen']}/metrics"
    next_check = 0.0
    acked_at = 0.0
    peak_pss = 0
    with httpx.Client(timeout=2.0) as http:
        while True:
            _, peak_now = tree.stats()
            peak = max(peak, peak_now)
            peak_pss = max(peak_pss, tree.pss())
            now = time.monotonic()
            if now >= next_check:  # /metrics costs the daemon a little: 4 times a second
                next_check = now + 0.25
                acked = _acked(http, metrics)
                if acked >= backlog.messages:
                    acked_at = time.perf_counter()
                    break
                if acked != progress[0]:
                    progress = (acked, now)
                elif now - progress[1] > STALL_S:
                    daemon.process.kill()
                    raise RuntimeError(
                        f"nothing acknowledged for {STALL_S:g} s at {acked} of "
                        f"{backlog.messages} messages: did the preload lose messages? see "
                        f"{daemon.work}/daemon.log and the broker log"
                    )
            if daemon.process.proc is not None and daemon.process.proc.poll() is not None:
                raise RuntimeError(f"daemon exited; log:\n{daemon.process.log_text()[-3000:]}")
            time.sleep(POLL_S)
    daemon.process.signal(signal.SIGTERM)
    assert daemon.process.proc is not None
    code, cpu, peak_end = _wait_measured(daemon.process.proc, tree)
    done = time.perf_counter()
    committed = daemon.committed_lsn()
    if committed < backlog.messages:
        raise RuntimeError(
            f"the daemon exited with code {code} having committed {committed} of "
            f"{backlog.messages} messages; see {daemon.work}/daemon.log"
        )
    files = daemon.parquet_files()
    telemetry = [p for p in files if "telemetry" in p.parts]
    return Result(
        name,
        backlog.messages,
        done - connected,
        cpu - cpu0,
        max(peak, peak_end),
        extra={
            "startup_s": connected - started,
            "peak_pss_bytes": peak_pss,
            "acked_s": acked_at - connected,
            "exit_code": code,
            "parquet_bytes": sum(p.stat().st_size for p in files),
            "telemetry_rows": parquet_rows(telemetry),
            "rows": parquet_rows(files),
        },
    )
