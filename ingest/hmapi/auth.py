"""Obtaining HM API tokens: three flows (reference §2) behind one caching :class:`TokenProvider`.

* ``client_credentials``: ``POST /v1/access_tokens`` with client id and secret (HM recommends it);
* ``private_key``: the same endpoint, authenticated by a JWT signed with the console's EC key;
* ``service_account``: ``POST /v1/auth_tokens`` with ``assertion=<JWT>`` (deprecated by HM, still
  documented) → 201 ``{auth_token, valid_from, valid_until}``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import jwt

from ingest.errors import ApiError, AuthError, ConfigError
from ingest.hmapi.credentials import SigningKey, load_signing_key
from ingest.hmapi.models import parse_timestamp
from ingest.hmapi.secret import Secret

AuthFlowName = Literal["client_credentials", "private_key", "service_account"]
AUTH_FLOWS: tuple[AuthFlowName, ...] = ("client_credentials", "private_key", "service_account")

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# Claim set version HM's current docs use; older HM code sent 1.
JWT_VERSION = 2
# HM documents ~5 minute tokens; used when an answer states no lifetime at all.
DEFAULT_TOKEN_LIFETIME_S = 300.0


class Sender(Protocol):
    """Sends one request and returns the decoded JSON of a 2xx answer, or raises ApiError."""

    async def __call__(
        self,
        method: str,
        path: str,
        *,
        endpoint: str,
        json: Any = None,
        data: Mapping[str, str] | None = None,
    ) -> Any: ...


@dataclass(frozen=True)
class AuthSettings:
    """Which flow to use and its credentials. ``key_id`` is only needed for a bare PEM key."""

    auth: AuthFlowName = "client_credentials"
    client_id: str | None = None
    client_secret: Secret[str] | None = None
    private_key_file: Path | None = None
    key_id: str | None = None
    # Preloaded key (tests, or callers that load it themselves); wins over private_key_file.
    signing_key: SigningKey | None = None

    def __post_init__(self) -> None:
        if self.auth not in AUTH_FLOWS:
            raise ConfigError(
                f"api.auth = {self.auth!r} is unknown; use one of: {', '.join(AUTH_FLOWS)}",
                key="api.auth",
            )
        needs_id = self.auth in ("client_credentials", "private_key")
        if needs_id and not self.client_id:
            raise ConfigError(
                f"api.client_id is empty but api.auth = {self.auth!r} needs it; copy the OAuth "
                "client id from HM's console",
                key="api.client_id",
            )
        if self.auth == "client_credentials" and not (
            self.client_secret and self.client_secret.reveal()
        ):
            raise ConfigError(
                "api.client_secret is empty but api.auth = 'client_credentials' needs it",
                key="api.client_secret",
            )
        if self.auth != "client_credentials" and not (self.private_key_file or self.signing_key):
            raise ConfigError(
                f"api.private_key_file is not set but api.auth = {self.auth!r} signs a JWT with "
                "it; point it at the key JSON file downloaded from HM's console",
                key="api.private_key_file",
            )

    def load_key(self) -> SigningKey:
        if self.signing_key is not None:
            return self.signing_key
        assert self.private_key_file is not None  # checked in __post_init__
        return load_signing_key(self.private_key_file, key_id=self.key_id)


def build_assertion(key: SigningKey, audience: str, *, now: float) -> str:
    """A single-use ES256 JWT as HM expects it: a fresh ``jti`` every call."""
    claims = {
        "ver": JWT_VERSION,
        "iss": key.require_id(),
        "aud": audience,  # must be the environment's REST base, or HM answers 401
        "iat": int(now),
        "jti": str(uuid.uuid4()),
    }
    return jwt.encode(claims, key.private_key.reveal(), algorithm="ES256", headers={"typ": "JWT"})


@dataclass(frozen=True)
class IssuedToken:
    value: Secret[str]
    lifetime_s: float


class TokenFlow(Protocol):
    name: str

    async def issue(self, send: Sender) -> IssuedToken: ...


class ClientCredentialsFlow:
    """``client_credentials`` with a client secret, or with a signed ``client_assertion``."""

    def __init__(
        self,
        client_id: str,
        *,
        client_secret: Secret[str] | None = None,
        key: SigningKey | None = None,
        audience: str = "",
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = "private_key" if key is not None else "client_credentials"
        self._client_id = client_id
        self._secret = client_secret
        self._key = key
        self._audience = audience
        self._wall_clock = wall_clock
        if key is not None:
            key.require_id()  # fail at start-up, not at the first request

    async def issue(self, send: Sender) -> IssuedToken:
        body: dict[str, str] = {"client_id": self._client_id, "grant_type": "client_credentials"}
        if self._key is not None:
            body["client_assertion"] = build_assertion(
                self._key, self._audience, now=self._wall_clock()
            )
            body["client_assertion_type"] = CLIENT_ASSERTION_TYPE
        else:
            assert self._secret is not None
            body["client_secret"] = self._secret.reveal()
        answer = await _token_call(send, "/access_tokens", endpoint="access_tokens", json=body)
        value = answer.get("access_token")
        if not isinstance(value, str) or not value:
            raise AuthError("HM's token answer has no access_token", status=200)
        expires_in = answer.get("expires_in")
        lifetime = (
            float(expires_in) if isinstance(expires_in, int | float) else DEFAULT_TOKEN_LIFETIME_S
        )
        return IssuedToken(Secret(value), lifetime)


class ServiceAccountFlow:
    """The deprecated Service Account API: a JWT exchanged for an ``auth_token``."""

    name = "service_account"

    def __init__(
        self, key: SigningKey, *, audience: str, wall_clock: Callable[[], float] = time.time
    ) -> None:
        key.require_id()
        self._key = key
        self._audience = audience
        self._wall_clock = wall_clock

    async def issue(self, send: Sender) -> IssuedToken:
        assertion = build_assertion(self._key, self._audience, now=self._wall_clock())
        # Form-encoded as the tutorial shows; HM's own code also sends JSON, both are accepted.
        answer = await _token_call(
            send, "/auth_tokens", endpoint="auth_tokens", data={"assertion": assertion}
        )
        # The spec's example shows OAuth-style field names; accept those too.
        value = answer.get("auth_token") or answer.get("access_token")
        if not isinstance(value, str):
            raise AuthError("HM's auth_tokens answer has no auth_token", status=201)
        return IssuedToken(Secret(value), _service_account_lifetime(answer))


def _service_account_lifetime(answer: Mapping[str, Any]) -> float:
    valid_from = parse_timestamp(answer.get("valid_from"))
    valid_until = parse_timestamp(answer.get("valid_until"))
    if valid_from and valid_until:
        # Both stamps come from HM's clock, so their difference is immune to skew with ours.
        return max((valid_until - valid_from).total_seconds(), 0.0)
    if valid_until:
        return max(valid_until.timestamp() - time.time(), 0.0)
    expires_in = answer.get("expires_in")
    return float(expires_in) if isinstance(expires_in, int | float) else DEFAULT_TOKEN_LIFETIME_S


async def _token_call(
    send: Sender,
    path: str,
    *,
    endpoint: str,
    json: Any = None,
    data: Mapping[str, str] | None = None,
) -> Mapping[str, Any]:
    try:
        answer = await send("POST", path, endpoint=endpoint, json=json, data=data)
    except ApiError as exc:
        if exc.retriable or isinstance(exc, AuthError):
            raise
        # OAuth answers bad credentials with 400 {"error": "invalid_request"}: that is an
        # authentication failure for the caller, whatever the status.
        raise AuthError(
            str(exc), status=exc.status, title=exc.title, detail=exc.detail, source=exc.source
        ) from exc
    if not isinstance(answer, dict):
        raise AuthError(f"HM's {endpoint} answer is not a JSON object")
    return answer


def build_flow(
    settings: AuthSettings, *, audience: str, wall_clock: Callable[[], float] = time.time
) -> TokenFlow:
    """The flow ``settings`` select, with its key loaded (CredentialError if it is unusable)."""
    if settings.auth == "client_credentials":
        assert settings.client_id is not None
        return ClientCredentialsFlow(settings.client_id, client_secret=settings.client_secret)
    key = settings.load_key()
    if settings.auth == "private_key":
        assert settings.client_id is not None
        return ClientCredentialsFlow(
            settings.client_id, key=key, audience=audience, wall_clock=wall_clock
        )
    return ServiceAccountFlow(key, audience=audience, wall_clock=wall_clock)
