"""The vehicle stream against a real mutual-TLS Mosquitto and the emulator on real HTTP.

A paho subscriber (same throwaway PKI) records everything the broker delivers; the emulator's
clearances are driven through its REST and admin endpoints, as a client would.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import orjson
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from ingest.decode import Decoder
from ingest.emulator import Behaviour, Delays, EmulatorConfig, EmulatorServer, ManualClock
from ingest.emulator.stream import (
    BAD_KINDS,
    MALFORMED_KINDS,
    BrokerTarget,
    StreamConfig,
    StreamConnectError,
    StreamSettings,
)
from ingest.testing.accounting import payload_message_id
from ingest.testing.broker import MosquittoBroker
from ingest.testing.certs import CertBundle

APP_ID = "6a1f0c2e-3b4d-4e5f-8a9b-0c1d2e3f4a5b"
# Decisions come only from the admin endpoint: nothing is decided by the clock during a test.
CONFIG = EmulatorConfig(behaviour=Behaviour(delays=Delays(3600.0, 0.0, 0.0), cancel_min_age_s=0.0))
APPROVED = "WHMSTRMTEST000001"
ALSO_APPROVED = "WHMSTRMTEST000002"
REJECTED = "WHMSTRMTEST00000R"
PENDING = "WHMSTRMTEST000003"
WAIT_S = 20.0


class Subscriber:
    """Collects (topic, payload) for everything under the app's topics."""

    def __init__(self, broker: MosquittoBroker, certs: CertBundle) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"test-sub-{uuid.uuid4().hex[:8]}",
        )
        ctx = ssl.create_default_context(cafile=str(certs.ca_file))
        ctx.load_cert_chain(str(certs.client_cert), str(certs.client_key))
        client.tls_set_context(ctx)
        client.on_connect = lambda c, *_: c.subscribe(f"live/level13/{APP_ID}/#", qos=1)
        client.on_subscribe = lambda *_: self._subscribed.set()
        client.on_message = self._on_message
        client.connect(broker.host, broker.port)
        client.loop_start()
        assert self._subscribed.wait(10), "subscriber did not subscribe"
        self._client = client

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload)))

    def snapshot(self) -> list[tuple[str, bytes]]:
        with self._lock:
            return list(self.messages)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


@pytest.fixture
def subscriber(broker: MosquittoBroker, certs: CertBundle) -> Iterator[Subscriber]:
    sub = Subscriber(broker, certs)
    yield sub
    sub.close()


def stream_config(broker: MosquittoBroker, certs: CertBundle, **settings: Any) -> StreamConfig:
    defaults: dict[str, Any] = {"app_id": APP_ID, "rate": 200.0, "seed": 11}
    return StreamConfig(
        StreamSettings(**{**defaults, **settings}),
        BrokerTarget(
            broker.host,
            broker.port,
            certs.ca_file,
            certs.client_cert,
            certs.client_key,
            f"test-stream-{uuid.uuid4().hex[:8]}",
        ),
    )


class Emu:
    """The emulator with a stream, driven over HTTP."""

    def __init__(self, server: EmulatorServer, http: httpx.AsyncClient) -> None:
        self.server = server
        self.http = http
        info = server.info()
        self.info = info
        self.base_url = info["base_url"]
        self.admin_url = info["admin_url"]

    async def register(self, *vins: str) -> None:
        token = await self.http.post(
            f"{self.base_url}/access_tokens",
            json={
                "client_id": self.info["client_id"],
                "client_secret": self.info["client_secret"],
                "grant_type": "client_credentials",
            },
        )
        self.token = token.json()["access_token"]
        body = {"vehicles": [{"vin": vin, "brand": "sandbox"} for vin in vins]}
        response = await self.http.post(
            f"{self.base_url}/fleets/vehicles",
            json=body,
            headers={"Authorization": f"Bearer {self.token}"},
        )
        assert response.status_code == 200, response.text

    async def decide(self, vin: str, status: str) -> None:
        response = await self.http.post(
            f"{self.admin_url}/vehicles/{vin}/outcome", json={"status": status}
        )
        assert response.status_code == 200, response.text

    async def revoke(self, vin: str) -> None:
        response = await self.http.delete(
            f"{self.base_url}/fleets/vehicles/{vin}",
            headers={"Authorization": f"Bearer {self.token}"},
        )
        assert response.status_code < 300, response.text

    async def stream(self) -> dict[str, Any]:
        response = await self.http.get(f"{self.admin_url}/stream")
        assert response.status_code == 200, response.text
        return dict(response.json())

    async def put_stream(self, **changes: Any) -> httpx.Response:
        return await self.http.put(f"{self.admin_url}/stream", json=changes)


