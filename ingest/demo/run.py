"""The demo's sequence: broker → emulator (paused) → daemon → stream → progress → drain → report.

The stream starts paused and is resumed only once the daemon is subscribed, so its persistent
session exists before the first message: nothing published can miss it, which is what lets the
end of the run compare the output with the stream's counters exactly. Approved-but-not-yet-
subscribed never loses data either way: the broker queues for the daemon's session.

Ctrl-C and SIGTERM end the run early; everything started is stopped in ``finally`` with SIGINT and
SIGTERM ignored meanwhile, so a second Ctrl-C cannot abandon a child (each stop is time-bounded);
the summary is printed either way, from whatever reached the Parquet files.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

from ingest.demo import report, workdir
from ingest.demo.emulator import EmulatorError, EmulatorProcess
from ingest.demo.fleet import sample_fleet, write_fleet
from ingest.demo.metrics import Figures, scrape
from ingest.testing.broker import MosquittoBroker, find_mosquitto
from ingest.testing.certs import make_certs
from ingest.testing.daemon import APP_ID, DaemonProcess, daemon_config, write_toml

CLIENT_ID = "hm-ingest-demo"
DECISION_DELAY_S = 2.0  # pending → approved/rejected in the emulator
FLEET_INTERVAL_S = 5.0  # the daemon's reconcile period: statuses show up within seconds
FLUSH_AGE_S = 2.0  # the daemon commits Parquet at least this often
PROGRESS_EVERY_S = 2.0
POLL_S = 0.2
READY_TIMEOUT_S = 30.0
# After the stream pauses: time for the daemon to receive, log and commit what is in flight.
DRAIN_TIMEOUT_S = 30.0
# The daemon's own drain deadline (shutdown.deadline_s, 20 s in daemon_config) plus a margin.
STOP_TIMEOUT_S = 40.0
MIN_QUEUED_MESSAGES = 10_000
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


@dataclass(frozen=True)
class Options:
    duration_s: float = 60.0
    output: Path = Path("demo-data")
    vehicles: int = 8
    vehicle_rate: float = 5.0  # messages/s per approved vehicle
    bad_rate: float = 0.01  # share of publishes damaged on purpose, for the quarantine
    malformed_rate: float = 0.005  # share that is not JSON at all (quarantined as such)
    seed: int = 1


class DemoError(Exception):
    """A part of the demo failed; the message says which and shows its log."""


class Stopped(Exception):
    """SIGTERM arrived: end the run like Ctrl-C does."""


def _on_sigterm(_signum: int, _frame: FrameType | None) -> None:
    raise Stopped


def queue_size(options: Options) -> int:
    """Mosquitto's max_queued_messages: twice what the whole run can publish (its default of 1000
    drops messages silently once exceeded, hm-reference.md section 6)."""
    planned = options.vehicle_rate * options.vehicles * options.duration_s
    return max(MIN_QUEUED_MESSAGES, int(2 * planned))


def _tail(path: Path, lines: int = 20) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def _stop_daemon(daemon: DaemonProcess) -> int | None:
    """SIGTERM (the daemon drains and commits), SIGKILL if it overstays; its exit code."""
    proc = daemon.proc
    if proc is None:
        return None
    if proc.poll() is None:
        daemon.signal(signal.SIGTERM)
        try:
            return daemon.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            print(f"daemon still running after {STOP_TIMEOUT_S:g} s; killing it", file=sys.stderr)
            daemon.kill()
    return proc.returncode


class Progress:
    """One line every PROGRESS_EVERY_S: rows/s, clearance statuses, quarantine, repeats."""

    def __init__(self, started: float) -> None:
        self.started = started
        self._last_at = started
        self._last_rows = 0
        self.next_at = started + PROGRESS_EVERY_S

    def line(self, now: float, figures: Figures, published: int | None) -> str:
        rate = (figures.telemetry_rows - self._last_rows) / max(now - self._last_at, 1e-9)
        self._last_at, self._last_rows = now, figures.telemetry_rows
        self.next_at = now + PROGRESS_EVERY_S
        clearance = ", ".join(f"{n} {s}" for s, n in sorted(figures.clearance.items())) or "-"
        sent = "-" if published is None else str(published)
        return (
            f"[{now - self.started:5.1f} s] {rate:7.0f} rows/s  {figures.telemetry_rows:>8} rows  "
            f"published {sent:>6}  clearance: {clearance}  "
            f"quarantined {figures.quarantined_total}  repeats dropped {figures.duplicates}"
        )


def _wait_ready(daemon: DaemonProcess, url: str) -> None:
    """Until ``/readyz`` answers 200 (connected and subscribed); fail fast if the daemon exits."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        code = daemon.proc.poll() if daemon.proc is not None else None
        if code is not None or time.monotonic() > deadline:
            what = f"exited with code {code}" if code is not None else "did not become ready"
            raise DemoError(
                f"the daemon {what}; last lines of {daemon.log_path}:\n{_tail(daemon.log_path)}"
            )
        time.sleep(POLL_S)


