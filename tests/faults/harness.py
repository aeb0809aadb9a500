"""What every fault scenario shares: the daemon as a process, a steady publisher, metrics, results.

Scenarios run against a real mutual-TLS Mosquitto and the real ``hm-ingest run`` process, and
end by accounting for every published message in the Parquet output (ingest.testing.accounting).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from ingest.testing import CertBundle, MosquittoBroker, Publisher
from ingest.testing.accounting import Tally, tally
from ingest.testing.daemon import APP_ID, DaemonProcess, daemon_config, wait_for, write_toml
from ingest.testing.traffic import Message, stream

READY_TIMEOUT_S = 60.0


@dataclass
class Outcome:
    """One row of the report: a scenario's accounting and how long it took to recover."""

    scenario: str
    tally: Tally
    recovery_s: float  # worst time from a fault being lifted to the daemon working again
    faults: int  # faults injected
    notes: str = ""
    peak_rss_mb: float | None = None  # the daemon's, where the scenario measured it

    @property
    def ok(self) -> bool:
        return self.tally.ok


class FaultDaemon(DaemonProcess):
    """``hm-ingest run`` as a child process, with extra environment (fault points) per start."""

    def __init__(self, tree: dict[str, dict[str, Any]], workdir: Path) -> None:
        super().__init__(write_toml(tree, workdir / "daemon.toml"), workdir / "daemon.log")
        self.tree = tree
        self.starts = 0

    def start(self, env: Mapping[str, str] | None = None) -> None:  # type: ignore[override]
        log = self.log_path.open("ab")
        log.write(f"\n===== start {self.starts} env={dict(env or {})}\n".encode())
        log.flush()
        base = {k: v for k, v in os.environ.items() if not k.startswith(("HM_INGEST_", "INGEST_"))}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ingest.cli", "run", "--config", str(self.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**base, **(env or {})},
        )
        log.close()
        self.starts += 1

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def status_kb(self, key: str) -> int:
        """A ``/proc/<pid>/status`` figure in kB (VmRSS, VmHWM); 0 when the process is gone."""
        try:
            text = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return 0
        for line in text.splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        return 0

    @property
    def base_url(self) -> str:
        return f"http://{self.tree['metrics']['listen']}"

    def ready(self) -> bool:
        try:
            return httpx.get(self.base_url + "/readyz", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> float:
        """Seconds until ``/readyz`` answers 200; fails if the process dies first."""
        started = time.monotonic()

        def ready_or_dead() -> bool:
            if not self.alive:
                raise AssertionError(
                    f"daemon exited ({self.proc.returncode if self.proc else '?'})"
                    f":\n{self.log_text()[-3000:]}"
                )
            return self.ready()

        wait_for(ready_or_dead, timeout_s, "the daemon to become ready")
        return time.monotonic() - started

    def metrics(self) -> dict[str, float]:
        """Samples of ``/metrics`` by name, labelled ones as ``name{k=v,...}``; {} when down."""
        try:
            text = httpx.get(self.base_url + "/metrics", timeout=2.0).text
        except httpx.HTTPError:
            return {}
        samples: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return samples

    def stop_cleanly(self, timeout_s: float = 60.0) -> int:
        self.signal(signal.SIGTERM)
        return self.wait(timeout_s)


def fault_config(
    broker: MosquittoBroker, certs: CertBundle, workdir: Path, **overrides: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """Settings for scenarios: small batches and log segments, so every commit path runs often."""
    base: dict[str, dict[str, Any]] = {
        "output": {"flush_age_s": 0.3},
        "state": {"log_segment_bytes": 64 * 1024, "log_max_bytes": 4 * 1024 * 1024},
        "shutdown": {"deadline_s": 20.0},
    }
    for section, values in overrides.items():
        base.setdefault(section, {}).update(values)
    return daemon_config(broker, certs, workdir, overrides=base)


@dataclass
class _Chunk:
    messages: list[Message]
    sent_at: float = 0.0  # first attempt
    acked_at: float = 0.0  # every message acknowledged (perhaps after retries)


@dataclass
class StreamPublisher:
    """Publishes a steady stream of test traffic until stopped, surviving broker outages.

    Every chunk is retried until the broker acknowledges all of it, over a fresh connection when
    the broker went away (an at-least-once source, like HM's: retries may duplicate messages,
    which the daemon must drop). ``published`` lists every message sent at least once.
    """

    broker: MosquittoBroker
    certs: CertBundle
    rate: float = 1500.0  # messages per second
    chunk: int = 100
    invalid_fraction: float = 0.02
    seed: int = 1
    prefix: str = "s"
    limit: int | None = None
    messages: Iterator[Message] | None = None
    published: list[Message] = field(default_factory=list)
    reconnects: int = 0
    _chunks: list[_Chunk] = field(default_factory=list)
    _requeue: list[_Chunk] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _thread: threading.Thread | None = None
    error: BaseException | None = None

    def start(self) -> None:
        if self.messages is None:
            self.messages = stream(
                APP_ID,
                self.limit or 10**8,
                invalid_fraction=self.invalid_fraction,
                seed=self.seed,
                prefix=self.prefix,
            )
        self._thread = threading.Thread(target=self._run, name="stream-publisher", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 120.0) -> None:
        """Finish the chunk in hand (and any requeued ones), then stop."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                raise TimeoutError("publisher did not finish its last chunk")
        if self.error is not None:
            raise self.error

    def wait_done(self, timeout_s: float) -> None:
        """With ``limit``: wait until every message was published once."""
        assert self._thread is not None
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise TimeoutError(f"publisher not done after {timeout_s:g} s")
        if self.error is not None:
            raise self.error

    def requeue_acked_between(self, since: float, until: float) -> int:
        """Publish again every chunk the broker may have acknowledged in ``[since, until]``
        (monotonic): acknowledged after ``since`` and first sent before ``until``, which
        includes a chunk whose publishing straddled ``until``.

        A SIGKILLed Mosquitto loses what it acknowledged since its last autosave; HM's side
        would still have sent those. Returns the number of messages requeued.
        """
        with self._lock:
            again = [c for c in self._chunks if c.acked_at >= since and c.sent_at <= until]
            self._requeue.extend(_Chunk(c.messages) for c in again)
        return sum(len(c.messages) for c in again)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def ids(self) -> list[str]:
        return [m.message_id for m in self.published]

    def _run(self) -> None:
        publisher: Publisher | None = None
        try:
            while True:
                chunk = self._next_chunk()
                if chunk is None:
                    return
                started = time.monotonic()
                publisher = self._send(publisher, chunk)
                elapsed = time.monotonic() - started
                time.sleep(max(0.0, len(chunk.messages) / self.rate - elapsed))
        except BaseException as exc:
            self.error = exc
        finally:
            if publisher is not None:
                with contextlib.suppress(Exception):
                    publisher.close()

    def _next_chunk(self) -> _Chunk | None:
        with self._lock:
            if self._requeue:
                return self._requeue.pop(0)
        if self._stop.is_set():
            return None
        assert self.messages is not None
        batch = [m for _, m in zip(range(self.chunk), self.messages, strict=False)]
        if not batch:
            return None
        self.published.extend(batch)
        return _Chunk(batch)

    def _send(self, publisher: Publisher | None, chunk: _Chunk) -> Publisher:
        chunk.sent_at = time.monotonic()
        deadline = chunk.sent_at + 180
        while True:
            try:
                if publisher is None:
                    publisher = Publisher(self.broker, self.certs, timeout_s=5)
                    publisher.connect()
                publisher.publish_many((m.topic, m.payload) for m in chunk.messages)
            except (OSError, RuntimeError, TimeoutError):
                if time.monotonic() > deadline:
                    raise
                if publisher is not None:
                    with contextlib.suppress(Exception):
                        publisher.close()
                publisher = None
                self.reconnects += 1
                time.sleep(0.2)
                continue
            chunk.acked_at = time.monotonic()
            with self._lock:
                self._chunks.append(chunk)
            return publisher


def wait_committed(
    daemon: FaultDaemon, output: Path, ids: list[str], timeout_s: float = 120.0
) -> float:
    """Seconds until every id in ``ids`` is in the output; fails naming what is missing."""
    started = time.monotonic()
    wanted = set(ids)
    while True:
        if not daemon.alive:
            raise AssertionError(f"daemon exited:\n{daemon.log_text()[-3000:]}")
        result = tally(output, wanted)
        if result.lost == 0:
            return time.monotonic() - started
        if time.monotonic() - started > timeout_s:
            raise AssertionError(
                f"not every published message is in the output after {timeout_s:g} s: "
                f"{result.describe()}"
            )
        time.sleep(0.5)  # each look reads every Parquet file


def finish(
    scenario: str,
    daemon: FaultDaemon,
    output: Path,
    ids: list[str],
    *,
    recovery_s: float,
    faults: int,
    notes: str = "",
) -> Outcome:
    """Wait for everything to be committed, stop the daemon with SIGTERM, account."""
    wait_committed(daemon, output, ids)
    code = daemon.stop_cleanly()
    assert code == 0, f"exit code {code}:\n{daemon.log_text()[-3000:]}"
    return Outcome(scenario, tally(output, ids), recovery_s, faults, notes)


def poll_until(condition: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Seconds until ``condition`` holds (``wait_for`` that says how long it took)."""
    started = time.monotonic()
    wait_for(condition, timeout_s, what)
    return time.monotonic() - started
