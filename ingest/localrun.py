"""See the daemon work end to end on this machine: ``make run-local`` (``scripts/run-local.sh``).

``python -m ingest.localrun [--duration S] [--messages N] [--out DIR]`` generates throwaway
certificates, starts a mutual-TLS Mosquitto with persistence, runs the real daemon
(``hm-ingest run``) against it as a child process, publishes ``N`` messages of test traffic (1 %
of them invalid, so the quarantine has something to show), prints progress from the daemon's
``/metrics`` every two seconds, stops the daemon with SIGTERM once it acknowledged everything and
finally summarises what landed under ``OUT/data``, with queries to paste.

Everything it creates lives under ``OUT``; a second run with the same ``OUT`` replaces the first.
Nothing here is a production setup: the keys are unencrypted throwaways.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pyarrow.parquet as pq
from prometheus_client.parser import text_string_to_metric_families

from ingest.testing.broker import INSTALL_HINT, BrokerStartError, MosquittoBroker, find_mosquitto
from ingest.testing.certs import CertBundle, make_certs
from ingest.testing.daemon import (
    APP_ID,
    DaemonProcess,
    daemon_config,
    wait_ready,
    write_toml,
)
from ingest.testing.publish import Publisher
from ingest.testing.traffic import Message, stream

DEFAULT_DURATION_S = 30.0
DEFAULT_MESSAGES = 20_000
DEFAULT_OUT = Path("./local-run")
INVALID_FRACTION = 0.01
FLUSH_AGE_S = 2.0
CLIENT_ID = "hm-ingest-local"
PROGRESS_EVERY_S = 2.0
POLL_S = 0.2
PUBLISH_CHUNK = 500
READY_TIMEOUT_S = 30.0
# The daemon's drain deadline (shutdown.deadline_s, 20 s in daemon_config) plus a margin.
STOP_TIMEOUT_S = 40.0
EXIT_INTERRUPTED = 130
# Written into OUT on first use: only a folder carrying it is ever cleared by a later run.
MARKER = ".hm-localrun"
OWNED = ("certs", "broker", "data", "state", "hm-ingest.toml", "daemon.log")
TABLES = ("telemetry", "rejected")
# Printed for the user to paste (``{source}`` becomes a read_parquet over OUT/data), never run here.
PER_PROPERTY_SQL = (
    "SELECT capability, property, count(*) AS rows, count(DISTINCT vin) AS vehicles "
    "FROM {source} GROUP BY ALL ORDER BY rows DESC"
)
REASONS_SQL = (
    "SELECT reason, count(*) AS messages FROM {source} GROUP BY ALL ORDER BY messages DESC"
)

INSTALL_HELP = """\
mosquitto is not installed (or not on PATH, nor in /usr/sbin); the local run needs it.
Install it with:
  sudo apt-get install -y mosquitto mosquitto-clients   # Debian/Ubuntu
  brew install mosquitto                                 # macOS
or run `make install`, which installs it with apt-get when run as root."""


class LocalRunError(Exception):
    """A step of the local run failed; the message says which and what to look at."""


# -- metrics -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Figures:
    """What the daemon's /metrics says at one moment."""

    received: int = 0
    acked: int = 0
    telemetry_rows: int = 0
    quarantined: int = 0


def parse_metrics(text: str) -> Figures:
    """Pick the progress figures out of a Prometheus text exposition."""
    totals: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name: str = sample.name
            labels: dict[str, str] = sample.labels
            value = int(sample.value)
            if name == "hm_ingest_messages_received_total":
                totals["received"] += value
            elif name == "hm_ingest_messages_acked_total":
                totals["acked"] += value
            elif name == "hm_ingest_rows_written_total" and labels.get("table") == "telemetry":
                totals["rows"] += value
            elif name == "hm_ingest_messages_rejected_total":
                totals["quarantined"] += value
    return Figures(
        received=totals["received"],
        acked=totals["acked"],
        telemetry_rows=totals["rows"],
        quarantined=totals["quarantined"],
    )


def scrape(url: str) -> Figures | None:
    """The daemon's figures, or None when /metrics does not answer."""
    try:
        response = httpx.get(url, timeout=1.0)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    return parse_metrics(response.text)


# -- publishing ----------------------------------------------------------------------------------


@dataclass
class PublishJob:
    """Publishes ``messages`` in a background thread, counting what the broker acknowledged."""

    broker: MosquittoBroker
    certs: CertBundle
    messages: list[Message]
    published: int = 0
    error: BaseException | None = None
    started_at: float = 0.0
    finished_at: float | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self.started_at = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            with Publisher(self.broker, self.certs, client_id="hm-localrun-publisher") as pub:
                for start in range(0, len(self.messages), PUBLISH_CHUNK):
                    if self._stop.is_set():
                        return
                    chunk = self.messages[start : start + PUBLISH_CHUNK]
                    self.published += pub.publish_many((m.topic, m.payload) for m in chunk)
        except Exception as exc:  # reported by the main thread
            self.error = exc
        finally:
            self.finished_at = time.monotonic()

    @property
    def done(self) -> bool:
        return self.finished_at is not None

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)


