"""HM's ``fleet_clearance_changed`` webhook, served at ``POST /webhook`` on the daemon's HTTP port.

A delivery is acted on only after its signature checks out: ``X-HM-Signature-256`` (HMAC-SHA256 of
the raw body with ``[webhook] secret``), or the deprecated ``X-HM-Signature`` (SHA-1) when HM sends
only that. Compares are constant-time. Everything else is refused *before* the body is parsed:

=====================  ======  ==============================================================
refusal                status  why
=====================  ======  ==============================================================
``not_configured``     401     no ``[webhook] secret``: nothing can be verified
``too_large``          413     body over ``[webhook] max_body_bytes`` (read no further)
``missing_signature``  401     neither signature header
``bad_signature``      401     the signature does not match the body
``malformed``          400     signed, but not the JSON HM sends
=====================  ======  ==============================================================

A repeated ``X-HM-Delivery`` id (HM retries until it sees a 2xx) is answered 200 and dropped.
Accepted clearance changes are awaited in ``on_change`` (which records the status off the event
loop and wakes the control loop, whose next listing of the fleet stays the authority) before the
200 goes out.
"""

from __future__ import annotations

import hmac
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import orjson
from aiohttp import web

from ingest.hmapi.models import parse_timestamp
from ingest.http import Handler
from ingest.metrics import Metrics

log = logging.getLogger("ingest.webhook")

PATH = "/webhook"
# HM retries a delivery for a while; remembering the last 10k ids covers any realistic burst.
SEEN_DELIVERIES = 10_000


@dataclass(frozen=True, slots=True)
class ClearanceChange:
    """One verified ``fleet_clearance_changed`` event."""

    vin: str
    status: str
    reason: str | None
    received_at: datetime
    delivery_id: str | None


class Refused(Exception):
    """Why a delivery is not acted on: ``reason`` is the metric label, ``status`` the answer."""

    def __init__(self, reason: str, status: int, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.status = status
        self.detail = detail


def _signature_ok(header: str, prefix: str, digest: str, secret: bytes, body: bytes) -> bool:
    scheme, sep, received = header.partition("=")
    if not sep or scheme.strip().lower() != prefix:
        return False
    expected = hmac.new(secret, body, digest).hexdigest()
    return hmac.compare_digest(expected, received.strip().lower())


def verify_signature(headers: Mapping[str, str], secret: bytes, body: bytes) -> None:
    """Raise :class:`Refused` unless ``body`` carries a valid HM signature.

    When the SHA-256 header is present it alone decides: a valid SHA-1 header cannot rescue a bad
    SHA-256 one, so an attacker gains nothing from the weaker hash while HM sends both.
    """
    sha256 = headers.get("X-HM-Signature-256")
    sha1 = headers.get("X-HM-Signature")
    if sha256 is None and sha1 is None:
        raise Refused("missing_signature", 401, "no X-HM-Signature-256 (or X-HM-Signature) header")
    if sha256 is not None:
        ok = _signature_ok(sha256, "sha256", "sha256", secret, body)
    else:
        assert sha1 is not None
        ok = _signature_ok(sha1, "sha1", "sha1", secret, body)
    if not ok:
        raise Refused(
            "bad_signature",
            401,
            "signature does not match the body; check that [webhook] secret is the secret "
            "configured for this webhook in HM's console",
        )


def parse_event(body: bytes) -> tuple[str, ClearanceChange | None]:
    """The event type and, for ``fleet_clearance_changed``, the change it reports."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise Refused("malformed", 400, f"body is not JSON: {exc}") from exc
    event = document.get("event") if isinstance(document, dict) else None
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        raise Refused("malformed", 400, "body has no event.type")
    kind: str = event["type"]
    if kind != "fleet_clearance_changed":
        return kind, None
    vehicle = document.get("vehicle")
    vin = vehicle.get("vin") if isinstance(vehicle, dict) else None
    action = event.get("action")
    if not isinstance(vin, str) or not vin or not isinstance(action, str) or not action:
        raise Refused(
            "malformed", 400, "fleet_clearance_changed needs vehicle.vin and event.action strings"
        )
    detail = event.get("detail")
    received = parse_timestamp(event.get("received_at")) or datetime.now(UTC)
    change = ClearanceChange(
        vin=vin,
        status=action,
        reason=detail if isinstance(detail, str) else None,
        received_at=received,
        delivery_id=None,
    )
    return kind, change


class WebhookReceiver:
    """The aiohttp handler; ``on_change`` runs on the event loop and must return quickly."""

    def __init__(
        self,
        secret: str,
        *,
        max_body_bytes: int,
        on_change: Callable[[ClearanceChange], Awaitable[None]],
        metrics: Metrics | None = None,
    ) -> None:
        self._secret = secret.encode()
        self._max_body = max_body_bytes
        self._on_change = on_change
        self._metrics = metrics
        self._seen: OrderedDict[str, None] = OrderedDict()

    def route(self) -> tuple[str, str, Handler]:
        return ("POST", PATH, self.handle)

    async def handle(self, request: web.Request) -> web.Response:
        try:
            outcome, change = await self._accept(request)
        except Refused as refusal:
            self._count(refusal.reason)
            log.warning(
                "webhook refused (%s) from %s: %s", refusal.reason, request.remote, refusal.detail
            )
            return web.json_response(
                {"error": refusal.reason, "detail": refusal.detail}, status=refusal.status
            )
        self._count(outcome)
        if change is not None:
            log.info("webhook: %s is now %s", change.vin, change.status)
            # Awaited before answering: a 200 means "recorded", so HM's retries cover a crash.
            await self._on_change(change)
        return web.json_response({"status": outcome})

    async def _accept(self, request: web.Request) -> tuple[str, ClearanceChange | None]:
        if not self._secret:
            raise Refused(
                "not_configured",
                401,
                "this daemon has no [webhook] secret (HM_INGEST_WEBHOOK_SECRET); set it to the "
                "webhook secret from HM's console",
            )
        body = await self._read_body(request)
        verify_signature(request.headers, self._secret, body)
        delivery = request.headers.get("X-HM-Delivery")
        if delivery is not None and delivery in self._seen:
            return "duplicate", None
        kind, change = parse_event(body)
        if delivery is not None:
            # Remembered only once verified and parsed: a refused attempt may be retried.
            self._seen[delivery] = None
            while len(self._seen) > SEEN_DELIVERIES:
                self._seen.popitem(last=False)
        if kind == "ping":
            return "ping", None
        if change is None:
            return "ignored_event", None
        return "accepted", ClearanceChange(
            change.vin, change.status, change.reason, change.received_at, delivery
        )

    async def _read_body(self, request: web.Request) -> bytes:
        declared = request.content_length
        if declared is not None and declared > self._max_body:
            raise Refused("too_large", 413, f"body of {declared} bytes > {self._max_body}")
        # A chunked sender declares no length: stop reading as soon as the cap is passed.
        body = bytearray()
        while chunk := await request.content.read(64 * 1024):
            body += chunk
            if len(body) > self._max_body:
                raise Refused("too_large", 413, f"body over {self._max_body} bytes")
        return bytes(body)

    def _count(self, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.webhooks.labels(outcome).inc()
