"""The token cache: one valid token shared by all callers, renewed before it expires."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from ingest.hmapi.auth import IssuedToken, Sender, TokenFlow
from ingest.hmapi.events import EventHook, RenewalReason, TokenRenewedEvent, emit
from ingest.hmapi.secret import Secret

logger = logging.getLogger("ingest.hmapi")

# Renew when less than max(30 s, 10 % of the lifetime) remains: 30 s covers a slow token call
# plus HM's 30 s iat tolerance on a 5-minute token; 10 % scales for longer-lived tokens.
RENEW_MARGIN_MIN_S = 30.0
RENEW_MARGIN_FRACTION = 0.10


def renew_margin_s(lifetime_s: float) -> float:
    """Seconds before expiry at which a token counts as stale.

    Capped at half the lifetime so a token shorter than a minute is still used for a while
    instead of being renewed on every call.
    """
    return min(max(RENEW_MARGIN_MIN_S, RENEW_MARGIN_FRACTION * lifetime_s), lifetime_s / 2)


class TokenProvider:
    """Caches the API token of one flow.

    Safe for concurrent callers: an :class:`asyncio.Lock` lets one renewal run at a time, and
    callers that queued behind it reuse its result. ``clock`` is monotonic (tests inject one);
    a wall-clock jump must not make a token look fresh or stale.
    """

    def __init__(
        self,
        flow: TokenFlow,
        send: Sender,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_event: EventHook | None = None,
    ) -> None:
        self._flow = flow
        self._send = send
        self._clock = clock
        self._on_event = on_event
        self._lock = asyncio.Lock()
        self._token: Secret[str] | None = None
        self._renew_at = 0.0
        self._invalidated = False
        self.renewals = 0

    @property
    def flow_name(self) -> str:
        return self._flow.name

    async def token(self) -> Secret[str]:
        """A token valid for at least the renewal margin, obtaining one if needed."""
        current = self._fresh()
        if current is not None:
            return current
        async with self._lock:
            current = self._fresh()  # another caller may have renewed while we waited
            if current is not None:
                return current
            reason: RenewalReason = (
                "initial"
                if self.renewals == 0
                else "invalidated"
                if self._invalidated
                else "expiring"
            )
            started = self._clock()
            issued = await self._flow.issue(self._send)
            self._store(issued, started)
            self.renewals += 1
            logger.debug(
                "HM %s token obtained (%s), valid %.0fs", self._flow.name, reason, issued.lifetime_s
            )
            emit(self._on_event, TokenRenewedEvent(self._flow.name, reason, issued.lifetime_s))
            return issued.value

    def invalidate(self, token: Secret[str] | None = None) -> None:
        """Drop the cached token (after a 401). With ``token``, only if it is still the cached one,
        so many callers failing on the same token cause one renewal, not one each."""
        if token is None or token == self._token:
            self._token = None
            self._invalidated = True

    def _fresh(self) -> Secret[str] | None:
        if self._token is not None and self._clock() < self._renew_at:
            return self._token
        return None

    def _store(self, issued: IssuedToken, started: float) -> None:
        self._token = issued.value
        self._invalidated = False
        # Counted from when the request left: HM's lifetime starts at issuance, not at our receipt.
        self._renew_at = started + issued.lifetime_s - renew_margin_s(issued.lifetime_s)