# -- output --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TableSummary:
    files: int
    rows: int
    bytes: int


def summarise_table(data: Path, table: str) -> TableSummary:
    files = sorted((data / table).glob("*/*.parquet"))
    rows = sum(int(pq.read_metadata(path).num_rows) for path in files)
    return TableSummary(files=len(files), rows=rows, bytes=sum(p.stat().st_size for p in files))


def quarantine_reasons(data: Path) -> Counter[str]:
    reasons: Counter[str] = Counter()
    for path in sorted((data / "rejected").glob("*/*.parquet")):
        reasons.update(pq.read_table(path, columns=["reason"]).column("reason").to_pylist())
    return reasons


def telemetry_messages(data: Path) -> int:
    ids: set[str] = set()
    for path in sorted((data / "telemetry").glob("*/*.parquet")):
        ids.update(pq.read_table(path, columns=["message_id"]).column("message_id").to_pylist())
    return len(ids)


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def shell_quote(text: str) -> str:
    """Quote for bash, readably: double quotes (SQL keeps its single quotes) unless ``!``."""
    if "!" in text:
        return shlex.quote(text)
    escaped = "".join("\\" + c if c in '\\"$`' else c for c in text)
    return f'"{escaped}"'


def _sql_path(path: Path) -> str:
    return str(path).replace("'", "''")


def queries(data: Path) -> str:
    """Ready-to-paste DuckDB and pyarrow queries against ``data``."""
    telemetry = _sql_path(data / "telemetry" / "*" / "*.parquet")
    rejected = _sql_path(data / "rejected" / "*" / "*.parquet")
    per_property = PER_PROPERTY_SQL.replace(
        "{source}", f"read_parquet('{telemetry}', hive_partitioning = true)"
    )
    reasons = REASONS_SQL.replace("{source}", f"read_parquet('{rejected}')")
    python = shlex.quote(sys.executable)
    duckdb_py = f"import duckdb; duckdb.sql({per_property!r}).show()"
    arrow_py = (
        "import pyarrow.dataset as ds; "
        f"t = ds.dataset({str(data / 'telemetry')!r}, format='parquet', "
        "partitioning='hive').to_table(); "
        "print(t.num_rows, 'rows'); "
        "print(t.group_by(['capability', 'property']).aggregate([('message_id', 'count')]))"
    )
    return "\n".join(
        [
            "Query the output (DuckDB CLI, or DuckDB / pyarrow from Python):",
            f"  duckdb -c {shell_quote(per_property)}",
            f"  duckdb -c {shell_quote(reasons)}",
            f"  {python} -c {shell_quote(duckdb_py)}",
            f"  {python} -c {shell_quote(arrow_py)}",
        ]
    )


# -- the run -------------------------------------------------------------------------------------


def prepare_out(out: Path) -> None:
    """Create ``out``, or clear what an earlier local run left in it (and only that)."""
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise LocalRunError(
            f"{out} exists, is not empty and was not made by a local run; "
            "pass an empty or new folder with --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by python -m ingest.localrun; safe to delete\n")
    for name in OWNED:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _progress(elapsed: float, job: PublishJob, figures: Figures) -> str:
    return (
        f"[{elapsed:5.1f} s] published {job.published:>7}/{len(job.messages)}  "
        f"acked {figures.acked:>7}  rows written {figures.telemetry_rows:>7}  "
        f"quarantined {figures.quarantined:>5}"
    )


def _log_tail(daemon: DaemonProcess, lines: int = 20) -> str:
    return "\n".join(daemon.log_text().splitlines()[-lines:])


def _stop_daemon(daemon: DaemonProcess) -> int | None:
    """SIGTERM (the daemon drains and commits), then SIGKILL if it overstays; its exit code."""
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


def _print_summary(out: Path, job: PublishJob | None, all_acked: bool) -> int:
    """Print what landed under OUT/data; returns the number of quarantined messages."""
    data = out / "data"
    tables = {table: summarise_table(data, table) for table in TABLES}
    reasons = quarantine_reasons(data)
    quarantined = sum(reasons.values())
    print()
    print(f"Summary ({data})")
    if job is not None:
        invalid = sum(1 for m in job.messages[: job.published] if m.items == 0)
        print(f"  published    {job.published} messages ({invalid} invalid on purpose)")
        if job.finished_at is not None and job.published:
            seconds = job.finished_at - job.started_at
            print(f"  publish rate {job.published / max(seconds, 1e-9):,.0f} msg/s")
    telemetry, rejected = tables["telemetry"], tables["rejected"]
    print(
        f"  telemetry    {telemetry.rows} rows from {telemetry_messages(data)} messages, "
        f"{_plural(telemetry.files, 'file')}, {_size(telemetry.bytes)}"
    )
    print(
        f"  rejected     {rejected.rows} rows, {_plural(rejected.files, 'file')}, "
        f"{_size(rejected.bytes)}"
    )
    print(f"  quarantined  {quarantined} messages")
    for reason, count in reasons.most_common():
        print(f"    {reason:<24} {count}")
    if job is not None and not all_acked:
        print("  note: not every published message was acknowledged before the run ended")
    print(f"  daemon log   {out / 'daemon.log'}")
    print(f"  config       {out / 'hm-ingest.toml'}")
    print()
    print(queries(data.resolve()))
    return quarantined


