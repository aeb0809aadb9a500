"""/metrics of a real daemon passes `promtool check metrics`, and no label carries a VIN or topic.

The daemon runs against a real mutual-TLS Mosquitto, receives valid, invalid and repeated
messages, and is scraped over HTTP like Prometheus does. promtool comes from Debian's
`prometheus` package (.ci/run installs it); without it these tests skip, naming the fix.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from ingest.app import Daemon
from ingest.config import Settings
from ingest.metrics import Metrics
from ingest.testing import CertBundle, MosquittoBroker, Publisher
from ingest.testing.daemon import APP_ID, daemon_config, wait_for
from ingest.testing.traffic import Message, invalid_message, make_vin, v1_message, v2_message

VIN_SHAPE = re.compile(r"^[A-HJ-NPR-Z0-9]{17}$")


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip(
            "promtool is not installed: `apt-get install -y --no-install-recommends prometheus` "
            "(Debian) provides it, and .ci/run installs it"
        )
    return found


def _check_metrics(text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_promtool(), "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _traffic() -> list[Message]:
    base = dt.datetime(2026, 11, 28, 12, tzinfo=dt.UTC)
    vins = [make_vin(i) for i in range(3)]
    good = [v1_message(APP_ID, vin, f"ok-v1-{i}", i, base) for i, vin in enumerate(vins)]
    good.append(v2_message(APP_ID, vins[0], "ok-v2", 5, base))
    # One of each kind of damage: truncated JSON, VIN mismatch, unsupported version.
    bad = [invalid_message(APP_ID, vins[1], f"bad-{seq}", seq) for seq in range(3)]
    # A redelivery of a message already sent: dropped as a duplicate, never a new label.
    return [*good, *bad, good[0]]


def _sample_value(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return None


async def test_scrape_of_a_running_daemon_passes_promtool_with_bounded_labels(
    broker: MosquittoBroker, certs: CertBundle, tmp_path: Path
) -> None:
    _promtool()  # skip before starting anything when promtool is missing
    messages = _traffic()
    settings = Settings.model_validate(daemon_config(broker, certs, tmp_path))
    daemon = Daemon(settings, registry=CollectorRegistry())
    task = asyncio.create_task(daemon.run())
    scraped: list[str] = []

    def publish_and_scrape() -> None:
        with Publisher(broker, certs) as publisher:
            publisher.publish_many((m.topic, m.payload) for m in messages)
        url = f"http://127.0.0.1:{daemon.http_port}/metrics"

        def committed() -> bool:
            text = httpx.get(url, timeout=5).text
            scraped[:] = [text]
            return _sample_value(text, "hm_ingest_duplicates_total") == 1 and (
                sum(
                    _sample_value(text, "hm_ingest_messages_rejected_total", reason=r) or 0
                    for r in ("invalid_json", "vin_mismatch", "unsupported_version")
                )
                == 3
            )

        wait_for(committed, 30, "the duplicate and the three rejections to be committed")

    try:
        async with asyncio.timeout(60):
            await daemon.started.wait()
            await asyncio.to_thread(publish_and_scrape)
    finally:
        daemon.shutdown.set()
    assert await asyncio.wait_for(task, 30) == 0

    (text,) = scraped
    result = await asyncio.to_thread(_check_metrics, text)
    # promtool prints lint findings and exits non-zero on any; none is accepted.
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""

    assert _sample_value(text, "hm_ingest_messages_received_total") == len(messages)
    assert _sample_value(text, "hm_ingest_rows_written_total", table="rejected") == 3

    forbidden = {m.vin for m in messages} | {m.topic for m in messages}
    forbidden |= {m.message_id for m in messages}
    # The VIN-mismatch message carries a second VIN in its payload.
    payloads = b"".join(m.payload for m in messages).decode()
    forbidden |= set(re.findall(r'"vin":\s*"([A-Z0-9]{17})"', payloads))
    label_values = {
        value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        for value in sample.labels.values()
    }
    assert label_values
    leaked = {
        value
        for value in label_values
        if value in forbidden or VIN_SHAPE.match(value) or "/" in value
    }
    assert not leaked


def test_every_declared_metric_passes_promtool_lint() -> None:
    # The scrape above shows only metrics the run touched; a labelled metric appears once a
    # label value is used. Use one value of each here so promtool lints the whole catalogue.
    metrics = Metrics(CollectorRegistry())
    metrics.reconnects.labels("connection_lost").inc()
    for table in ("telemetry", "rejected"):
        metrics.rows_written.labels(table).inc()
        metrics.files_committed.labels(table).inc()
        metrics.bytes_written.labels(table).inc(1024)
    metrics.messages_rejected.labels("invalid_json").inc()
    metrics.clearance_vehicles.labels("approved").set(3)
    metrics.api_requests.labels("fleet_vehicles_list", "200").inc()
    metrics.api_latency.labels("fleet_vehicles_list").observe(0.12)
    metrics.api_retries.labels("server_error").inc()
    metrics.webhooks.labels("accepted").inc()
    text = generate_latest(metrics.registry).decode()
    declared = [m for m in vars(metrics).values() if isinstance(m, MetricWrapperBase)]
    exposed = [line for line in text.splitlines() if line.startswith("# TYPE ")]
    # Every declared metric now has samples (counters also expose a *_created gauge family).
    names = {family.name for family in text_string_to_metric_families(text)}
    # An Info named hm_ingest_build is exposed as hm_ingest_build_info.
    missing = [m._name for m in declared if not {m._name, f"{m._name}_info"} & names]
    assert not missing
    assert exposed
    result = _check_metrics(text)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_promtool_lint_can_fail() -> None:
    # A counter without _total and without HELP: the lint must object, or the tests above prove
    # nothing.
    result = _check_metrics("# TYPE hm_ingest_bad counter\nhm_ingest_bad 1\n")
    assert result.returncode != 0
    assert "hm_ingest_bad" in result.stdout + result.stderr