async def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    """Poll ``condition`` (state owned by paho's and the emulator's threads) with a deadline."""
    try:
        async with asyncio.timeout(timeout_s):
            while not condition():  # noqa: ASYNC110
                await asyncio.sleep(0.02)
    except TimeoutError:
        pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}")


async def stream_drained(emu: Emu, sub: Subscriber) -> dict[str, Any]:
    """Pause, wait for every PUBACK and for the subscriber to hold every publish; the counters."""
    assert (await emu.put_stream(paused=True)).status_code == 200
    stream = emu.server.stream
    assert stream is not None
    await wait_until(lambda: stream.counters.unacked == 0, "every publish acknowledged")
    sent = stream.counters.sent
    await wait_until(lambda: len(sub.snapshot()) >= sent, f"{sent} messages delivered")
    return await emu.stream()


@pytest.fixture
async def emu_factory(
    tmp_path: Path, broker: MosquittoBroker, certs: CertBundle
) -> AsyncIterator[Callable[..., Any]]:
    servers: list[EmulatorServer] = []
    http = httpx.AsyncClient(timeout=10)

    async def start(**settings: Any) -> Emu:
        server = EmulatorServer(
            tmp_path / f"emulator-{len(servers)}",
            config=CONFIG,
            clock=ManualClock(),
            stream=stream_config(broker, certs, **settings),
        )
        await server.__aenter__()
        servers.append(server)
        return Emu(server, http)

    yield start
    for server in servers:
        await server.__aexit__(None, None, None)
    await http.aclose()


async def test_streams_only_approved_vins_and_everything_decodes(
    emu_factory: Callable[..., Any], subscriber: Subscriber
) -> None:
    emu = await emu_factory(duplicate_rate=0.05, bad_rate=0.05, failure_rate=0.1)
    await emu.register(APPROVED, ALSO_APPROVED, REJECTED, PENDING)
    await emu.decide(REJECTED, "rejected")
    assert (await emu.stream())["streaming"] == []
    await emu.decide(APPROVED, "approved")
    await emu.decide(ALSO_APPROVED, "approved")
    await wait_until(lambda: len(subscriber.snapshot()) >= 300, "300 messages")
    counters = await stream_drained(emu, subscriber)

    assert counters["streaming"] == [APPROVED, ALSO_APPROVED]
    decoder = Decoder(app_id=APP_ID)
    rows: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    seen: set[str] = set()
    for topic, payload in subscriber.snapshot():
        result = decoder.decode(topic, payload, 0)
        assert result.vin in (APPROVED, ALSO_APPROVED) or result.rejection is not None
        if result.rejection is not None:
            reasons[result.rejection.reason] += 1
        elif result.message_id not in seen:  # a repeat adds no rows once deduplicated
            seen.add(result.message_id or "")
            rows[result.vin or ""] += len(result.rows)
    totals = counters["totals"]
    assert sum(reasons.values()) == totals["bad"] > 0
    assert set(reasons) <= set(BAD_KINDS.values())
    assert totals["failures"] > 0
    for vin in (APPROVED, ALSO_APPROVED):
        assert rows[vin] == counters["vehicles"][vin]["items"] > 0
    assert set(counters["vehicles"]) == {APPROVED, ALSO_APPROVED}
    assert totals["sent"] == totals["acked"] == len(subscriber.snapshot())
    assert totals["by_version"].keys() == {"v1", "v2"}  # format "both"


async def test_duplicates_repeat_an_earlier_message_exactly(
    emu_factory: Callable[..., Any], subscriber: Subscriber
) -> None:
    emu = await emu_factory(duplicate_rate=0.3, bad_rate=0.0, format="v1")
    await emu.register(APPROVED)
    await emu.decide(APPROVED, "approved")
    await wait_until(lambda: len(subscriber.snapshot()) >= 200, "200 messages")
    counters = await stream_drained(emu, subscriber)

    by_id: dict[str, set[bytes]] = {}
    deliveries: Counter[str] = Counter()
    for topic, payload in subscriber.snapshot():
        message_id = orjson.loads(payload)["message_id"]
        by_id.setdefault(message_id, set()).add(topic.encode() + b" " + payload)
        deliveries[message_id] += 1
    repeats = sum(n - 1 for n in deliveries.values())
    assert repeats == counters["totals"]["duplicates"] > 0
    assert all(len(copies) == 1 for copies in by_id.values()), "a repeat must be byte-identical"
    assert len(by_id) == counters["totals"]["messages"]


