"""One HTTP call to HM, done properly: Bearer auth, one re-auth on 401, retries, events.

:class:`ApiSession` is the boundary where httpx ends: every httpx exception and every non-2xx
answer leaves here as an :class:`~ingest.errors.ApiError` subclass. Logs name the endpoint label,
the attempt and the cause; never a URL (it may hold a VIN) and never a token.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import httpx
import orjson

from ingest.errors import ApiError, RateLimitedError, ServerError
from ingest.hmapi.environments import ApiEndpoint
from ingest.hmapi.errors import error_from_response, transport_error
from ingest.hmapi.events import EventHook, RequestEvent, RetryCause, RetryEvent, emit
from ingest.hmapi.retry import RetryPolicy
from ingest.hmapi.secret import Secret
from ingest.hmapi.tokens import TokenProvider

logger = logging.getLogger("ingest.hmapi")

Sleep = Callable[[float], Awaitable[None]]


class ApiSession:
    """Sends requests to ``endpoint`` over ``http``; ``tokens`` is attached after construction."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        endpoint: ApiEndpoint,
        *,
        retry: RetryPolicy,
        on_event: EventHook | None = None,
        sleep: Sleep = asyncio.sleep,
        wall_clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        user_agent: str = "hm-fleet-ingest",
    ) -> None:
        self._http = http
        self._endpoint = endpoint
        self._retry = retry
        self._on_event = on_event
        self._sleep = sleep
        self._wall_clock = wall_clock
        # Jitter needs no cryptographic quality; a seeded Random makes tests repeatable.
        self._rng = rng or random.Random()  # noqa: S311
        self._user_agent = user_agent
        self.tokens: TokenProvider | None = None

    async def call(
        self,
        method: str,
        path: str,
        *,
        endpoint: str,
        json: Any = None,
        data: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        authenticated: bool = True,
    ) -> Any:
        """Decoded JSON of the 2xx answer (``None`` for an empty body), after retries."""
        attempt = 1
        reauthenticated = False
        while True:
            token: Secret[str] | None = None
            try:
                if authenticated:
                    assert self.tokens is not None, "ApiSession.tokens not attached"
                    token = await self.tokens.token()
                return await self.send(
                    method, path, endpoint=endpoint, json=json, data=data, params=params,
                    token=token,
                )  # fmt: skip
            except ApiError as exc:
                if exc.status == 401 and token is not None and not reauthenticated:
                    # [reference §2] tokens can be revoked or expire early: re-authenticate once.
                    reauthenticated = True
                    assert self.tokens is not None
                    self.tokens.invalidate(token)
                    self._note_retry(endpoint, attempt, "unauthorized", 0.0, exc)
                    continue
                if not exc.retriable or attempt >= self._retry.max_attempts:
                    if exc.retriable:
                        logger.warning(
                            "HM API %s gave up after %d attempts: %s", endpoint, attempt, exc
                        )
                    raise
                cause = _cause(exc)
                if isinstance(exc, RateLimitedError):
                    delay = self._retry.rate_limit_wait_s(exc.retry_after_s)
                else:
                    delay = self._retry.backoff_s(attempt, self._rng)
                self._note_retry(endpoint, attempt, cause, delay, exc)
                await self._sleep(delay)
                attempt += 1

    async def send(
        self,
        method: str,
        path: str,
        *,
        endpoint: str,
        json: Any = None,
        data: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        token: Secret[str] | None = None,
    ) -> Any:
        """One attempt, no retry: the decoded 2xx answer, or the mapped ApiError raised."""
        headers = {"Accept": "application/json", "User-Agent": self._user_agent}
        if token is not None:
            headers["Authorization"] = f"Bearer {token.reveal()}"
        content: bytes | None = None
        if json is not None:
            content = orjson.dumps(json)
            headers["Content-Type"] = "application/json"
        started = time.perf_counter()
        try:
            response = await self._http.request(
                method,
                self._endpoint.url(path),
                content=content,
                data=data,
                params=params,
                headers=headers,
            )
        except httpx.HTTPError as exc:
            self._note_request(endpoint, method, 0, started)
            raise transport_error(exc, endpoint=endpoint) from exc
        self._note_request(endpoint, method, response.status_code, started)
        if not response.is_success:
            raise error_from_response(
                response,
                endpoint=endpoint,
                default_retry_after_s=self._retry.default_rate_limit_wait_s,
                now=self._wall_clock,
            )
        if not response.content.strip():
            return None
        try:
            return orjson.loads(response.content)
        except orjson.JSONDecodeError as exc:
            raise ApiError(
                f"HM API {endpoint} answered {response.status_code} with a body that is not JSON",
                status=response.status_code,
            ) from exc

    async def token_sender(
        self,
        method: str,
        path: str,
        *,
        endpoint: str,
        json: Any = None,
        data: Mapping[str, str] | None = None,
    ) -> Any:
        """The :class:`~ingest.hmapi.auth.Sender` for token flows: single-shot and unauthenticated,
        because the caller's own retry loop already retries a failed token request."""
        return await self.send(method, path, endpoint=endpoint, json=json, data=data)

    def _note_request(self, endpoint: str, method: str, status: int, started: float) -> None:
        latency = time.perf_counter() - started
        logger.debug(
            "HM API %s %s -> %s in %.3fs", endpoint, method, status or "no answer", latency
        )
        emit(self._on_event, RequestEvent(endpoint, method, status, latency))

    def _note_retry(
        self, endpoint: str, attempt: int, cause: RetryCause, delay: float, exc: ApiError
    ) -> None:
        logger.warning(
            "HM API %s attempt %d/%d failed (%s: %s); retrying in %.2fs",
            endpoint, attempt, self._retry.max_attempts, cause, exc, delay,
        )  # fmt: skip
        emit(self._on_event, RetryEvent(endpoint, attempt, cause, delay))


def _cause(exc: ApiError) -> RetryCause:
    if isinstance(exc, RateLimitedError):
        return "rate_limited"
    if isinstance(exc, ServerError) and exc.status == 0:
        return "timeout" if isinstance(exc.__cause__, httpx.TimeoutException) else "connection"
    return "server_error"
