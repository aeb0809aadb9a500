"""The daemon as a real process: SIGKILL mid-stream, broker restarts, SIGTERM drain.

Each scenario publishes messages with unique ids and then checks that every one of them appears
exactly once across telemetry/ and rejected/: nothing lost, nothing duplicated.
"""

from __future__ import annotations

import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

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
from tests.daemon_support import assert_exactly_once, stop_once_all_committed

pytestmark = pytest.mark.slow


def _start_daemon(
    broker: MosquittoBroker, certs: CertBundle, tmp_path: Path, **over: dict
) -> DaemonProcess:
    """Start ``hm-ingest run`` and wait until it is subscribed: the broker keeps messages for
    the daemon's persistent session only from its first subscription on."""
    tree = daemon_config(broker, certs, tmp_path, overrides=over)
    daemon = DaemonProcess(write_toml(tree, tmp_path / "c.toml"), tmp_path / "daemon.log")
    daemon.start()
    wait_ready(tree)
    return daemon


def _acked(tree: dict[str, dict[str, Any]]) -> float:
    text = httpx.get(f"http://{tree['metrics']['listen']}/metrics", timeout=2).text
    for family in text_string_to_metric_families(text):
        if family.name == "hm_ingest_messages_acked":
            return sum(sample.value for sample in family.samples if sample.name.endswith("_total"))
    return 0.0


def _acked_or_zero(tree: dict[str, dict[str, Any]]) -> float:
    """Acks of the running daemon, 0 while it is (re)starting and not serving metrics yet."""
    try:
        return _acked(tree)
    except httpx.HTTPError:
        return 0.0


def _publish_in_background(
    broker: MosquittoBroker, certs: CertBundle, messages: list[Message]
) -> threading.Thread:
    def run() -> None:
        with Publisher(broker, certs, timeout_s=300) as publisher:
            for start in range(0, len(messages), 500):
                chunk = messages[start : start + 500]
                publisher.publish_many((m.topic, m.payload) for m in chunk)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_sigkill_mid_stream_loses_and_duplicates_nothing(
    broker: MosquittoBroker, certs: CertBundle, tmp_path: Path
) -> None:
    """With the sink in its own process (the sink thread's variant is test_mqtt's, once per
    client): the SIGKILL hits the daemon only, so its sink process must exit by itself, and the
    restart must wait for it before replaying."""
    messages = list(stream(APP_ID, 12_000, invalid_fraction=0.02, seed=11))
    output = tmp_path / "data"
    rng = random.Random(1)
    tree = daemon_config(
        broker,
        certs,
        tmp_path,
        overrides={"output": {"flush_age_s": 0.3}, "ingest": {"sink": "process"}},
    )
    daemon = DaemonProcess(write_toml(tree, tmp_path / "c.toml"), tmp_path / "daemon.log")
    daemon.start()
    wait_ready(tree)
    try:
        with Publisher(broker, certs, timeout_s=300) as publisher:
            for start in range(0, len(messages), 3000):
                publisher.publish_many((m.topic, m.payload) for m in messages[start : start + 3000])
                # Kill while this run is consuming a backlog (its own acks show it is past
                # start-up), so the kill lands mid-receive, mid-log or mid-commit as the dice
                # fall, never in a start-up that has nothing to lose. A wall-clock kill could
                # hit only start-ups on a slow machine and prove nothing.
                wait_for(lambda: _acked_or_zero(tree) >= 300, 60, "this run to ack 300")
                time.sleep(rng.uniform(0.0, 0.1))
                daemon.kill()
                daemon.start()
        stop_once_all_committed(daemon, output, [m.message_id for m in messages], 120)
    finally:
        daemon.kill()
    assert_exactly_once(output, [m.message_id for m in messages])
    assert "replayed" in daemon.log_text(), "no kill left logged records to replay"


def test_broker_restart_mid_stream(
    broker: MosquittoBroker, certs: CertBundle, tmp_path: Path
) -> None:
    first = list(stream(APP_ID, 3000, seed=12, prefix="a"))
    second = list(stream(APP_ID, 3000, seed=13, prefix="b"))
    output = tmp_path / "data"
    daemon = _start_daemon(broker, certs, tmp_path)
    try:
        _publish_in_background(broker, certs, first).join(120)
        # A graceful restart (SIGTERM): Mosquitto writes its persistence file on the way down.
        # After SIGKILL it would lose whatever arrived since its last autosave, which is the
        # broker's own loss and would show up here as missing messages the daemon never saw.
        broker.stop()
        broker.start()
        _publish_in_background(broker, certs, second).join(120)
        stop_once_all_committed(daemon, output, [m.message_id for m in first + second], 120)
    finally:
        daemon.kill()
    assert_exactly_once(output, [m.message_id for m in first + second])
    assert "connect" in daemon.log_text().lower()


def test_sigterm_drains_everything_acknowledged(
    broker: MosquittoBroker, certs: CertBundle, tmp_path: Path
) -> None:
    messages = list(stream(APP_ID, 5000, seed=14))
    output = tmp_path / "data"
    # A long flush age: nothing is committed before the drain, so the drain must do it all.
    tree = daemon_config(broker, certs, tmp_path, overrides={"output": {"flush_age_s": 3600.0}})
    daemon = DaemonProcess(write_toml(tree, tmp_path / "c.toml"), tmp_path / "daemon.log")
    daemon.start()
    wait_ready(tree)
    try:
        _publish_in_background(broker, certs, messages).join(120)
        # The broker acknowledged every publish; the daemon may still be receiving the tail of
        # them (acks pause while the sink catches up). SIGTERM once all are acknowledged *by
        # the daemon*: from then on only the drain can commit them.
        wait_for(lambda: _acked(tree) >= len(messages), 60, f"the daemon to ack {len(messages)}")
        started = time.monotonic()
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(30) == 0, daemon.log_text()[-3000:]
        drain_s = time.monotonic() - started
    finally:
        daemon.kill()
    # Every message the broker handed over was acked by the daemon (the publisher got its
    # PUBACKs from the broker, and the daemon's session is persistent), so a restart must find
    # nothing more to add: the drain committed all of them.
    assert_exactly_once(output, [m.message_id for m in messages])
    assert drain_s < 20
    assert "drained in" in daemon.log_text()
