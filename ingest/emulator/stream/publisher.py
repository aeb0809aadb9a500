"""The stream's MQTT client: paho over mutual TLS, QoS 1, PUBACKs counted.

``publish`` only queues the message in paho (thread-safe, no waiting), so the pacing loop on the
event loop never blocks on the network; paho's own thread sends and receives the PUBACKs. After
the first connection paho reconnects by itself and re-sends unacknowledged QoS 1 messages.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Callable

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from ingest.emulator.stream.config import BrokerTarget

CONNECT_TIMEOUT_S = 10.0
# QoS 1 messages paho keeps in flight before queueing locally. paho 2.2 walks the in-flight
# messages on every PUBACK (Client._update_inflight), so the window costs per ack: measured on a
# busy 2-core machine, 1000 in flight capped the stream at ~3.1k msg/s, 100 at ~7.9k (30: ~7.7k).
# 100 keeps enough in flight for a broker a few milliseconds away.
MAX_INFLIGHT = 100
KEEPALIVE_S = 30
RECONNECT_MAX_S = 5


class StreamConnectError(Exception):
    """The broker refused or could not be reached; the message names the broker and the cause."""


class MqttPublisher:
    def __init__(self, target: BrokerTarget, on_ack: Callable[[], None]) -> None:
        self.target = target
        self._on_ack = on_ack
        self._connected = threading.Event()
        self._first_answer = threading.Event()
        self._refused: str | None = None
        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=target.client_id,
            protocol=paho.MQTTv311,
        )
        try:
            ctx = ssl.create_default_context(cafile=str(target.ca_file))
            ctx.load_cert_chain(str(target.cert_file), str(target.key_file))
            # The chain is verified either way (CERT_REQUIRED); only the name check can go.
            ctx.check_hostname = target.verify_hostname
        except (OSError, ssl.SSLError) as exc:
            raise StreamConnectError(
                f"cannot load the stream's TLS files (--mqtt-ca {target.ca_file}, --mqtt-cert "
                f"{target.cert_file}, --mqtt-key {target.key_file}): {exc}"
            ) from exc
        client.tls_set_context(ctx)
        client.max_inflight_messages_set(MAX_INFLIGHT)
        client.reconnect_delay_set(1, RECONNECT_MAX_S)
        client.on_connect = self._connected_cb
        client.on_disconnect = self._disconnected_cb
        client.on_publish = self._published_cb
        self._client = client

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def _connected_cb(
        self, _c: paho.Client, _u: object, _f: object, rc: ReasonCode, _p: object
    ) -> None:
        if rc.is_failure:
            self._refused = str(rc)
        else:
            self._connected.set()
        self._first_answer.set()

    def _disconnected_cb(
        self, _c: paho.Client, _u: object, _f: object, _rc: ReasonCode, _p: object
    ) -> None:
        self._connected.clear()

    def _published_cb(
        self, _c: paho.Client, _u: object, _mid: int, _rc: ReasonCode, _p: object
    ) -> None:
        self._on_ack()

    def connect(self, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        """Connect (blocking, up to ``timeout_s``); raises :class:`StreamConnectError`."""
        where = f"{self.target.host}:{self.target.port}"
        try:
            self._client.connect(self.target.host, self.target.port, KEEPALIVE_S)
        except (OSError, ssl.SSLError) as exc:
            raise StreamConnectError(f"cannot connect to the MQTT broker {where}: {exc}") from exc
        self._client.loop_start()
        if not self._first_answer.wait(timeout_s) or self._refused is not None:
            self.close()
            cause = self._refused or f"no CONNACK within {timeout_s:g} s"
            raise StreamConnectError(f"the MQTT broker {where} did not accept the stream: {cause}")

    def publish(self, topic: str, payload: bytes) -> None:
        # While disconnected paho queues QoS 1 messages and sends them after reconnecting.
        self._client.publish(topic, payload, qos=1)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
