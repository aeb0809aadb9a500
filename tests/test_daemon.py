"""End to end: the real daemon against a real mutual-TLS Mosquitto, output read back."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import orjson
import pytest
from prometheus_client import CollectorRegistry

from ingest.app import Daemon
from ingest.config import Settings
from ingest.errors import CredentialError
from ingest.testing import CertBundle, MosquittoBroker, Publisher
from ingest.testing.daemon import APP_ID, daemon_config, wait_for
from ingest.testing.traffic import invalid_message, make_vin, stream, v1_message, v2_message
from tests.daemon_support import message_ids, read_table


def _settings(broker: MosquittoBroker, certs: CertBundle, tmp_path: Path, **over: dict) -> Settings:
    return Settings.model_validate(daemon_config(broker, certs, tmp_path, overrides=over))


async def _run_until(daemon: Daemon, condition, timeout_s: float = 30.0) -> int:  # type: ignore[no-untyped-def]
    task = asyncio.create_task(daemon.run())
    try:
        async with asyncio.timeout(timeout_s):
            await daemon.started.wait()
            yield_value = await asyncio.to_thread(condition)
            assert yield_value is None
    finally:
        daemon.shutdown.set()
    return await asyncio.wait_for(task, 30)


async def test_v1_and_v2_round_trip_value_by_value(
    broker: MosquittoBroker, certs: CertBundle, tmp_path: Path
) -> None:
    base = dt.datetime(2026, 11, 28, 12, tzinfo=dt.UTC)
    vin = make_vin(1)
    v1 = v1_message(APP_ID, vin, "v1-odometer", 0, base)
    v1_bool = v1_message(APP_ID, vin, "v1-ignition", 2, base)
    v1_coords = v1_message(APP_ID, vin, "v1-coordinates", 3, base)
    v2 = v2_message(APP_ID, vin, "v2-envelope", 5, base)
    bad = invalid_message(APP_ID, vin, "bad-vin", 1)
    settings = _settings(broker, certs, tmp_path)
    daemon = Daemon(settings, registry=CollectorRegistry())

    def publish() -> None:
        with Publisher(broker, certs) as publisher:
            publisher.publish_many((m.topic, m.payload) for m in (v1, v1_bool, v1_coords, v2, bad))
        wait_for(lambda: _scrape(daemon, "hm_ingest_messages_acked_total") == 5, 30, "5 acks")

    code = await _run_until(daemon, publish)
    assert code == 0

    rows = read_table(settings.output.path, "telemetry")
    by_key = {(r["message_id"], r["property"]): r for r in rows}
    assert len(rows) == 1 + 1 + 1 + 4
    odometer = by_key[("v1-odometer", "odometer")]
    assert odometer["vin"] == vin
    assert odometer["capability"] == "diagnostics"
    assert odometer["value_number"] == pytest.approx(1000.0)
    assert odometer["value_unit"] == "kilometers"
    assert odometer["timestamp"] == base
    assert odometer["payload_version"] == 1
    ignition = by_key[("v1-ignition", "status")]
    assert ignition["value_string"] == "off"
    coords = by_key[("v1-coordinates", "coordinates")]
    sent = orjson.loads(v1_coords.payload)["data"]["vehicle_location"]["coordinates"]["data"]
    assert orjson.loads(coords["value_json"]) == sent
    battery = by_key[("v2-envelope", "battery_level")]
    assert battery["value_number"] == pytest.approx(0.05)
    assert battery["payload_version"] == 2
    failure = by_key[("v2-envelope", "charging_rate")]
    assert failure["failure_reason"] == "unknown"
    assert failure["failure_description"] == "no data"
    assert failure["value_number"] is None
    assert sorted(r["item_index"] for r in rows if r["message_id"] == "v2-envelope") == [0, 1, 2, 3]

    rejected = read_table(settings.output.path, "rejected")
    assert [r["reason"] for r in rejected] == ["vin_mismatch"]
    assert rejected[0]["payload"] == bad.payload
    assert rejected[0]["topic"] == bad.topic

    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for metric in daemon.metrics.registry.collect()
        for s in metric.samples
    }
    assert samples[("hm_ingest_messages_received_total", ())] == 5
    assert samples[("hm_ingest_messages_acked_total", ())] == 5
    assert samples[("hm_ingest_rows_written_total", (("table", "telemetry"),))] == 7
    assert samples[("hm_ingest_messages_rejected_total", (("reason", "vin_mismatch"),))] == 1


async def test_duplicates_are_dropped_within_and_across_batches(
    broker: MosquittoBroker, certs: CertBundle, tmp_path: Path
) -> None:
    messages = list(stream(APP_ID, 200, seed=3))
    settings = _settings(broker, certs, tmp_path)

    for _ in range(2):
        # The second run receives the same messages again: it must not add rows either.
        daemon = Daemon(settings, registry=CollectorRegistry())

        def publish_twice(daemon: Daemon = daemon) -> None:
            with Publisher(broker, certs) as publisher:
                publisher.publish_many((m.topic, m.payload) for m in messages)
                publisher.publish_many((m.topic, m.payload) for m in messages[:50])
            wait_for(
                lambda: _scrape(daemon, "hm_ingest_messages_acked_total") >= 250,
                30,
                "the daemon to receive every copy",
            )

        assert await _run_until(daemon, publish_twice) == 0
    counts = message_ids(settings.output.path)
    assert set(counts) == {m.message_id for m in messages}
    assert max(counts.values()) == 1
    rows = read_table(settings.output.path, "telemetry")
    assert len(rows) == sum(m.items for m in messages)


def _scrape(daemon: Daemon, name: str) -> float:
    for metric in daemon.metrics.registry.collect():
        for sample in metric.samples:
            if sample.name == name and not sample.labels:
                return float(sample.value)
    raise AssertionError(f"metric {name} not found")


async def test_unwritable_output_pauses_acks_and_recovers_when_writable_again(
    broker: MosquittoBroker, certs: CertBundle, tmp_path: Path
) -> None:
    messages = list(stream(APP_ID, 3000, seed=5))
    settings = _settings(
        broker,
        certs,
        tmp_path,
        state={"log_max_bytes": 1024 * 1024, "log_segment_bytes": 64 * 1024},
        output={"flush_age_s": 0.2, "path": str(tmp_path / "data")},
    )
    # A file where the telemetry folder belongs: every flush fails (ENOTDIR) until it is removed.
    blocker = settings.output.path / "telemetry"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("not a folder")
    daemon = Daemon(settings, registry=CollectorRegistry())
    publisher = Publisher(broker, certs, timeout_s=120)

    def scenario() -> None:
        publisher.connect()
        infos = [publisher._client.publish(m.topic, m.payload, 1) for m in messages]
        wait_for(lambda: _scrape(daemon, "hm_ingest_backpressure_active") == 1, 30, "back-pressure")
        acked = _scrape(daemon, "hm_ingest_messages_acked_total")
        # Whichever cap engages first (the sink's queue of logged groups, or the log's 1 MiB of
        # uncommitted records: tests/test_intake.py covers each), acks stop well short of all.
        assert acked < len(messages), "acks must stop while the output cannot be written"
        blocker.unlink()
        wait_for(lambda: all(i.is_published() for i in infos), 60, "the broker to take all")
        wait_for(
            lambda: _scrape(daemon, "hm_ingest_messages_acked_total") >= len(messages),
            60,
            "the daemon to log and ack every message after recovery",
        )
        wait_for(lambda: _scrape(daemon, "hm_ingest_backpressure_active") == 0, 30, "resume")
        publisher.close()

    assert await _run_until(daemon, scenario, timeout_s=120) == 0
    counts = message_ids(settings.output.path)
    assert set(counts) == {m.message_id for m in messages}
    assert max(counts.values()) == 1


async def test_wrong_ca_fails_start_with_clear_error(
    broker: MosquittoBroker, certs: CertBundle, tmp_path: Path
) -> None:
    settings = _settings(broker, certs, tmp_path, mqtt={"ca_file": str(certs.other_ca_file)})
    daemon = Daemon(settings, registry=CollectorRegistry())
    with pytest.raises(CredentialError, match=str(certs.other_ca_file)):
        await asyncio.wait_for(daemon.run(), 30)
