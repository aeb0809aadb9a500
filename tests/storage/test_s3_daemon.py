"""The real daemon writing to a real S3-compatible server (moto), through a real Mosquitto.

Read back with pyarrow.dataset over S3. The outage test takes the store away mid-stream: commits
fail, the log fills to its cap, acks stop (the broker keeps the rest), and once the store is back
everything arrives exactly once.
"""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

from ingest.app import Daemon
from ingest.checkpoint import CheckpointStore
from ingest.parquet import part_file_name
from ingest.storage import OutputStore
from ingest.testing import CertBundle, MosquittoBroker, Publisher, faultpoints
from ingest.testing.daemon import (
    APP_ID,
    DaemonProcess,
    daemon_config,
    wait_for,
    wait_ready,
    write_toml,
)
from ingest.testing.traffic import stream
from tests.storage.daemon_support import (
    assert_exactly_once,
    run_until,
    s3_settings,
    scrape,
    telemetry_rows_written,
)
from tests.storage.s3_support import MotoS3, s3_dataset, s3_files


async def test_daemon_writes_to_s3_and_reads_back_with_pyarrow_dataset(
    broker: MosquittoBroker,
    certs: CertBundle,
    tmp_path: Path,
    s3: MotoS3,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    uri = f"s3://{s3.new_bucket()}/hm/fleet"
    messages = list(stream(APP_ID, 600, seed=11, invalid_fraction=0.05))
    settings = s3_settings(daemon_config(broker, certs, tmp_path), uri, monkeypatch)
    daemon = Daemon(settings, registry=CollectorRegistry())

    def publish() -> None:
        with Publisher(broker, certs) as publisher:
            publisher.publish_many((m.topic, m.payload) for m in messages)
        wait_for(
            lambda: scrape(daemon, "hm_ingest_messages_acked_total") == len(messages),
            30,
            "every message acknowledged",
        )

    assert await run_until(daemon, publish, timeout_s=60) == 0
    assert_exactly_once(OutputStore.open(uri), messages)
    assert not (tmp_path / "data").exists(), "nothing may go to the local default folder"
    dataset = s3_dataset(uri, "telemetry")
    assert dataset.schema.field("date").type == "string"
    assert all(f.path.startswith(uri.removeprefix("s3://")) for f in dataset.get_fragments())


@pytest.mark.slow
async def test_store_outage_pauses_acks_loses_nothing_and_resumes(
    broker: MosquittoBroker,
    certs: CertBundle,
    tmp_path: Path,
    s3: MotoS3,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    uri = f"s3://{s3.new_bucket()}/hm"
    before = list(stream(APP_ID, 200, seed=21, prefix="before"))
    during = list(stream(APP_ID, 3000, seed=22, prefix="during", invalid_fraction=0.01))
    tree = daemon_config(
        broker,
        certs,
        tmp_path,
        overrides={
            "state": {"log_max_bytes": 1024 * 1024, "log_segment_bytes": 64 * 1024},
            "output": {"flush_age_s": 0.2},
        },
    )
    settings = s3_settings(tree, uri, monkeypatch)
    daemon = Daemon(settings, registry=CollectorRegistry())
    readyz = f"http://{tree['metrics']['listen']}/readyz"
    publisher = Publisher(broker, certs, timeout_s=120)

    def scenario() -> None:
        publisher.connect()
        publisher.publish_many((m.topic, m.payload) for m in before)
        first_rows = sum(m.items for m in before)
        wait_for(lambda: telemetry_rows_written(daemon) >= first_rows, 30, "first commits")
        s3.stop()
        try:
            infos = [publisher._client.publish(m.topic, m.payload, 1) for m in during]
            wait_for(
                lambda: scrape(daemon, "hm_ingest_backpressure_active") == 1, 120, "back-pressure"
            )
            acked = scrape(daemon, "hm_ingest_messages_acked_total")
            assert acked < len(before) + len(during), "acks must stop while nothing commits"
            wait_for(
                lambda: "could not upload s3://" in httpx.get(readyz, timeout=5).text,
                60,
                "/readyz to report the store",
            )
            assert httpx.get(readyz, timeout=5).status_code == 503
        finally:
            s3.start()
        wait_for(lambda: all(i.is_published() for i in infos), 120, "the broker to take all")
        wait_for(
            lambda: scrape(daemon, "hm_ingest_messages_acked_total") >= len(before) + len(during),
            120,
            "every message logged and acknowledged after the store came back",
        )
        wait_for(lambda: scrape(daemon, "hm_ingest_backpressure_active") == 0, 60, "resume")
        wait_for(lambda: httpx.get(readyz, timeout=5).status_code == 200, 60, "ready again")
        publisher.close()

    assert await run_until(daemon, scenario, timeout_s=300) == 0
    assert_exactly_once(OutputStore.open(uri), before + during)


@pytest.mark.slow
def test_crash_mid_commit_is_replayed_onto_the_same_objects(
    broker: MosquittoBroker,
    certs: CertBundle,
    tmp_path: Path,
    s3: MotoS3,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SIGKILL right after the first object of a batch is stored: the restarted daemon replays the
    pending intent, removing that object from the store and writing the whole batch again."""
    uri = f"s3://{s3.new_bucket()}/hm"
    messages = list(stream(APP_ID, 400, seed=41, invalid_fraction=0.05))
    tree = daemon_config(broker, certs, tmp_path, overrides={"output": {"flush_age_s": 1.0}})
    s3_settings(tree, uri, monkeypatch)  # the child process inherits the environment
    daemon = DaemonProcess(write_toml(tree, tmp_path / "c.toml"), tmp_path / "daemon.log")
    monkeypatch.setenv(faultpoints.CRASH_ENV, "parquet.renamed:1")
    daemon.start()
    try:
        wait_ready(tree)
        with Publisher(broker, certs) as publisher:
            publisher.publish_many((m.topic, m.payload) for m in messages)
        assert daemon.wait(60) == -signal.SIGKILL, daemon.log_text()
        pending = CheckpointStore(tmp_path / "state" / "checkpoint.json").load().pending
        assert pending is not None, "the crash must hit a commit in progress"
        assert len(s3_files(uri, "telemetry") + s3_files(uri, "rejected")) == 1

        monkeypatch.delenv(faultpoints.CRASH_ENV)
        daemon.start()
        wait_ready(tree)  # the replay runs before the daemon serves /readyz
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(60) == 0, daemon.log_text()
    finally:
        daemon.kill()
    assert_exactly_once(OutputStore.open(uri), messages)
    names = [path.rsplit("/", 1)[1] for path in s3_files(uri, "telemetry")]
    assert part_file_name(pending.first_lsn, pending.last_lsn) in names