async def test_stream_stops_on_revocation_and_restarts_on_new_approval(
    emu_factory: Callable[..., Any], subscriber: Subscriber
) -> None:
    emu = await emu_factory(rate=100.0)
    await emu.register(APPROVED)
    await emu.decide(APPROVED, "approved")
    await wait_until(lambda: len(subscriber.snapshot()) >= 20, "first messages")
    await emu.revoke(APPROVED)  # approved → revoking: HM stops the data
    stream = emu.server.stream
    assert stream is not None
    await wait_until(lambda: stream.streaming == (), "the stream to drop the VIN")
    sent = stream.counters.sent
    # Absence of traffic needs a window: several pacing ticks and store refreshes.
    await asyncio.sleep(0.5)
    assert stream.counters.sent == sent

    # The revoke delay is 0, so the store has moved on to revoked; a POST starts a new clearance.
    await emu.register(APPROVED)
    await emu.decide(APPROVED, "approved")
    await wait_until(lambda: stream.counters.sent > sent, "the stream to resume")


async def test_pause_and_runtime_changes(
    emu_factory: Callable[..., Any], subscriber: Subscriber
) -> None:
    emu = await emu_factory(paused=True)
    await emu.register(APPROVED)
    await emu.decide(APPROVED, "approved")
    stream = emu.server.stream
    assert stream is not None
    await wait_until(lambda: stream.streaming == (APPROVED,), "the VIN to be streaming")
    await asyncio.sleep(0.3)  # several ticks: paused means nothing is sent
    assert stream.counters.sent == 0

    bad = await emu.put_stream(bad_rate=2)
    assert bad.status_code == 400
    assert "bad_rate" in bad.text
    assert (await emu.put_stream(seed=3)).status_code == 400
    assert (await emu.put_stream(paused="no")).status_code == 400
    changed = await emu.put_stream(paused=False, vehicle_rate=50, format="v2")
    assert changed.status_code == 200, changed.text
    settings = changed.json()["settings"]
    assert (settings["vehicle_rate"], settings["rate"], settings["format"]) == (50, None, "v2")
    await wait_until(lambda: len(subscriber.snapshot()) >= 10, "messages after resuming")
    counters = await stream_drained(emu, subscriber)
    assert counters["totals"]["by_version"].keys() == {"v2"}


async def test_publish_rate_never_exceeds_the_setting(
    emu_factory: Callable[..., Any], subscriber: Subscriber
) -> None:
    rate = 100.0
    emu = await emu_factory(rate=rate)
    await emu.register(APPROVED, ALSO_APPROVED)
    loop = asyncio.get_running_loop()
    started = loop.time()
    # One clock step past the decision delay approves both in the same settle, so they start
    # streaming together (the default rules approve VINs not ending in R).
    response = await emu.http.post(f"{emu.admin_url}/advance", json={"seconds": 3600})
    assert [c["status"] for c in response.json()["changes"]] == ["approved", "approved"]
    await wait_until(lambda: len(subscriber.snapshot()) >= 150, "150 messages")
    stream = emu.server.stream
    assert stream is not None
    sent, elapsed = stream.counters.sent, loop.time() - started
    # Pacing can fall behind on a busy machine but never runs ahead: at most one second's worth
    # of saved-up slots on top of rate x time.
    assert sent <= rate * elapsed + rate + 1
    per_vin = (await emu.stream())["vehicles"]
    counts = [per_vin[v]["messages"] + per_vin[v]["bad"] + per_vin[v]["duplicates"]
              for v in (APPROVED, ALSO_APPROVED)]  # fmt: skip
    assert abs(counts[0] - counts[1]) <= 1, "round-robin shares the rate evenly"


async def test_extra_vehicles_are_cleared_and_streamed(
    emu_factory: Callable[..., Any], subscriber: Subscriber
) -> None:
    emu = await emu_factory(vehicles=5, rate=None, vehicle_rate=20.0)
    stream = emu.server.stream
    assert stream is not None
    assert len(stream.streaming) == 5
    assert stream.settings.messages_per_s(len(stream.streaming)) == 100.0
    await wait_until(
        lambda: (
            {orjson.loads(p).get("vin") for _, p in subscriber.snapshot()} >= set(stream.streaming)
        ),
        "every extra VIN to publish",
    )


