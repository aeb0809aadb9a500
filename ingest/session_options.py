"""Settings → the options of an MQTT session: the daemon's own, or a lost replica's it adopts."""

from __future__ import annotations

from dataclasses import replace

from ingest.config import Settings
from ingest.mqtt import MqttOptions


def mqtt_options(settings: Settings) -> MqttOptions:
    mqtt = settings.mqtt
    # preflight refuses to start without these files, so they are set here.
    assert mqtt.ca_file is not None
    assert mqtt.cert_file is not None
    assert mqtt.key_file is not None
    return MqttOptions(
        host=mqtt.host,
        port=mqtt.port,
        client_id=replica_client_id(settings),
        topic=subscription_topic(settings),
        ca_file=mqtt.ca_file,
        cert_file=mqtt.cert_file,
        key_file=mqtt.key_file,
        protocol=mqtt.protocol,
        keepalive_s=mqtt.keepalive_s,
        session_expiry_s=mqtt.session_expiry_s,
        receive_maximum=mqtt.receive_maximum,
        verify_hostname=mqtt.verify_hostname,
        reconnect_min_s=mqtt.reconnect_min_s,
        reconnect_max_s=mqtt.reconnect_max_s,
    )


def replica_client_id(settings: Settings, replica: str | None = None) -> str:
    """The MQTT client id of ``replica`` (default: this daemon's own): one session per replica."""
    replica = settings.replica.id if replica is None else replica
    return f"{settings.mqtt.client_id}-{replica}" if replica else settings.mqtt.client_id


def subscription_topic(settings: Settings) -> str:
    """The configured topic, or as a shared subscription when running as one of several replicas.

    The broker then hands each message to one member of the group; a member's persistent session
    keeps its share queued while it is away (Mosquitto does not skip offline members), which is
    why a lost replica's session is adopted by the leader (ingest.replica).
    """
    topic = settings.mqtt.resolved_topic
    if settings.replica.enabled and not settings.replica.vin_sharded:
        return f"$share/{settings.replica.group}/{topic}"
    # VIN-sharded replicas subscribe per-VIN filters instead (ingest.replica.subscriptions).
    return topic


def adopted_session_options(settings: Settings, replica: str) -> MqttOptions:
    """Options to take over ``replica``'s persistent session (same topic, its client id)."""
    return replace(mqtt_options(settings), client_id=replica_client_id(settings, replica))