def run(duration_s: float, count: int, out: Path) -> int:
    find_mosquitto()  # BrokerStartError (with install help) before anything is created
    prepare_out(out)
    out = out.resolve()
    print(f"local run in {out}: {count} messages, up to {duration_s:g} s")
    certs = make_certs(out / "certs")
    broker = MosquittoBroker(out / "broker", certs, persistence=True)
    daemon: DaemonProcess | None = None
    job: PublishJob | None = None
    all_acked = False
    interrupted = False
    daemon_code: int | None = None
    try:
        broker.start()
        print(f"mosquitto    mutual TLS on {broker.host}:{broker.port} (log {broker.log_path})")
        tree: dict[str, dict[str, Any]] = daemon_config(
            broker,
            certs,
            out,
            client_id=CLIENT_ID,
            overrides={"output": {"flush_age_s": FLUSH_AGE_S}},
        )
        config = write_toml(tree, out / "hm-ingest.toml")
        daemon = DaemonProcess(config, out / "daemon.log")
        daemon.start()
        metrics_url = f"http://{tree['metrics']['listen']}/metrics"
        try:
            wait_ready(tree, READY_TIMEOUT_S)
        except TimeoutError as exc:
            raise LocalRunError(
                f"the daemon did not become ready: {exc}\nlast lines of {daemon.log_path}:\n"
                + _log_tail(daemon)
            ) from exc
        print(f"hm-ingest    ready, metrics at {metrics_url}")

        job = PublishJob(
            broker, certs, list(stream(APP_ID, count, invalid_fraction=INVALID_FRACTION))
        )
        job.start()
        figures = Figures()
        next_print = job.started_at + PROGRESS_EVERY_S
        while True:
            time.sleep(POLL_S)
            now = time.monotonic()
            figures = scrape(metrics_url) or figures
            if daemon.proc is not None and daemon.proc.poll() is not None:
                raise LocalRunError(
                    f"the daemon exited early (code {daemon.proc.returncode}); last lines of "
                    f"{daemon.log_path}:\n{_log_tail(daemon)}"
                )
            if job.error is not None:
                raise LocalRunError(f"publishing failed: {job.error}")
            all_acked = job.done and figures.acked >= job.published
            timed_out = now - job.started_at >= duration_s
            if now >= next_print or all_acked or timed_out:
                print(_progress(now - job.started_at, job, figures), flush=True)
                next_print = now + PROGRESS_EVERY_S
            if all_acked:
                print(
                    f"all {job.published} messages acknowledged; stopping the daemon (SIGTERM: "
                    "it commits the rows still pending before it exits)"
                )
                break
            if timed_out:
                print(
                    f"--duration {duration_s:g} s passed with {figures.acked} of "
                    f"{len(job.messages)} messages acknowledged; stopping the daemon (SIGTERM)"
                )
                break
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted; stopping the daemon and the broker", file=sys.stderr)
    finally:
        # A second Ctrl-C must not abandon a child: the clean-up below is bounded in time.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            if job is not None:
                job.stop()
            if daemon is not None:
                daemon_code = _stop_daemon(daemon)
            broker.stop()
        finally:
            signal.signal(signal.SIGINT, previous)
    if daemon_code not in (0, None) and not interrupted:
        raise LocalRunError(
            f"the daemon exited with code {daemon_code}; last lines of {out / 'daemon.log'}:\n"
            + (_log_tail(daemon) if daemon is not None else "")
        )
    print(f"daemon exited with code {daemon_code}; broker stopped")
    _print_summary(out, job, all_acked)
    if interrupted:
        return EXIT_INTERRUPTED
    return 0 if all_acked else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ingest.localrun",
        description="Run hm-ingest end to end against a local Mosquitto with throwaway "
        "certificates and test traffic, then summarise the Parquet it wrote.",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=DEFAULT_DURATION_S,
        metavar="SECONDS",
        help="longest wait, from the first publish, for the daemon to acknowledge every "
        f"message (default {DEFAULT_DURATION_S:g})",
    )
    parser.add_argument(
        "--messages",
        type=int,
        default=DEFAULT_MESSAGES,
        metavar="N",
        help=f"messages to publish, 1%% of them invalid (default {DEFAULT_MESSAGES})",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        metavar="DIR",
        help=f"folder for certificates, broker, state and data (default {DEFAULT_OUT})",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.duration <= 0 or args.messages < 1:
        print("--duration must be > 0 and --messages at least 1", file=sys.stderr)
        return 2
    try:
        return run(args.duration, args.messages, args.out)
    except BrokerStartError as exc:
        if str(exc) == INSTALL_HINT:
            print(INSTALL_HELP, file=sys.stderr)
        else:
            print(f"local run: could not start mosquitto: {exc}", file=sys.stderr)
        return 1
    except LocalRunError as exc:
        print(f"local run failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