def _published(emulator: EmulatorProcess) -> int | None:
    try:
        return int(emulator.stream()["totals"]["sent"])
    except (EmulatorError, KeyError, ValueError):
        return None


def _drained(stream: dict[str, Any], figures: Figures) -> bool:
    """Everything published is acknowledged by the broker and the daemon, and committed."""
    totals = stream["totals"]
    return bool(
        totals["acked"] == totals["sent"]
        and figures.acked >= totals["sent"]
        and figures.telemetry_rows >= totals["items"]
        and figures.quarantined_total >= totals["bad"]
    )


@contextlib.contextmanager
def _sigterm_ends_the_run() -> Iterator[None]:
    """SIGTERM raises :class:`Stopped` in the main thread, like Ctrl-C raises KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    """While stopping children: a second Ctrl-C must not abandon one (each stop is bounded)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class Demo:
    """The processes of one run and what was learned from them."""

    def __init__(self, options: Options, out: Path) -> None:
        self.options = options
        self.out = out
        self.fleet = sample_fleet(options.vehicles)
        self.certs = make_certs(out / "certs")
        self.broker = MosquittoBroker(
            out / "broker", self.certs, max_queued_messages=queue_size(options)
        )
        self.emulator = EmulatorProcess(out)
        self.daemon: DaemonProcess | None = None
        self.metrics_url = ""
        self.figures = Figures()
        self.stream: dict[str, Any] | None = None
        self.clearances: dict[str, str] = {}
        self.drained = False
        self.daemon_code: int | None = None
        self.started = time.monotonic()

    def start(self) -> None:
        """Broker, emulator (stream paused), daemon; resume the stream once it is subscribed."""
        broker, certs = self.broker, self.certs
        broker.start()
        print(f"mosquitto    mutual TLS on {broker.host}:{broker.port} ({broker.log_path})")
        fleet_file = write_fleet(self.out / "fleet.csv", self.fleet)
        tree: dict[str, dict[str, Any]] = daemon_config(
            broker,
            certs,
            self.out,
            client_id=CLIENT_ID,
            # The product's default sink placement, not the tests' (daemon_config pins a thread).
            overrides={"output": {"flush_age_s": FLUSH_AGE_S}, "ingest": {"sink": "auto"}},
        )
        listen = tree["metrics"]["listen"]
        info = self.emulator.start(
            broker,
            certs,
            app_id=APP_ID,
            webhook_url=f"http://{listen}/webhook",
            vehicle_rate=self.options.vehicle_rate,
            bad_rate=self.options.bad_rate,
            malformed_rate=self.options.malformed_rate,
            seed=self.options.seed,
            decision_delay_s=DECISION_DELAY_S,
        )
        print(f"emulator     HM API at {info['base_url']}, stream admin at {info['stream']['url']}")
        # What the daemon needs to clear the fleet with the emulator and hear back from it.
        tree["api"] = {
            "base_url": info["base_url"],
            "client_id": info["client_id"],
            "client_secret": info["client_secret"],
            "auth": "client_credentials",
        }
        tree["fleet"] = {
            "enabled": True,
            "file": str(fleet_file),
            "prune": False,
            "interval_s": FLEET_INTERVAL_S,
        }
        tree["webhook"] = {"secret": info["webhook_secret"]}
        self.daemon = DaemonProcess(
            write_toml(tree, self.out / "hm-ingest.toml"), self.out / "daemon.log"
        )
        self.daemon.start()
        _wait_ready(self.daemon, f"http://{listen}/readyz")
        self.metrics_url = f"http://{listen}/metrics"
        print(f"hm-ingest    ready, metrics at {self.metrics_url}, fleet file {fleet_file}")
        self.emulator.set_paused(False)
        self.started = time.monotonic()

    def _scrape(self) -> None:
        self.figures = scrape(self.metrics_url) or self.figures
        daemon = self.daemon
        if daemon is not None and daemon.proc is not None and daemon.proc.poll() is not None:
            raise DemoError(
                f"the daemon exited early (code {daemon.proc.returncode}); last lines of "
                f"{daemon.log_path}:\n{_tail(daemon.log_path)}"
            )

    def watch(self) -> None:
        """Print progress until ``--duration`` has passed."""
        progress = Progress(self.started)
        while (now := time.monotonic()) - self.started < self.options.duration_s:
            time.sleep(POLL_S)
            self._scrape()
            if now >= progress.next_at:
                print(progress.line(now, self.figures, _published(self.emulator)), flush=True)
        print("time is up: pausing the stream and letting the daemon catch up")
        self.emulator.set_paused(True)
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while not self.drained and time.monotonic() < deadline:
            time.sleep(POLL_S)
            self.stream = self.emulator.stream()
            self._scrape()
            self.drained = _drained(self.stream, self.figures)
        print(progress.line(time.monotonic(), self.figures, _published(self.emulator)))

    def stop(self) -> None:
        """Read the emulator's final view, then stop the daemon (it drains), emulator, broker."""
        if self.emulator.proc is not None and self.emulator.info:
            try:
                self.emulator.set_paused(True)
                self.stream = self.emulator.stream()
                self.clearances = self.emulator.clearances()
            except EmulatorError as exc:
                print(f"could not read the emulator's counters: {exc}", file=sys.stderr)
        if self.daemon is not None:
            self.daemon_code = _stop_daemon(self.daemon)
        self.emulator.stop()
        self.broker.stop()
        print(f"stopped: daemon (exit code {self.daemon_code}), emulator, broker")

    def report(self) -> bool:
        """Print the summary, checks and queries; save summary.json; whether every check held."""
        data = self.out / "data"
        facts = report.Run(
            self.fleet,
            self.clearances,
            self.stream,
            self.figures,
            self.drained,
            time.monotonic() - self.started,
        )
        output = report.read_output(data)
        found = report.checks(facts, output)
        report.write_summary(self.out / "summary.json", facts, output, found)
        print()
        print("\n".join(report.summary_lines(facts, output, data)))
        print("  checks")
        for check in found:
            print(f"    [{'ok' if check.ok else 'FAILED'}] {check.text}")
        logs = [self.out / "daemon.log", self.emulator.log_path, self.broker.log_path]
        print(f"  logs         {', '.join(map(str, logs))}")
        print(f"  settings     {self.out / 'hm-ingest.toml'} (summary.json has every figure)")
        print()
        print(report.queries(data))
        return all(c.ok for c in found)


def run(options: Options) -> int:
    find_mosquitto()  # BrokerStartError (with install help) before anything is created
    out = workdir.prepare(options.output)
    print(
        f"demo in {out}: {options.vehicles} vehicles, {options.vehicle_rate:g} messages/s per "
        f"approved vehicle, {options.duration_s:g} s (Ctrl-C ends it early)"
    )
    demo = Demo(options, out)
    interrupted = False
    with _sigterm_ends_the_run():
        try:
            demo.start()
            demo.watch()
        except (KeyboardInterrupt, Stopped):
            interrupted = True
            print(
                "\ninterrupted; stopping the daemon, the emulator and the broker", file=sys.stderr
            )
        finally:
            with _signals_ignored():
                demo.stop()
    all_ok = demo.report()
    if interrupted:
        return EXIT_INTERRUPTED
    if demo.daemon_code != 0 or not demo.drained or not all_ok:
        return EXIT_FAILED
    return EXIT_OK
