"""The daemon with [iceberg] enabled, killed mid-stream: the tables hold every row exactly once.

Real Mosquitto, real ``hm-ingest run`` processes: one killed by a fault point just after an
Iceberg append (before the checkpoint), one killed at random moments.
"""

from __future__ import annotations

import random
import re
import signal
import threading
import time
from pathlib import Path

import pytest

from ingest.config import Settings
from ingest.testing import CertBundle, MosquittoBroker, Publisher
from ingest.testing.daemon import DaemonProcess, daemon_config, wait_for, wait_ready, write_toml
from ingest.testing.faultpoints import CRASH_ENV
from ingest.testing.traffic import Message
from tests.daemon_support import message_ids
from tests.iceberg.support import keys, load, lsn_ranges, lsn_summaries, messages, plain_rows

pytestmark = pytest.mark.slow


def _publish(broker: MosquittoBroker, certs: CertBundle, batch: list[Message]) -> threading.Thread:
    def run() -> None:
        with Publisher(broker, certs, timeout_s=300) as publisher:
            for start in range(0, len(batch), 250):
                publisher.publish_many((m.topic, m.payload) for m in batch[start : start + 250])

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_killed_daemon_appends_each_batch_once(
    broker: MosquittoBroker, certs: CertBundle, tmp_path: Path
) -> None:
    batch = messages(4000, invalid_fraction=0.02, seed=21)
    tree = daemon_config(
        broker,
        certs,
        tmp_path,
        # At most 1,000 rows a batch, so the first run commits at least three whatever the
        # timing: by age alone, a slow first append could gather all 4,000 messages into two.
        overrides={
            "output": {"flush_age_s": 0.3, "flush_rows": 1000},
            "iceberg": {"enabled": True},
        },
    )
    settings = Settings.model_validate(tree)
    output = tmp_path / "data"
    daemon = DaemonProcess(write_toml(tree, tmp_path / "c.toml"), tmp_path / "daemon.log")
    # First run: killed right after its third Iceberg append, before that batch's checkpoint.
    daemon.start({CRASH_ENV: "sink.dedupe_recorded:3"})
    wait_ready(tree)
    publisher = _publish(broker, certs, batch)
    try:
        assert daemon.wait(120) == -signal.SIGKILL, daemon.log_text()[-3000:]
        daemon.start()
        rng = random.Random(3)
        for _ in range(2):
            time.sleep(rng.uniform(0.3, 1.5))
            daemon.kill()
            daemon.start()
        publisher.join(300)
        assert not publisher.is_alive(), "publisher did not finish"
        expected = {m.message_id for m in batch}
        wait_for(lambda: set(message_ids(output)) >= expected, 120, "all messages committed")
        wait_ready(tree)  # signal handlers are installed (the last start may be recent)
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(60) == 0, daemon.log_text()[-3000:]
    finally:
        daemon.kill()
    # The first run's last append was not redone.
    assert re.search(r"already in table\(s\) .*telemetry: kept as written", daemon.log_text())
    for name, key in (("telemetry", ("message_id", "item_index")), ("rejected", ("lsn",))):
        table = load(settings, name)
        scanned = keys(table.scan().to_arrow(), key)
        assert len(scanned) == len(set(scanned)), f"{name}: rows appended twice"
        assert scanned == keys(plain_rows(output, name), key), name
        assert lsn_summaries(table) == [last for _, last in lsn_ranges(output / name)], name
    counts = message_ids(output)
    assert set(counts) == {m.message_id for m in batch}
    assert max(counts.values()) == 1
