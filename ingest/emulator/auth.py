"""HTTP side of HM's three authentication flows, plus the Bearer check protected routes use.

* ``POST /v1/access_tokens``: client_credentials with client_secret or with client_assertion,
  and the refresh grant (HM examples say ``refresh``, the spec enum ``refresh_token``: both work).
* ``DELETE /v1/access_tokens``: RFC 7009 revocation.
* ``POST /v1/auth_tokens`` / ``DELETE /v1/auth_tokens/{token}``: the deprecated Service Account API.

Deviation from the reference notes: HM's OAuth spec documents only 400 for failures of
``POST /v1/access_tokens`` (its examples include "client_secret is invalid" and "client_assertion is
signed with an expired key"), so a rejected assertion there is **400** ``invalid_request``. The
Service Account API documents 401 for a bad JWT, so ``/v1/auth_tokens`` answers **401**.
"""

from __future__ import annotations

import hmac
from datetime import UTC, datetime

from aiohttp import web

from ingest.emulator.context import EMULATOR, Emulator
from ingest.emulator.errors import (
    hm_error,
    hm_error_array,
    oauth_error,
    read_params,
    unauthorized,
)
from ingest.emulator.tokens import (
    APP_SCOPES,
    SERVICE_ACCOUNT_SCOPES,
    IssuedToken,
    TokenRejected,
)

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
REFRESH_GRANTS = frozenset({"refresh_token", "refresh"})


def require_scope(request: web.Request, scope: str, forbidden_status: int = 403) -> IssuedToken:
    """The request's live Bearer token if it carries ``scope``; else raise HM's 401/403."""
    emu = request.app[EMULATOR]
    header = request.headers.get("Authorization", "")
    kind, _, token = header.partition(" ")
    if kind.lower() != "bearer" or not token:
        raise unauthorized(
            "Missing or invalid authorization header. The token must be sent as a header with "
            'the format "Authorization: Bearer <token>"'
        )
    try:
        info = emu.tokens.lookup(token.strip())
    except TokenRejected as exc:
        raise unauthorized(str(exc)) from exc
    if scope not in info.scopes:
        title = "Forbidden" if forbidden_status == 403 else "Not authorized"
        raise hm_error(forbidden_status, title, f"token lacks scope {scope}", "Authorization")
    return info


def _check_client(emu: Emulator, params: dict[str, object], need_secret: bool) -> None:
    blank = [k for k in ("client_id", "client_secret") if not params.get(k)]
    if not need_secret and "client_secret" in blank:
        blank.remove("client_secret")
    if blank:
        raise oauth_error(", ".join(f"{k} can't be blank" for k in blank))
    if not hmac.compare_digest(str(params["client_id"]), emu.creds.client_id):
        raise oauth_error("client_id is invalid")
    if need_secret and not hmac.compare_digest(
        str(params["client_secret"]), emu.creds.client_secret
    ):
        raise oauth_error("client_secret is invalid")


async def post_access_tokens(request: web.Request) -> web.Response:
    emu = request.app[EMULATOR]
    params = await read_params(request)
    grant = params.get("grant_type")
    if grant == "client_credentials":
        assertion = params.get("client_assertion")
        if assertion is None:
            _check_client(emu, params, need_secret=True)
        else:
            _check_client(emu, params, need_secret=False)
            if params.get("client_assertion_type") != ASSERTION_TYPE:
                raise oauth_error(f"client_assertion_type must be {ASSERTION_TYPE}")
            try:
                emu.tokens.verify_assertion(str(assertion), emu.creds.oauth_key)
            except TokenRejected as exc:
                raise oauth_error(f"client_assertion is invalid: {exc}") from exc
        token, _ = emu.tokens.issue("app", APP_SCOPES, emu.creds.client_id)
        return web.json_response(
            {
                "access_token": token,
                "expires_in": emu.tokens.expires_in_s,
                "scope": APP_SCOPES,
                "token_type": "bearer",
            }
        )
    if grant in REFRESH_GRANTS:
        _check_client(emu, params, need_secret=True)
        refresh = str(params.get("refresh_token") or "")
        found = emu.tokens.refresh_grants.get(refresh)
        if found is None:
            raise oauth_error("refresh_token is invalid")
        token, _ = emu.tokens.issue("vehicle", found.scope, emu.creds.client_id, vin=found.vin)
        # HM's refresh example returns the same refresh token, so it is not rotated here.
        return web.json_response(
            {
                "access_token": token,
                "refresh_token": refresh,
                "expires_in": emu.tokens.expires_in_s,
                "scope": found.scope,
                "token_type": "bearer",
                "status": "approved",
            }
        )
    if not grant:
        raise oauth_error("grant_type can't be blank")
    raise oauth_error(f"grant_type {grant} is not supported")


async def delete_access_tokens(request: web.Request) -> web.Response:
    emu = request.app[EMULATOR]
    params = await read_params(request)
    _check_client(emu, params, need_secret=True)
    if not params.get("token"):
        raise oauth_error("token can't be blank")
    # RFC 7009 2.2: an unknown token also gets 200, so clients cannot probe for tokens.
    emu.tokens.revoke(str(params["token"]))
    return web.Response(status=200)


def _naive_iso(ts: float) -> str:
    # The reference notes these timestamps may come without a zone; emulate that (they are UTC).
    return datetime.fromtimestamp(ts, UTC).replace(tzinfo=None).isoformat()


async def post_auth_tokens(request: web.Request) -> web.Response:
    emu = request.app[EMULATOR]
    params = await read_params(request)
    assertion = params.get("assertion")
    if not assertion:
        raise hm_error_array(422, "Invalid input", "assertion can't be blank", "assertion")
    try:
        emu.tokens.verify_assertion(str(assertion), emu.creds.service_account_key)
    except TokenRejected as exc:
        raise hm_error(401, "Not authorized", str(exc), "assertion") from exc
    token, info = emu.tokens.issue("service_account", SERVICE_ACCOUNT_SCOPES, emu.creds.client_id)
    body = {
        "auth_token": token,
        "valid_from": _naive_iso(info.iat),
        "valid_until": _naive_iso(info.exp),
    }
    return web.json_response(body, status=201)


async def delete_auth_token(request: web.Request) -> web.Response:
    emu = request.app[EMULATOR]
    token = request.match_info["auth_token"]
    try:
        info = emu.tokens.lookup(token)
    except TokenRejected as exc:
        raise hm_error_array(404, "Not found", str(exc), "auth_token") from exc
    if info.kind != "service_account":
        raise hm_error_array(404, "Not found", "not a service account token", "auth_token")
    info.revoked = True
    # The spec documents 201 with the revoked token's description as the success answer.
    body = {
        "auth_token": token,
        "valid_from": _naive_iso(info.iat),
        "valid_until": _naive_iso(info.exp),
    }
    return web.json_response(body, status=201)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/access_tokens", post_access_tokens)
    app.router.add_delete("/v1/access_tokens", delete_access_tokens)
    app.router.add_post("/v1/auth_tokens", post_auth_tokens)
    app.router.add_delete("/v1/auth_tokens/{auth_token}", delete_auth_token)
