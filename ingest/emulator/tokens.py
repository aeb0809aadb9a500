"""Issuing and checking the tokens the emulator hands out, and verifying client JWT assertions.

Issued tokens are ES256 JWTs signed with the emulator's own key, like HM's. They are also recorded
in memory (by ``jti``) so they can be revoked and so a token from before a restart is *unknown*
(401): clients must re-authenticate once on a 401, and this exercises that path. All time checks
use the injected clock, so pyjwt's own wall-clock checks are switched off.
"""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import jwt

from ingest.emulator.clock import Clock
from ingest.emulator.keys import ClientKey, Credentials, public_pem

APP_SCOPES = "fleet:clearance vehicle:eligibility-check vehicle:data"
# The Service Account API's example token also carries fleet:geofencing.
SERVICE_ACCOUNT_SCOPES = "fleet:clearance fleet:geofencing vehicle:eligibility-check vehicle:data"
VEHICLE_SCOPES = "vehicle:data"  # per-VIN pull token: no fleet management rights
IAT_TOLERANCE_S = 30  # HM accepts assertions whose iat is within 30 s of its clock
_NO_TIME_CHECKS: jwt.types.Options = {"verify_exp": False, "verify_iat": False, "verify_nbf": False}

_ASSERTION_CHECKS: jwt.types.Options = {
    **_NO_TIME_CHECKS,
    "require": ["iss", "aud", "iat", "jti"],
}

TokenKind = Literal["app", "service_account", "vehicle"]


class TokenRejected(Exception):
    """A bearer token or a client assertion failed a check; the message says which."""


@dataclass
class IssuedToken:
    jti: str
    kind: TokenKind
    scopes: frozenset[str]
    iat: float
    exp: float
    vin: str | None = None
    revoked: bool = False


@dataclass(frozen=True)
class RefreshGrant:
    vin: str
    scope: str


class TokenAuthority:
    def __init__(self, creds: Credentials, clock: Clock, expires_in_s: int) -> None:
        self._creds = creds
        self._clock = clock
        self.expires_in_s = expires_in_s
        self._signing_public = public_pem(creds.signing_key_pem)
        self._issued: dict[str, IssuedToken] = {}
        self._used_jtis: dict[str, float] = {}  # assertion jti → iat, pruned once too old to pass
        self.refresh_grants: dict[str, RefreshGrant] = {}
        self.base_url = ""  # set once the server has bound its port; the assertions' aud

    # -- tokens we issue ------------------------------------------------------------------
    def issue(
        self, kind: TokenKind, scope: str, sub: str, vin: str | None = None
    ) -> tuple[str, IssuedToken]:
        now = self._clock.now()
        info = IssuedToken(
            str(uuid.uuid4()), kind, frozenset(scope.split()), now, now + self.expires_in_s, vin
        )
        claims: dict[str, Any] = {
            "iss": f"{self.base_url}/access_tokens",
            "sub": sub,
            "iat": int(info.iat),
            "exp": int(info.exp),
            "jti": info.jti,
            "scope": scope,
            "ver": 1,
        }
        if vin is not None:
            claims["vin"] = vin
        self._issued[info.jti] = info
        return jwt.encode(claims, self._creds.signing_key_pem, algorithm="ES256"), info

    def lookup(self, token: str) -> IssuedToken:
        """The live token ``token`` stands for; raises :class:`TokenRejected`."""
        try:
            claims = jwt.decode(
                token, self._signing_public, algorithms=["ES256"], options=_NO_TIME_CHECKS
            )
        except jwt.PyJWTError as exc:
            raise TokenRejected("token is not a valid token issued by this server") from exc
        info = self._issued.get(str(claims.get("jti")))
        if info is None or info.revoked:
            raise TokenRejected("token is unknown or revoked")
        if info.exp <= self._clock.now():
            raise TokenRejected("token has expired")
        return info

    def revoke(self, token: str) -> bool:
        if self.refresh_grants.pop(token, None) is not None:
            return True
        try:
            info = self.lookup(token)
        except TokenRejected:
            return False
        info.revoked = True
        return True

    def new_refresh_token(self, vin: str, scope: str) -> str:
        token = secrets.token_urlsafe(24)
        self.refresh_grants[token] = RefreshGrant(vin, scope)
        return token

    # -- assertions clients sign ----------------------------------------------------------
    def verify_assertion(self, assertion: str, key: ClientKey) -> None:
        """Check a client JWT: ES256 by ``key``, iss = key id, aud, fresh iat, single-use jti."""
        try:
            if jwt.get_unverified_header(assertion).get("alg") != "ES256":
                raise TokenRejected("assertion must be signed with ES256")
            claims = jwt.decode(
                assertion,
                public_pem(key.private_pem),
                algorithms=["ES256"],
                audience=self.base_url,
                issuer=key.id,
                options=_ASSERTION_CHECKS,
            )
        except jwt.InvalidAudienceError as exc:
            raise TokenRejected(f"assertion aud must be {self.base_url}") from exc
        except jwt.InvalidIssuerError as exc:
            raise TokenRejected("assertion iss is not a registered key id") from exc
        except jwt.PyJWTError as exc:
            raise TokenRejected(f"assertion is invalid: {exc}") from exc
        now = self._clock.now()
        iat = _as_unix(claims["iat"])
        if iat is None or abs(now - iat) > IAT_TOLERANCE_S:
            raise TokenRejected(f"assertion iat must be within {IAT_TOLERANCE_S} s of now")
        self._used_jtis = {
            j: t for j, t in self._used_jtis.items() if now - t <= 2 * IAT_TOLERANCE_S
        }
        jti = str(claims["jti"])
        if jti in self._used_jtis:
            raise TokenRejected("assertion jti was already used")
        self._used_jtis[jti] = iat


def _as_unix(value: object) -> float | None:
    # Integer seconds per the reference; the oldest examples carry an ISO 8601 string instead.
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value).timestamp()
        except ValueError:
            return None
    return None
