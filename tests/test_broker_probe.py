"""``hm-ingest check --broker`` against a real mutual-TLS Mosquitto: what the broker offers, what
it refuses, and that asking leaves nothing behind."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ingest.broker_probe import CLIENT_ID_SUFFIX, broker_findings, probe_broker
from ingest.config import Settings
from ingest.mqtt import MqttOptions, tls_context
from ingest.preflight import Finding, Level
from ingest.testing.broker import MosquittoBroker, free_port
from ingest.testing.certs import CertBundle
from ingest.testing.daemon import daemon_config, write_toml
from tests.test_cli import hm_ingest
from tests.test_mqtt_filters import AccessControlledBroker


def _options(broker: MosquittoBroker, certs: CertBundle, topic: str) -> MqttOptions:
    return MqttOptions(
        host=broker.host,
        port=broker.port,
        client_id=f"probe-{uuid.uuid4().hex[:8]}",
        topic=topic,
        ca_file=certs.ca_file,
        cert_file=certs.client_cert,
        key_file=certs.client_key,
    )


def _settings(
    broker: MosquittoBroker, certs: CertBundle, tmp_path: Path, **sections: dict[str, Any]
) -> Settings:
    tree = daemon_config(broker, certs, tmp_path, overrides=sections)
    return Settings.model_validate(tree)


def _session_left(options: MqttOptions, client_id: str) -> bool:
    """Whether the broker kept a session for ``client_id`` (connect with clean start off)."""
    present: list[bool] = []
    client = paho.Client(
        callback_api_version=paho.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=paho.MQTTv5,
    )
    client.tls_set_context(tls_context(options))
    client.on_connect = lambda _c, _u, flags, _r, _p: present.append(flags.session_present)
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = 0
    client.connect(options.host, options.port, clean_start=False, properties=properties)
    for _ in range(100):
        client.loop(0.05)
        if present:
            break
    client.disconnect()
    assert present, "no CONNACK"
    return present[0]


def test_the_probe_reports_what_mosquitto_offers_and_leaves_no_session(
    broker: MosquittoBroker, certs: CertBundle
) -> None:
    options = _options(broker, certs, "live/level13/app/#")
    report = probe_broker(options)
    assert report.protocol == "5"
    assert report.client_id == options.client_id + CLIENT_ID_SUFFIX
    assert report.features == {
        "shared subscriptions": True,
        "subscription identifiers": True,
        "wildcard subscriptions": True,
    }
    assert report.topic.granted
    assert report.topic.topic_filter == "live/level13/app/#"
    assert report.shared.granted
    assert report.shared.topic_filter.startswith("$share/hm-ingest-check-")
    assert not _session_left(options, report.client_id)


@pytest.fixture
def guarded(tmp_path: Path, certs: CertBundle) -> Iterator[MosquittoBroker]:
    with AccessControlledBroker(tmp_path / "guarded", certs) as running:
        yield running


def test_a_topic_the_acl_refuses_is_an_error_naming_it(
    guarded: MosquittoBroker, certs: CertBundle, tmp_path: Path
) -> None:
    settings = _settings(guarded, certs, tmp_path, mqtt={"topic": "forbidden/{app_id}/#"})
    findings = list(broker_findings(settings))
    [refused] = [f for f in findings if f.level == Level.ERROR]
    assert refused.key == "mqtt.topic"
    assert "refused a subscription to forbidden/" in refused.message
    assert "Not authorized" in refused.message


def test_findings_say_which_replica_modes_the_broker_allows(
    broker: MosquittoBroker, certs: CertBundle, tmp_path: Path
) -> None:
    settings = _settings(broker, certs, tmp_path, mqtt={"protocol": "5"})
    findings = {f.key: f for f in broker_findings(settings)}
    assert all(f.level == Level.OK for f in findings.values()), findings
    assert f"{broker.host}:{broker.port} answered over MQTT 5" in findings["mqtt.host"].message
    assert "can spread V2 envelopes" in findings["mqtt.protocol"].message
    assert "shared subscriptions work" in findings["replica.mode"].message


def test_an_unreachable_broker_is_an_error(
    broker: MosquittoBroker, certs: CertBundle, tmp_path: Path
) -> None:
    settings = _settings(broker, certs, tmp_path, mqtt={"port": free_port()})
    [finding] = list(broker_findings(settings, timeout_s=5.0))
    assert finding == Finding(Level.ERROR, "mqtt.host", finding.message)
    assert "cannot connect" in finding.message


def test_check_asks_the_broker_only_when_told(
    broker: MosquittoBroker, certs: CertBundle, tmp_path: Path
) -> None:
    config = write_toml(daemon_config(broker, certs, tmp_path), tmp_path / "ingest.toml")
    plain = hm_ingest("check", "--config", str(config), cwd=tmp_path)
    assert "answered over MQTT" not in plain.stdout
    asked = hm_ingest("check", "--broker", "--config", str(config), cwd=tmp_path)
    assert asked.returncode == 0, asked.stdout + asked.stderr
    assert "answered over MQTT 5" in asked.stdout
    assert "shared subscriptions work" in asked.stdout
