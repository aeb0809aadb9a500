"""Publish test traffic to a :class:`~ingest.testing.broker.MosquittoBroker` over mutual TLS.

Two ways, for two jobs:

* :func:`publish_lines` pipes payloads into ``mosquitto_pub -l`` (one process per topic). The C
  client publishes about 145k msg/s over mTLS (hm-reference.md section 6): use it for bulk loads.
* :class:`Publisher` is a paho client for arbitrary topics and payloads (newlines, binary).

Both return only after the broker acknowledged every QoS 1 message (PUBACK), so a test can
assume the messages are queued for its subscribers.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Iterable
from types import TracebackType
from typing import Self

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

from ingest.testing.broker import MosquittoBroker
from ingest.testing.certs import CertBundle

Payload = bytes | str
DEFAULT_TIMEOUT_S = 60.0


def _as_bytes(payload: Payload) -> bytes:
    return payload.encode() if isinstance(payload, str) else payload


def publish_lines(
    broker: MosquittoBroker,
    certs: CertBundle,
    topic_payload_pairs: Iterable[tuple[str, Payload]],
    qos: int = 1,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> int:
    """Publish with ``mosquitto_pub -l``, one process per topic; returns the number published.

    Order is kept within a topic, not across topics. Payloads must not contain a newline, since
    ``-l`` sends one message per line.
    """
    binary = shutil.which("mosquitto_pub")
    if binary is None:
        raise RuntimeError(
            "mosquitto_pub is not on PATH; install it with `apt-get install -y mosquitto-clients` "
            "(Debian/Ubuntu) or `brew install mosquitto` (macOS)"
        )
    by_topic: dict[str, list[bytes]] = {}
    for topic, payload in topic_payload_pairs:
        data = _as_bytes(payload)
        if b"\n" in data:
            raise ValueError(f"payload for {topic!r} has a newline; use Publisher instead")
        by_topic.setdefault(topic, []).append(data)
    for topic, payloads in by_topic.items():
        argv = [
            binary,
            "-h", broker.host,
            "-p", str(broker.port),
            "--cafile", str(certs.ca_file),
            "--cert", str(certs.client_cert),
            "--key", str(certs.client_key),
            "-i", f"test-pub-{uuid.uuid4().hex[:12]}",
            "-q", str(qos),
            "-t", topic,
            "-l",
        ]  # fmt: skip
        # mosquitto_pub exits at end of input only after the last PUBACK (QoS 1) arrived.
        result = subprocess.run(
            argv,
            input=b"\n".join(payloads) + b"\n",
            capture_output=True,
            timeout=timeout_s,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"mosquitto_pub to {topic!r} failed ({result.returncode}): "
                f"{result.stderr.decode(errors='replace').strip()}"
            )
    return sum(len(p) for p in by_topic.values())


class Publisher:
    """A paho client that publishes and waits for the broker's PUBACKs. A context manager."""

    def __init__(
        self,
        broker: MosquittoBroker,
        certs: CertBundle,
        *,
        client_id: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self._broker = broker
        self._timeout_s = timeout_s
        self._connected = threading.Event()
        self._refused: ReasonCode | None = None
        self._client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id or f"test-pub-{uuid.uuid4().hex[:12]}",
            protocol=paho.MQTTv311,
        )
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile=str(certs.ca_file))
        ctx.load_cert_chain(str(certs.client_cert), str(certs.client_key))
        self._client.tls_set_context(ctx)
        self._client.on_connect = self._on_connect

    def _on_connect(
        self, _c: paho.Client, _u: object, _f: object, rc: ReasonCode, _p: object
    ) -> None:
        if rc.is_failure:
            self._refused = rc
        self._connected.set()

    def connect(self) -> None:
        self._client.connect(self._broker.host, self._broker.port)
        self._client.loop_start()
        if not self._connected.wait(self._timeout_s) or self._refused is not None:
            self.close()
            raise RuntimeError(f"publisher could not connect: {self._refused or 'timeout'}")

    def publish(self, topic: str, payload: Payload, qos: int = 1) -> None:
        """Publish one message and wait for its PUBACK."""
        self.publish_many([(topic, payload)], qos)

    def publish_many(self, topic_payload_pairs: Iterable[tuple[str, Payload]], qos: int = 1) -> int:
        """Publish in order, then wait until every message is acknowledged; returns the count."""
        infos = [
            self._client.publish(topic, _as_bytes(payload), qos)
            for topic, payload in topic_payload_pairs
        ]
        deadline = time.monotonic() + self._timeout_s
        for info in infos:
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                raise RuntimeError(f"publish failed: {paho.error_string(info.rc)}")
            info.wait_for_publish(max(0.0, deadline - time.monotonic()))
            if not info.is_published():
                raise TimeoutError(f"no PUBACK for mid {info.mid} within {self._timeout_s:g} s")
        return len(infos)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> Self:
        self.connect()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
