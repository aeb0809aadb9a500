"""The webhook receiver over real HTTP: signatures, size limit, repeats, ping, HM's own sender."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import orjson
import pytest
from prometheus_client import CollectorRegistry

from ingest.emulator.app import EmulatorServer
from ingest.emulator.state import StatusChange
from ingest.emulator.webhooks import sign
from ingest.health import HealthState
from ingest.http import build_app, serve
from ingest.metrics import Metrics
from ingest.webhook import PATH, ClearanceChange, WebhookReceiver

SECRET = "whsec-test-3f9a"
VIN = "WHMTESTV000000001"


def _body(vin: str = VIN, action: str = "revoked", **extra: object) -> bytes:
    event = {"type": "fleet_clearance_changed", "received_at": "2026-11-29T08:00:00Z"}
    event["action"] = action
    event.update({k: str(v) for k, v in extra.items()})
    return orjson.dumps({"vehicle": {"vin": vin}, "event": event})


class Receiver:
    def __init__(self, url: str, changes: list[ClearanceChange], metrics: Metrics) -> None:
        self.url = url
        self.changes = changes
        self.metrics = metrics

    def count(self, outcome: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "hm_ingest_webhook_deliveries_total", {"outcome": outcome}
        )
        return value or 0.0

    async def post(
        self, body: bytes, headers: dict[str, str] | None = None, *, signed: bool = True
    ) -> httpx.Response:
        all_headers = {"Content-Type": "application/json", **(headers or {})}
        if signed:
            all_headers = {**sign(SECRET, body), **all_headers}
        async with httpx.AsyncClient() as client:
            return await client.post(self.url, content=body, headers=all_headers)


async def _serve(secret: str, max_body: int = 4096) -> AsyncIterator[Receiver]:
    metrics = Metrics(CollectorRegistry())
    changes: list[ClearanceChange] = []

    async def record(change: ClearanceChange) -> None:
        changes.append(change)

    receiver = WebhookReceiver(secret, max_body_bytes=max_body, on_change=record, metrics=metrics)
    app = build_app(metrics, HealthState(), [receiver.route()])
    async with serve(app, "127.0.0.1", 0) as port:
        yield Receiver(f"http://127.0.0.1:{port}{PATH}", changes, metrics)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async for served in _serve(SECRET):
        yield served


async def test_a_signed_change_is_accepted_and_reported(receiver: Receiver) -> None:
    body = _body(action="rejected", detail="vehicle_not_supported")
    response = await receiver.post(body, {"X-HM-Delivery": "d-1"})
    assert response.status_code == 200
    assert response.json() == {"status": "accepted"}
    [change] = receiver.changes
    assert (change.vin, change.status, change.reason) == (VIN, "rejected", "vehicle_not_supported")
    assert change.delivery_id == "d-1"
    assert change.received_at.isoformat() == "2026-11-29T08:00:00+00:00"
    assert receiver.count("accepted") == 1


async def test_only_the_deprecated_sha1_header_is_enough(receiver: Receiver) -> None:
    body = _body()
    sha1 = "sha1=" + hmac.new(SECRET.encode(), body, hashlib.sha1).hexdigest()
    response = await receiver.post(body, {"X-HM-Signature": sha1}, signed=False)
    assert response.status_code == 200
    assert len(receiver.changes) == 1


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({}, "missing_signature"),
        ({"X-HM-Signature-256": "sha256=" + "0" * 64}, "bad_signature"),
        ({"X-HM-Signature-256": "sha1=" + "0" * 40}, "bad_signature"),
        ({"X-HM-Signature-256": "not a signature"}, "bad_signature"),
    ],
)
async def test_unsigned_or_badly_signed_deliveries_get_401_and_do_nothing(
    receiver: Receiver, headers: dict[str, str], reason: str
) -> None:
    response = await receiver.post(_body(), headers, signed=False)
    assert response.status_code == 401
    assert response.json()["error"] == reason
    assert receiver.changes == []
    assert receiver.count(reason) == 1


async def test_a_valid_sha1_cannot_rescue_a_bad_sha256(receiver: Receiver) -> None:
    body = _body()
    headers = {
        "X-HM-Signature": "sha1=" + hmac.new(SECRET.encode(), body, hashlib.sha1).hexdigest(),
        "X-HM-Signature-256": "sha256=" + "0" * 64,
    }
    response = await receiver.post(body, headers, signed=False)
    assert response.status_code == 401
    assert receiver.changes == []


async def test_a_body_signed_for_other_content_is_refused(receiver: Receiver) -> None:
    headers = sign(SECRET, _body(action="approved"))
    response = await receiver.post(_body(action="revoked"), headers, signed=False)
    assert response.status_code == 401
    assert receiver.changes == []


async def test_a_repeated_delivery_id_is_answered_but_dropped(receiver: Receiver) -> None:
    body = _body()
    first = await receiver.post(body, {"X-HM-Delivery": "same"})
    again = await receiver.post(body, {"X-HM-Delivery": "same"})
    assert (first.status_code, again.status_code) == (200, 200)
    assert again.json() == {"status": "duplicate"}
    assert len(receiver.changes) == 1
    assert receiver.count("duplicate") == 1


async def test_an_oversized_body_is_refused_before_it_is_read(receiver: Receiver) -> None:
    body = _body(padding="x" * 10_000)
    response = await receiver.post(body)
    assert response.status_code == 413
    assert receiver.changes == []
    assert receiver.count("too_large") == 1


async def test_an_oversized_chunked_body_without_length_is_refused(receiver: Receiver) -> None:
    body = _body(padding="x" * 10_000)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 1000):
            yield body[start : start + 1000]

    async with httpx.AsyncClient() as client:
        response = await client.post(receiver.url, content=chunks(), headers=sign(SECRET, body))
    assert response.status_code == 413
    assert receiver.changes == []


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"event": {}}',
        b'{"event": {"type": "fleet_clearance_changed", "action": "approved"}}',
        b'{"vehicle": {"vin": 5}, "event": {"type": "fleet_clearance_changed", "action": "x"}}',
    ],
)
async def test_signed_but_malformed_bodies_get_400(receiver: Receiver, body: bytes) -> None:
    response = await receiver.post(body)
    assert response.status_code == 400
    assert response.json()["error"] == "malformed"
    assert receiver.changes == []


async def test_ping_and_unknown_events_are_answered_without_action(receiver: Receiver) -> None:
    ping = await receiver.post(orjson.dumps({"event": {"type": "ping"}}))
    other = await receiver.post(orjson.dumps({"event": {"type": "vehicle_renamed"}}))
    assert ping.json() == {"status": "ping"}
    assert other.json() == {"status": "ignored_event"}
    assert receiver.changes == []


async def test_without_a_secret_every_delivery_is_refused_with_the_fix() -> None:
    async for receiver in _serve(""):
        response = await receiver.post(_body(), signed=True)
        assert response.status_code == 401
        assert "HM_INGEST_WEBHOOK_SECRET" in response.json()["detail"]
        assert receiver.changes == []


async def test_the_emulators_deliveries_verify_end_to_end(tmp_path: Path) -> None:
    """HM's side (the emulator) signs and sends with its own secret; the receiver verifies."""
    async with EmulatorServer(tmp_path) as emulator:
        async for receiver in _serve(emulator.info()["webhook_secret"]):
            async with httpx.AsyncClient() as admin:
                configured = await admin.put(
                    f"{emulator.admin_url}/webhook", json={"url": receiver.url}
                )
                assert configured.status_code == 200
            emulator.emulator.webhooks.on_change(
                StatusChange(VIN, "approved", None, emulator.emulator.clock.now())
            )
            for _ in range(200):
                if receiver.changes and receiver.count("ping") == 1:
                    break
                await asyncio.sleep(0.05)
            assert receiver.count("ping") == 1
            assert [(c.vin, c.status) for c in receiver.changes] == [(VIN, "approved")]
            assert receiver.changes[0].delivery_id
