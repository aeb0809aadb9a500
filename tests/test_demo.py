"""``hm-ingest demo``: the whole system on one machine, run as a user runs it, output checked.

The end-to-end test reads the Parquet back itself and compares it with the stream emulator's own
counters (``summary.json``), rather than trusting the demo's printed checks.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from ingest import cli
from ingest.demo import metrics, run
from ingest.demo.fleet import sample_fleet, write_fleet
from ingest.fleet.desired import load_desired_fleet
from ingest.metrics import Metrics
from ingest.testing.broker import INSTALL_HINT, BrokerStartError

REPO = Path(__file__).resolve().parent.parent
VEHICLES = 6  # VINs 3 (…R) is rejected, the other five approved
DURATION_S = 20


def demo_argv(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ingest.cli", "demo", "--output", str(out), *extra]


def rows_by_vin(data: Path) -> Counter[str]:
    rows: Counter[str] = Counter()
    for path in sorted((data / "telemetry").glob("*/*.parquet")):
        rows.update(pq.read_table(path, columns=["vin"]).column("vin").to_pylist())
    return rows


def quarantined(data: Path) -> Counter[str]:
    reasons: Counter[str] = Counter()
    for path in sorted((data / "rejected").glob("*/*.parquet")):
        reasons.update(pq.read_table(path, columns=["reason"]).column("reason").to_pylist())
    return reasons


@pytest.mark.slow
def test_demo_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    extra = ["--duration", str(DURATION_S), "--vehicles", str(VEHICLES), "--bad-rate", "0.05"]
    result = subprocess.run(
        demo_argv(out, *extra),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((out / "summary.json").read_text())
    clearances: dict[str, str] = summary["clearances"]
    fleet = [v["vin"] for v in summary["fleet"]]
    approved = {vin for vin in fleet if clearances.get(vin) == "approved"}
    rejected = {vin for vin in fleet if vin.endswith("R")}
    assert approved == set(fleet) - rejected, clearances
    assert all(clearances[vin] == "rejected" for vin in rejected)

    rows = rows_by_vin(out / "data")
    assert all(rows[vin] > 0 for vin in approved), rows
    assert not any(rows[vin] for vin in rejected), rows
    stream = summary["stream"]
    for vin in approved:  # every item sent is one row; repeats were dropped by message_id
        assert rows[vin] == stream["vehicles"][vin]["items"], vin
    assert set(rows) == approved

    reasons = quarantined(out / "data")
    assert sum(reasons.values()) == stream["totals"]["bad"] > 0
    assert stream["totals"]["duplicates"] > 0
    assert summary["daemon"]["duplicates"] == stream["totals"]["duplicates"]
    assert "[FAILED]" not in result.stdout
    assert "rows/s" in result.stdout
    assert "duckdb.sql(" in result.stdout
    assert "pyarrow.dataset" in result.stdout


def processes_mentioning(text: str, but: int) -> list[str]:
    """Command lines of live processes that mention ``text`` (the demo's children name its
    folder: mosquitto's config, the daemon's settings, the emulator's state)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in (os.getpid(), but):
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = next(
                line
                for line in (entry / "status").read_text().splitlines()
                if line.startswith("State:")
            )
        except (OSError, StopIteration):
            continue
        if text in cmdline and "zombie" not in state:
            found.append(cmdline)
    return found


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_stops_everything_it_started(tmp_path: Path, signum: signal.Signals) -> None:
    out = tmp_path / "demo"
    log = tmp_path / "stdout.txt"
    with log.open("w") as stdout:
        proc = subprocess.Popen(
            demo_argv(out, "--duration", "600", "--vehicles", "2"),
            cwd=REPO,
            stdout=stdout,
            stderr=subprocess.STDOUT,
            text=True,
        )
    try:
        deadline = time.monotonic() + 90
        while "rows/s" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        children = processes_mentioning(str(out), but=proc.pid)
        assert len(children) == 3, children  # mosquitto, the emulator and the daemon
        proc.send_signal(signum)
        code = proc.wait(90)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert code == run.EXIT_INTERRUPTED, text
    assert processes_mentioning(str(out), but=proc.pid) == []
    assert "Summary" in text
    assert "Traceback" not in text


def test_missing_mosquitto_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Mosquitto is installed wherever these tests run; a machine without it is what is emulated.
    def missing() -> str:
        raise BrokerStartError(INSTALL_HINT)

    monkeypatch.setattr(run, "find_mosquitto", missing)
    assert cli.main(["demo", "--output", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err
    assert "sudo apt-get install -y mosquitto mosquitto-clients" in err
    assert "brew install mosquitto" in err
    assert "Traceback" not in err
    assert not (tmp_path / "demo").exists(), "nothing is created before the check"


def test_refuses_a_folder_it_did_not_make(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    assert cli.main(["demo", "--output", str(tmp_path)]) == 2
    assert "was not made by hm-ingest demo" in capsys.readouterr().err
    assert (tmp_path / "mine.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--vehicles", "0", "expected a whole number from 1 to 10000"),
        ("--duration", "-5", "expected a number > 0"),
        ("--rate", "fast", "expected a number > 0"),
        ("--bad-rate", "2", "expected a probability from 0 to 1"),
    ],
)
def test_flag_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str, message: str
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["demo", "--output", str(tmp_path), flag, value])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_sample_fleet_is_a_valid_fleet_file(tmp_path: Path) -> None:
    fleet = sample_fleet(12)
    loaded = load_desired_fleet(write_fleet(tmp_path / "fleet.csv", fleet))
    assert [v.vin for v in loaded] == [v.vin for v in fleet]
    assert sum(v.expect_rejected for v in fleet) == 3
    assert all(re.fullmatch(r"[A-HJ-NPR-Z0-9]{17}", v.vin) for v in fleet)


def test_progress_figures_come_from_the_daemons_metrics() -> None:
    registry = CollectorRegistry()
    daemon = Metrics(registry)
    daemon.messages_received.inc(12)
    daemon.messages_acked.inc(11)
    daemon.rows_written.labels("telemetry").inc(140)
    daemon.rows_written.labels("rejected").inc(2)
    daemon.messages_rejected.labels("invalid_json").inc(2)
    daemon.messages_rejected.labels("vin_mismatch").inc()
    daemon.duplicates.inc(3)
    daemon.clearance_vehicles.labels("approved").set(5)
    daemon.clearance_vehicles.labels("rejected").set(1)
    daemon.clearance_vehicles.labels("pending").set(0)
    figures = metrics.parse(generate_latest(registry).decode())
    assert (figures.received, figures.acked, figures.telemetry_rows) == (12, 11, 140)
    assert figures.quarantined == {"invalid_json": 2, "vin_mismatch": 1}
    assert figures.quarantined_total == 3
    assert figures.duplicates == 3
    assert figures.clearance == {"approved": 5, "rejected": 1}


def test_broker_queue_is_sized_for_the_run() -> None:
    small = run.Options(duration_s=10, vehicles=2, vehicle_rate=1)
    big = run.Options(duration_s=600, vehicles=1000, vehicle_rate=10)
    assert run.queue_size(small) == run.MIN_QUEUED_MESSAGES
    assert run.queue_size(big) == 2 * 600 * 1000 * 10