async def test_malformed_messages_are_counted_as_bad_and_quarantined_as_not_json(
    emu_factory: Callable[..., Any], subscriber: Subscriber
) -> None:
    emu = await emu_factory(duplicate_rate=0.0, bad_rate=0.0, malformed_rate=0.3, format="v1")
    assert (await emu.put_stream(malformed_rate=0.9, bad_rate=0.2)).status_code == 400
    await emu.register(APPROVED)
    await emu.decide(APPROVED, "approved")
    await wait_until(lambda: len(subscriber.snapshot()) >= 200, "200 messages")
    counters = await stream_drained(emu, subscriber)

    assert counters["settings"]["malformed_rate"] == 0.3
    decoder = Decoder(app_id=APP_ID)
    reasons: Counter[str] = Counter()
    good_ids: set[str] = set()
    quarantined_ids: list[str | None] = []
    for topic, payload in subscriber.snapshot():
        result = decoder.decode(topic, payload, 0)
        if result.rejection is None:
            good_ids.add(result.message_id or "")
        else:
            reasons[result.rejection.reason] += 1
            quarantined_ids.append(payload_message_id(payload))
    totals = counters["totals"]
    assert set(reasons) <= set(MALFORMED_KINDS.values())
    assert sum(reasons.values()) == totals["bad"] == sum(totals["bad_kinds"].values()) > 0
    assert set(totals["bad_kinds"]) <= set(MALFORMED_KINDS)
    assert counters["vehicles"][APPROVED]["bad"] == totals["bad"]
    # Every malformed message has its own id, readable from the raw bytes, unlike any good one.
    assert None not in quarantined_ids
    assert len(set(quarantined_ids)) == len(quarantined_ids)
    assert not good_ids & set(quarantined_ids)


async def test_hostname_check_is_on_unless_turned_off(tmp_path: Path, certs: CertBundle) -> None:
    """A broker whose certificate names another host: refused, unless the check is off (the
    compose stack's case), and even then the chain is still verified."""
    broker = MosquittoBroker(
        tmp_path / "wrong-host-broker",
        certs,
        server_cert=certs.wrong_host_server_cert,
        server_key=certs.wrong_host_server_key,
    )
    with broker:
        config = stream_config(broker, certs, vehicles=1)
        checked = EmulatorServer(tmp_path / "a", config=CONFIG, stream=config)
        with pytest.raises(StreamConnectError, match=r"certificate|hostname|match"):
            await checked.__aenter__()

        unchecked = replace(config, broker=replace(config.broker, verify_hostname=False))
        async with EmulatorServer(tmp_path / "b", config=CONFIG, stream=unchecked) as server:
            stream = server.stream
            assert stream is not None
            await wait_until(lambda: stream.counters.acked >= 5, "PUBACKs without a name check")

        foreign = replace(
            unchecked,
            broker=replace(unchecked.broker, ca_file=certs.other_ca_file),
        )
        with pytest.raises(StreamConnectError):
            await EmulatorServer(tmp_path / "c", config=CONFIG, stream=foreign).__aenter__()


def test_same_seed_same_stream(tmp_path: Path, certs: CertBundle) -> None:
    """With one seed and the same clock readings, a vehicle's messages repeat exactly."""

    def messages(seed: int, folder: str) -> list[bytes]:
        clock = ManualClock(start=1_800_000_000.0)
        server = EmulatorServer(
            tmp_path / folder,
            config=CONFIG,
            clock=clock,
            stream=replace(
                stream_config_offline(certs),
                settings=StreamSettings(app_id=APP_ID, seed=seed, duplicate_rate=0.2, bad_rate=0.2),
            ),
        )
        assert server.stream is not None
        out = []
        for _ in range(200):
            clock.advance(0.5)
            out.append(server.stream.next_message(APPROVED).payload)
        return out

    first, again, other = messages(5, "a"), messages(5, "b"), messages(6, "c")
    assert first == again
    assert first != other


def stream_config_offline(certs: CertBundle) -> StreamConfig:
    """A stream that is built but never connected (no broker needed)."""
    target = BrokerTarget("127.0.0.1", 9, certs.ca_file, certs.client_cert, certs.client_key, "x")
    return StreamConfig(StreamSettings(app_id=APP_ID), target)
