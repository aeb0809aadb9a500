"""Webhook deliveries: ``fleet_clearance_changed`` on every status change, ``ping`` on setup.

Each delivery is signed over its exact raw body (``X-HM-Signature-256`` HMAC-SHA256, and the
deprecated ``X-HM-Signature`` HMAC-SHA1) and keeps one ``X-HM-Delivery`` id across its retries so a
receiver can drop repeats. A delivery is retried with exponential backoff until the receiver answers
2xx or ``max_attempts`` is reached; deliveries go out one at a time, in order of the changes.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx

from ingest.emulator.clock import Clock, isoformat
from ingest.emulator.state import StatusChange

MAX_LOG = 1000  # deliveries kept for GET /_emulator/webhook/deliveries
SEND_TIMEOUT_S = 5.0


@dataclass
class Delivery:
    id: str
    event: str
    body: bytes
    attempts: list[str] = field(default_factory=list)  # status code or error per attempt
    delivered: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "event": self.event,
            "body": json.loads(self.body),
            "attempts": self.attempts,
            "delivered": self.delivered,
        }


def sign(secret: str, body: bytes) -> dict[str, str]:
    key = secret.encode()
    return {
        "X-HM-Signature-256": "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest(),
        "X-HM-Signature": "sha1=" + hmac.new(key, body, hashlib.sha1).hexdigest(),
    }


class WebhookSender:
    def __init__(
        self, secret: str, clock: Clock, max_attempts: int = 5, backoff_s: float = 0.5
    ) -> None:
        self.secret = secret
        self.url: str | None = None
        self._clock = clock
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self._queue: asyncio.Queue[Delivery] = asyncio.Queue()
        self.log: list[Delivery] = []

    def configure(self, url: str | None) -> None:
        """Point deliveries at ``url`` (None stops them) and send a ``ping`` like HM does."""
        self.url = url
        if url is not None:
            self._enqueue("ping", {"event": {"type": "ping", "received_at": self._now()}})

    def on_change(self, change: StatusChange) -> None:
        if self.url is None:
            return
        event: dict[str, Any] = {
            "type": "fleet_clearance_changed",
            "received_at": isoformat(change.at),
            "action": change.status,
        }
        if change.reason is not None:
            event["detail"] = change.reason
        self._enqueue("fleet_clearance_changed", {"vehicle": {"vin": change.vin}, "event": event})

    def _now(self) -> str:
        return isoformat(self._clock.now())

    def _enqueue(self, event: str, body: dict[str, Any]) -> None:
        delivery = Delivery(str(uuid.uuid4()), event, json.dumps(body).encode())
        self.log.append(delivery)
        del self.log[:-MAX_LOG]
        self._queue.put_nowait(delivery)

    async def run(self) -> None:
        """Send queued deliveries until cancelled."""
        async with httpx.AsyncClient(timeout=SEND_TIMEOUT_S) as client:
            while True:
                delivery = await self._queue.get()
                await self._deliver(client, delivery)

    async def _deliver(self, client: httpx.AsyncClient, delivery: Delivery) -> None:
        headers = {
            "Content-Type": "application/json",
            "X-HM-Delivery": delivery.id,
            "X-HM-Event": delivery.event,
            **sign(self.secret, delivery.body),
        }
        for attempt in range(self.max_attempts):
            url = self.url
            if url is None:
                return
            try:
                response = await client.post(url, content=delivery.body, headers=headers)
                delivery.attempts.append(str(response.status_code))
                if response.is_success:
                    delivery.delivered = True
                    return
            except httpx.HTTPError as exc:
                delivery.attempts.append(type(exc).__name__)
            if attempt + 1 < self.max_attempts:
                await asyncio.sleep(self.backoff_s * 2**attempt)
