"""``HmApiClient``: HM's fleet clearance, eligibility and OAuth token APIs over httpx.

Usage::

    auth = AuthSettings(auth="client_credentials", client_id=..., client_secret=Secret(...))
    async with HmApiClient(auth, environment="production") as hm:
        results = await hm.create_clearances([VehicleRequest(vin, "bmw")])

Input is checked locally before any request (VINs, brands); HM's answers are parsed leniently into
frozen dataclasses; failures are :class:`~ingest.errors.ApiError` subclasses (see
:mod:`ingest.hmapi.errors`).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import Literal, Self

import httpx
import orjson

from ingest import __version__
from ingest.errors import ApiError, AuthError, ConfigError
from ingest.hmapi.auth import AuthSettings, build_flow
from ingest.hmapi.environments import ApiEndpoint, Environment, resolve_endpoint
from ingest.hmapi.events import EventHook
from ingest.hmapi.models import (
    Clearance,
    ClearanceResult,
    Eligibility,
    VehicleAccessToken,
    VehicleRequest,
    parse_clearance,
    parse_clearance_result,
    parse_eligibility,
    parse_vehicle_access_token,
)
from ingest.hmapi.retry import RetryPolicy
from ingest.hmapi.secret import Secret
from ingest.hmapi.session import ApiSession, Sleep
from ingest.hmapi.tokens import TokenProvider
from ingest.hmapi.validation import validate_vehicles, validate_vin

# HM documents no batch limit for POST /v1/fleets/vehicles; 100 keeps each request small enough
# that a timeout or 5xx retry repeats little work.
DEFAULT_CHUNK_SIZE = 100
TokenHint = Literal["refresh_token", "access_token"]
# RFC 6749 says "refresh_token"; some HM examples say "refresh". Try the other once if refused.
_REFRESH_GRANTS = ("refresh_token", "refresh")


class HmApiClient:
    """Async client for HM's REST API. Use as ``async with``; safe for concurrent calls.

    ``http`` (an httpx client, left open on exit; its own timeouts then apply) or ``transport``
    are for tests and special set-ups; ``sleep``, ``clock`` (monotonic, for token expiry),
    ``wall_clock`` (JWT ``iat``, HTTP dates) and ``rng`` (jitter) are injectable so tests run
    fast and deterministic.
    """

    def __init__(
        self,
        auth: AuthSettings,
        *,
        environment: Environment | str = Environment.SANDBOX,
        base_url: str | None = None,
        http: httpx.AsyncClient | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout_s: float = 30.0,
        connect_timeout_s: float = 10.0,
        retry: RetryPolicy | None = None,
        on_event: EventHook | None = None,
        sleep: Sleep = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.endpoint: ApiEndpoint = resolve_endpoint(environment, base_url)
        self._auth = auth
        # Loads and checks the key first: a bad key file stops start-up, not the first request,
        # and nothing has been opened yet that would need closing.
        flow = build_flow(auth, audience=self.endpoint.audience, wall_clock=wall_clock)
        self._owns_http = http is None
        self._http = http or httpx.AsyncClient(
            transport=transport,
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            # HM documents no redirects; following one could carry the token to another host.
            follow_redirects=False,
        )
        self._session = ApiSession(
            self._http,
            self.endpoint,
            retry=retry or RetryPolicy(),
            on_event=on_event,
            sleep=sleep,
            wall_clock=wall_clock,
            rng=rng,
            user_agent=f"hm-fleet-ingest/{__version__}",
        )
        self.tokens = TokenProvider(
            flow, self._session.token_sender, clock=clock, on_event=on_event
        )
        self._session.tokens = self.tokens

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    # -- fleet clearance -------------------------------------------------------------------

    async def create_clearances(
        self, vehicles: Sequence[VehicleRequest], *, chunk_size: int = DEFAULT_CHUNK_SIZE
    ) -> list[ClearanceResult]:
        """Register VINs for clearance, ``chunk_size`` per POST; one result per VIN, in order.

        A VIN HM refuses is a result with ``status == "error"`` and a ``description``, not an
        exception. Every VIN and brand is checked before the first request.
        """
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
        validate_vehicles((v.vin, v.brand) for v in vehicles)
        results: list[ClearanceResult] = []
        # A chunk is retried after a 5xx or timeout like any call. HM keys clearances by VIN, so a
        # repeat cannot register a VIN twice (unconfirmed how HM words the answer for a VIN it
        # already holds: it arrives as that VIN's result item either way).
        for start in range(0, len(vehicles), chunk_size):
            chunk = vehicles[start : start + chunk_size]
            answer = await self._session.call(
                "POST",
                "/fleets/vehicles",
                endpoint="fleet_vehicles_create",
                json={"vehicles": [v.to_json() for v in chunk]},
            )
            items = answer.get("vehicles") if isinstance(answer, dict) else None
            if not isinstance(items, list):
                raise ApiError("HM's clearance answer has no 'vehicles' list", status=200)
            results.extend(parse_clearance_result(item) for item in items)
        return results

    async def list_clearances(self, status: Iterable[str] | None = None) -> list[Clearance]:
        """The whole fleet (HM documents no pagination), optionally only these statuses."""
        params: dict[str, str] | None = None
        if status is not None:
            statuses = [status] if isinstance(status, str) else list(status)
            document = {"status": {"operator": "in", "value": statuses}}
            # httpx percent-encodes the value: HM wants URL-encoded JSON in ``filter``.
            params = {"filter": orjson.dumps(document).decode()}
        answer = await self._session.call(
            "GET", "/fleets/vehicles", endpoint="fleet_vehicles_list", params=params
        )
        if not isinstance(answer, list):
            raise ApiError("HM's clearance list is not a JSON array", status=200)
        return [parse_clearance(item) for item in answer]

    async def get_clearance(self, vin: str) -> Clearance:
        """One VIN's clearance; :class:`~ingest.hmapi.errors.NotFoundError` if HM has none.

        HM allows 60 calls/min on this endpoint: prefer :meth:`list_clearances` for many VINs.
        """
        validate_vin(vin)
        answer = await self._session.call(
            "GET", f"/fleets/vehicles/{vin}", endpoint="fleet_vehicle_get"
        )
        return parse_clearance(answer)

    async def delete_clearance(self, vin: str) -> ClearanceResult:
        """Revoke an approved VIN or cancel a pending one (status ``revoking``/``canceling``).

        409 (already removed, in transition) and 422 (cancellation unsupported or too early)
        raise :class:`~ingest.errors.ApiError` with HM's ``detail``; 404 NotFoundError.
        """
        validate_vin(vin)
        answer = await self._session.call(
            "DELETE", f"/fleets/vehicles/{vin}", endpoint="fleet_vehicle_delete"
        )
        return parse_clearance_result(answer)

    async def eligibility(self, vin: str, brand: str) -> Eligibility:
        validate_vehicles([(vin, brand)])
        answer = await self._session.call(
            "POST", "/eligibility", endpoint="eligibility", json={"vin": vin, "brand": brand}
        )
        return parse_eligibility(answer)

    # -- per-VIN tokens (deprecated by HM, still in use) ------------------------------------

    async def fleet_access_token(self, vin: str) -> VehicleAccessToken:
        """A one-time access/refresh token pair for an approved VIN's pull APIs."""
        validate_vin(vin)
        answer = await self._session.call(
            "POST", "/fleets/access_tokens", endpoint="fleet_access_tokens", json={"vin": vin}
        )
        return parse_vehicle_access_token(answer)

    async def refresh_access_token(self, refresh_token: Secret[str] | str) -> VehicleAccessToken:
        client_id, client_secret = self._client_secret_pair("refresh_access_token")
        token = _reveal(refresh_token)
        for grant in _REFRESH_GRANTS:
            body = {
                "grant_type": grant,
                "client_id": client_id,
                "client_secret": client_secret,
                "refresh_token": token,
            }
            try:
                answer = await self._session.call(
                    "POST", "/access_tokens", endpoint="access_tokens_refresh", json=body,
                    authenticated=False,
                )  # fmt: skip
            except ApiError as exc:
                if grant != _REFRESH_GRANTS[-1] and _grant_refused(exc):
                    continue
                if exc.retriable or isinstance(exc, AuthError):
                    raise
                # A refused refresh token is an authorization problem for the caller.
                raise AuthError(
                    str(exc),
                    status=exc.status,
                    title=exc.title,
                    detail=exc.detail,
                    source=exc.source,
                ) from exc
            return parse_vehicle_access_token(answer)
        raise AssertionError("unreachable")  # pragma: no cover

    async def revoke_token(
        self, token: Secret[str] | str, hint: TokenHint = "refresh_token"
    ) -> None:
        """Revoke a per-VIN access or refresh token (RFC 7009: DELETE with a JSON body)."""
        client_id, client_secret = self._client_secret_pair("revoke_token")
        body = {
            "token": _reveal(token),
            "client_id": client_id,
            "client_secret": client_secret,
            "token_type_hint": hint,
        }
        await self._session.call(
            "DELETE", "/access_tokens", endpoint="access_tokens_revoke", json=body,
            authenticated=False,
        )  # fmt: skip

    def _client_secret_pair(self, operation: str) -> tuple[str, str]:
        secret = self._auth.client_secret
        if not self._auth.client_id or secret is None or not secret.reveal():
            raise ConfigError(
                f"{operation} needs api.client_id and api.client_secret (HM authenticates this "
                "call with them whatever api.auth is)",
                key="api.client_secret",
            )
        return self._auth.client_id, secret.reveal()


def _reveal(value: Secret[str] | str) -> str:
    return value.reveal() if isinstance(value, Secret) else value


def _grant_refused(exc: ApiError) -> bool:
    text = f"{exc.title or ''} {exc.detail or ''}".lower()
    return exc.status == 400 and ("unsupported_grant_type" in text or "grant_type" in text)


__all__ = ["DEFAULT_CHUNK_SIZE", "HmApiClient", "TokenHint"]
