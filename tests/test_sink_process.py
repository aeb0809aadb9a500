"""``[ingest] sink = "process"``: the sink in a process of its own, against the real daemon process
and a real mutual-TLS Mosquitto.

Every scenario checks every published message is in telemetry/ or rejected/ exactly once. The
crash in the middle of a stream with the daemon SIGKILLed is in test_crash_recovery (run with both
sinks); here: the sink process itself killed, its exit with the daemon, and the state lock.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ingest.batch import REJECTED_NOT_CLEARED
from ingest.errors import LogError
from ingest.fleet.store import NOT_CLEARED
from ingest.sink_process import LOCK_NAME, SinkLock
from ingest.testing import CertBundle, MosquittoBroker, Publisher
from ingest.testing.daemon import (
    APP_ID,
    DaemonProcess,
    daemon_config,
    wait_for,
    wait_ready,
    write_toml,
)
from ingest.testing.traffic import Message, stream
from tests.daemon_support import (
    all_committed,
    assert_exactly_once,
    message_ids,
    read_table,
    stop_once_all_committed,
)

CONFIG = {"ingest": {"sink": "process"}, "output": {"flush_age_s": 0.3}}


def _children(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (the sink process is started from a worker thread, so
    /proc/<pid>/task/<pid>/children would miss it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces, so split after its closing paren.
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _sink_process(daemon: DaemonProcess) -> int:
    assert daemon.proc is not None
    children: list[int] = []

    def found() -> bool:
        assert daemon.proc is not None
        children[:] = [
            pid for pid in _children(daemon.proc.pid) if b"ingest.sink_process" in _cmdline(pid)
        ]
        return len(children) == 1

    wait_for(found, 30, "the daemon's one sink process")
    return children[0]


def _start(
    broker: MosquittoBroker, certs: CertBundle, tmp_path: Path
) -> tuple[DaemonProcess, dict]:
    tree = daemon_config(broker, certs, tmp_path, overrides=CONFIG)
    daemon = DaemonProcess(write_toml(tree, tmp_path / "c.toml"), tmp_path / "daemon.log")
    daemon.start()
    wait_ready(tree)
    return daemon, tree


def _publish(broker: MosquittoBroker, certs: CertBundle, messages: list[Message]) -> None:
    with Publisher(broker, certs, timeout_s=120) as publisher:
        publisher.publish_many((m.topic, m.payload) for m in messages)


def _metric(tree: dict, name: str, **labels: str) -> float:
    text = httpx.get(f"http://{tree['metrics']['listen']}/metrics", timeout=2).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


@pytest.mark.slow
def test_the_sink_process_commits_everything_once_and_stops_with_the_daemon(
    broker: MosquittoBroker, certs: CertBundle, tmp_path: Path
) -> None:
    messages = list(stream(APP_ID, 3000, invalid_fraction=0.05, seed=21))
    output = tmp_path / "data"
    daemon, tree = _start(broker, certs, tmp_path)
    try:
        sink_pid = _sink_process(daemon)
        _publish(broker, certs, messages)
        wait_for(
            lambda: all_committed(output, [m.message_id for m in messages]),
            60,
            "every message committed",
        )
        # The sink process's reports reach the daemon's metrics: rows, and the log released.
        rows = len(read_table(output, "telemetry"))
        wait_for(
            lambda: _metric(tree, "hm_ingest_rows_written_total", table="telemetry") >= rows,
            10,
            "the rows written to be counted",
        )
        assert _metric(tree, "hm_ingest_rows_written_total", table="telemetry") == rows
        assert _metric(tree, "hm_ingest_messages_rejected_total") > 0
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(30) == 0, daemon.log_text()[-3000:]
    finally:
        daemon.kill()
    assert not _alive(sink_pid), "the sink process outlived its daemon"
    assert_exactly_once(output, [m.message_id for m in messages])
    assert f"sink process {sink_pid} serves from lsn" in daemon.log_text()


@pytest.mark.slow
def test_a_killed_sink_process_stops_the_daemon_and_the_restart_loses_nothing(
    broker: MosquittoBroker, certs: CertBundle, tmp_path: Path
) -> None:
    first = list(stream(APP_ID, 2000, seed=22, prefix="a"))
    second = list(stream(APP_ID, 2000, seed=23, prefix="b"))
    output = tmp_path / "data"
    daemon, tree = _start(broker, certs, tmp_path)
    try:
        _publish(broker, certs, first)
        wait_for(lambda: bool(message_ids(output)), 30, "a first commit")
        os.kill(_sink_process(daemon), signal.SIGKILL)
        code = daemon.wait(30)
        assert code == 1, daemon.log_text()[-3000:]
        assert "the sink process exited unexpectedly (exit code -9)" in daemon.log_text()
        # Published while nothing runs: the broker keeps it for the persistent session.
        _publish(broker, certs, second)
        daemon.start()
        wait_ready(tree)
        stop_once_all_committed(daemon, output, [m.message_id for m in first + second], 60)
    finally:
        daemon.kill()
    assert_exactly_once(output, [m.message_id for m in first + second])


@pytest.mark.slow
def test_a_sink_process_exits_by_itself_when_its_daemon_is_killed(
    broker: MosquittoBroker, certs: CertBundle, tmp_path: Path
) -> None:
    daemon, _ = _start(broker, certs, tmp_path)
    try:
        sink_pid = _sink_process(daemon)
        daemon.kill()  # SIGKILL to the daemon only, as an OOM kill would
        started = time.monotonic()
        wait_for(lambda: not _alive(sink_pid), 10, "the orphaned sink process to exit")
        print(f"\norphaned sink process gone {time.monotonic() - started:.3f} s after the kill")
    finally:
        daemon.kill()
    assert "the daemon is gone: the sink process exits without committing" in daemon.log_text()


def test_the_sink_lock_is_exclusive_and_names_the_holder(tmp_path: Path) -> None:
    held = SinkLock.acquire(tmp_path)
    try:
        with pytest.raises(LogError, match=r"is in use: another process holds .*sink\.lock"):
            SinkLock.acquire(tmp_path, timeout_s=0.2)
    finally:
        held.release()
    again = SinkLock.acquire(tmp_path, timeout_s=0.2)
    again.release()
    assert (tmp_path / LOCK_NAME).exists()


def test_the_sink_process_imports_no_hm_api_client() -> None:
    """Each module a sink process imports is memory it holds for its lifetime: the HM API client
    (httpx, jwt, cryptography, via ingest.fleet) cost it about 20 MB, for one string constant."""
    probe = (
        "import sys, ingest.sink_process; "
        "print(sorted(m for m in ('httpx', 'jwt', 'cryptography', 'aiohttp', 'ingest.fleet', "
        "'ingest.hmapi') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"


def test_the_sink_process_gate_words_a_refusal_as_the_daemons_gate_does() -> None:
    assert REJECTED_NOT_CLEARED == NOT_CLEARED
