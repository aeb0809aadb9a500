"""Observations the client reports through its ``on_event`` hook.

The metrics module subscribes here instead of this package importing prometheus: the client stays
usable (and testable) without a registry. Labels are bounded: an ``endpoint`` is a fixed name such
as ``fleet_vehicles_get``, never a URL with a VIN or token in it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

logger = logging.getLogger("ingest.hmapi")

RetryCause = Literal["unauthorized", "rate_limited", "server_error", "timeout", "connection"]
RenewalReason = Literal["initial", "expiring", "invalidated"]


@dataclass(frozen=True)
class RequestEvent:
    """One HTTP exchange; ``status`` is 0 when no response arrived."""

    endpoint: str
    method: str
    status: int
    latency_s: float


@dataclass(frozen=True)
class RetryEvent:
    """A failed attempt that will be retried after ``delay_s``."""

    endpoint: str
    attempt: int
    cause: RetryCause
    delay_s: float


@dataclass(frozen=True)
class TokenRenewedEvent:
    """A new API token was obtained."""

    flow: str
    reason: RenewalReason
    lifetime_s: float


ApiEvent = RequestEvent | RetryEvent | TokenRenewedEvent
EventHook = Callable[[ApiEvent], None]


def emit(hook: EventHook | None, event: ApiEvent) -> None:
    """Deliver ``event``; a failing hook is logged, because a metrics bug must not fail a call."""
    if hook is None:
        return
    try:
        hook(event)
    except Exception:
        logger.exception("on_event hook failed for %s", type(event).__name__)
