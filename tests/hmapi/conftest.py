"""A small, real HM REST server (aiohttp on loopback) for the hmapi tests.

It implements only what the tests need, but for real: the token endpoints verify the JWT's ES256
signature with the public key, its ``aud``, ``iat`` window and single-use ``jti``; fleet endpoints
check the Bearer token. Tests script failures by queueing responses per route (``fake.script``).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ingest.hmapi import AuthSettings, HmApiClient, RetryPolicy, Secret

CLIENT_ID = "0f1e2d3c-client-id"
CLIENT_SECRET = "client-secret-Zq8Xw2"
KEY_ID = "5e3cc349-1c6f-4975-aeaa-9d319086190b"
IAT_TOLERANCE_S = 30


@dataclass
class Recorded:
    route: str
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any


@dataclass
class Scripted:
    status: int
    body: Any = None  # JSON-encoded unless bytes
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


def hm_errors(status_title: str, detail: str, source: str = "vin") -> dict[str, Any]:
    return {"errors": [{"title": status_title, "detail": detail, "source": source}]}


@dataclass
class FakeHm:
    public_key: ec.EllipticCurvePublicKey
    base_url: str = ""
    token_lifetime_s: int = 300
    # "valid_until" without a zone, as HM's service-account API may send it.
    naive_timestamps: bool = True
    accepted_refresh_grant: str = "refresh_token"
    expected_audience: str | None = None  # None: the server's own base URL
    requests: list[Recorded] = field(default_factory=list)
    scripts: dict[str, deque[Scripted]] = field(default_factory=dict)
    jwt_claims: list[dict[str, Any]] = field(default_factory=list)
    jwt_headers: list[dict[str, Any]] = field(default_factory=list)
    seen_jti: set[str] = field(default_factory=set)
    valid_tokens: set[str] = field(default_factory=set)
    issued: list[str] = field(default_factory=list)
    clearances: dict[str, dict[str, Any]] = field(default_factory=dict)

    def script(self, route: str, *responses: Scripted) -> None:
        self.scripts.setdefault(route, deque()).extend(responses)

    def calls(self, route: str) -> list[Recorded]:
        return [r for r in self.requests if r.route == route]

    def add_clearance(self, vin: str, status: str, brand: str = "bmw") -> None:
        self.clearances[vin] = {
            "vin": vin,
            "status": status,
            "brand": brand,
            "tags": {"fleet": "a"},
            "changelog": [{"timestamp": "2024-03-22T09:36:51", "status": status}],
            "approved_at": None,  # an unknown field the client must ignore
        }

    # -- helpers ------------------------------------------------------------------------

    def _issue(self) -> str:
        token = f"tok-{uuid.uuid4().hex}"
        self.valid_tokens.add(token)
        self.issued.append(token)
        return token

    def _verify_assertion(self, assertion: str) -> str | None:
        """None if the JWT is acceptable, else why not (recorded claims either way)."""
        try:
            header = jwt.get_unverified_header(assertion)
            claims = jwt.decode(
                assertion,
                self.public_key,
                algorithms=["ES256"],
                audience=self.expected_audience or self.base_url,
                options={"require": ["iss", "aud", "iat", "jti"]},
            )
        except jwt.PyJWTError as exc:
            return f"invalid assertion: {exc}"
        self.jwt_headers.append(header)
        self.jwt_claims.append(claims)
        if header.get("typ") != "JWT" or header.get("alg") != "ES256":
            return "bad header"
        if claims.get("iss") != KEY_ID or claims.get("ver") != 2:
            return "bad iss or ver"
        if not isinstance(claims["iat"], int) or abs(claims["iat"] - time.time()) > IAT_TOLERANCE_S:
            return "iat outside tolerance"
        if claims["jti"] in self.seen_jti:
            return "jti already used"
        self.seen_jti.add(claims["jti"])
        return None

    def _authorized(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        return header.startswith("Bearer ") and header[7:] in self.valid_tokens


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(body), content_type="application/json", headers=headers
    )


def _unauthorized() -> web.Response:
    return _json(
        401,
        hm_errors("Not authorized", "Missing or invalid authorization header", "Authorization"),
    )


def build_app(fake: FakeHm) -> web.Application:
    async def record(request: web.Request, route: str) -> web.StreamResponse | None:
        raw = await request.read()
        body: Any
        if request.content_type == "application/x-www-form-urlencoded":
            body = dict((await request.post()).items())
        else:
            body = orjson.loads(raw) if raw else None
        fake.requests.append(
            Recorded(route, request.method, request.path, dict(request.query),
                     dict(request.headers), body)
        )  # fmt: skip
        queue = fake.scripts.get(route)
        if queue:
            scripted = queue.popleft()
            await asyncio.sleep(scripted.delay_s)
            payload = (
                scripted.body if isinstance(scripted.body, bytes) else orjson.dumps(scripted.body)
            )
            return web.Response(
                status=scripted.status,
                body=payload,
                headers=scripted.headers,
                content_type="application/json",
            )
        return None

    async def access_tokens(request: web.Request) -> web.StreamResponse:
        scripted = await record(request, "access_tokens")
        if scripted:
            return scripted
        body = fake.requests[-1].body or {}
        if request.method == "DELETE":
            ok = body.get("client_secret") == CLIENT_SECRET and body.get("token")
            return web.Response(status=200) if ok else _json(400, {"error": "invalid_client"})
        grant = body.get("grant_type")
        if grant in ("refresh_token", "refresh"):
            if grant != fake.accepted_refresh_grant:
                return _json(
                    400,
                    {
                        "error": "unsupported_grant_type",
                        "error_description": f"grant_type {grant} is not supported",
                    },
                )
            if body.get("client_secret") != CLIENT_SECRET:
                return _json(400, {"error": "invalid_client"})
            return _json(
                200,
                {
                    "access_token": "vehicle-access-2",
                    "refresh_token": "refresh-2",
                    "expires_in": 3600,
                    "scope": "diagnostics.get.mileage",
                    "token_type": "bearer",
                },
            )
        if grant != "client_credentials" or body.get("client_id") != CLIENT_ID:
            return _json(400, {"error": "invalid_request", "error_description": "bad grant"})
        if "client_assertion" in body:
            if body.get("client_assertion_type") != (
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
            ):
                return _json(
                    400,
                    {
                        "error": "invalid_request",
                        "error_description": "client_assertion_type is invalid",
                    },
                )
            problem = fake._verify_assertion(body["client_assertion"])
            if problem:
                return _json(400, {"error": "invalid_request", "error_description": problem})
        elif body.get("client_secret") != CLIENT_SECRET:
            return _json(
                400, {"error": "invalid_request", "error_description": "client_secret is invalid"}
            )
        return _json(200, {"access_token": fake._issue(), "expires_in": fake.token_lifetime_s,
                           "scope": "fleet:clearance", "token_type": "bearer"})  # fmt: skip

    async def auth_tokens(request: web.Request) -> web.StreamResponse:
        scripted = await record(request, "auth_tokens")
        if scripted:
            return scripted
        body = fake.requests[-1].body or {}
        problem = fake._verify_assertion(str(body.get("assertion", "")))
        if problem:
            return _json(401, hm_errors("Not authorized", problem, "Authorization"))
        now = datetime.now(UTC).replace(microsecond=0)
        until = now + timedelta(seconds=fake.token_lifetime_s)

        def fmt(moment: datetime) -> str:
            return (moment.replace(tzinfo=None) if fake.naive_timestamps else moment).isoformat()

        return _json(201, {"auth_token": fake._issue(), "valid_from": fmt(now),
                           "valid_until": fmt(until)})  # fmt: skip

    def fleet(route: str, handler: Callable[[web.Request, Any], web.StreamResponse]) -> Any:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            scripted = await record(request, route)
            if scripted:
                return scripted
            if not fake._authorized(request):
                return _unauthorized()
            return handler(request, fake.requests[-1].body)

        return wrapped

    def create(_: web.Request, body: Any) -> web.StreamResponse:
        results = []
        for vehicle in body["vehicles"]:
            vin = vehicle["vin"]
            if vin.startswith("BAD"):
                results.append({"vin": vin, "status": "error",
                                "description": "vin should be 17 character(s)"})  # fmt: skip
                continue
            fake.add_clearance(vin, "pending", vehicle["brand"])
            results.append({"vin": vin, "status": "pending", "tags": vehicle.get("tags", {})})
        return _json(200, {"vehicles": results})

    def listing(request: web.Request, _: Any) -> web.StreamResponse:
        items = list(fake.clearances.values())
        if "filter" in request.query:
            wanted = orjson.loads(request.query["filter"])["status"]["value"]
            items = [c for c in items if c["status"] in wanted]
        return _json(200, items)

    def get_one(request: web.Request, _: Any) -> web.StreamResponse:
        vin = request.match_info["vin"]
        if vin not in fake.clearances:
            return _json(404, hm_errors("Not found", f"Clearance for {vin} not found"))
        return _json(200, fake.clearances[vin])

    def delete_one(request: web.Request, _: Any) -> web.StreamResponse:
        vin = request.match_info["vin"]
        current = fake.clearances.get(vin)
        if current is None:
            return _json(404, hm_errors("Not found", "Clearance not found"))
        new = {"approved": "revoking", "pending": "canceling"}.get(current["status"])
        if new is None:
            return _json(409, hm_errors("Conflict", "Clearance is already removed"))
        current["status"] = new
        return _json(200, {"vin": vin, "status": new, "tags": current["tags"]})

    def eligibility(_: web.Request, body: Any) -> web.StreamResponse:
        return _json(200, {"vin": body["vin"], "eligible": True, "data_delivery": ["pull", "push"],
                           "connectivity_status": "activated", "future_field": 1})  # fmt: skip

    def vehicle_token(_: web.Request, body: Any) -> web.StreamResponse:
        return _json(200, {"access_token": f"vehicle-access-{body['vin']}",
                           "refresh_token": "refresh-1", "expires_in": 600,
                           "scope": "diagnostics.get.mileage", "token_type": "bearer"})  # fmt: skip

    app = web.Application()
    app.router.add_route("POST", "/v1/access_tokens", access_tokens)
    app.router.add_route("DELETE", "/v1/access_tokens", access_tokens)
    app.router.add_post("/v1/auth_tokens", auth_tokens)
    app.router.add_post("/v1/fleets/vehicles", fleet("fleet_create", create))
    app.router.add_get("/v1/fleets/vehicles", fleet("fleet_list", listing))
    app.router.add_get("/v1/fleets/vehicles/{vin}", fleet("fleet_get", get_one))
    app.router.add_delete("/v1/fleets/vehicles/{vin}", fleet("fleet_delete", delete_one))
    app.router.add_post("/v1/eligibility", fleet("eligibility", eligibility))
    app.router.add_post("/v1/fleets/access_tokens", fleet("fleet_access_tokens", vehicle_token))
    return app


@pytest.fixture
def private_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def key_json_file(tmp_path: Path, private_key: ec.EllipticCurvePrivateKey) -> Path:
    pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    path = tmp_path / f"service-account-private-key-{KEY_ID}.json"
    path.write_bytes(
        orjson.dumps(
            {
                "inserted_at": "2024-01-01T10:00:00",
                "private_key": pem,
                "instance_uri": "https://sandbox.api.high-mobility.com",
                "token_uri": "https://sandbox.api.high-mobility.com/v1/auth_tokens",
                "id": KEY_ID,
            }
        )
    )
    return path


@pytest.fixture
async def fake_hm(private_key: ec.EllipticCurvePrivateKey) -> AsyncIterator[FakeHm]:
    fake = FakeHm(public_key=private_key.public_key())
    runner = web.AppRunner(build_app(fake))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    fake.base_url = f"http://{host}:{port}/v1"
    try:
        yield fake
    finally:
        await runner.cleanup()


@dataclass
class Sleeps:
    """An injected sleep: records each wait and returns at once, so retry tests run fast."""

    waits: list[float] = field(default_factory=list)

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        await asyncio.sleep(0)


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


ClientFactory = Callable[..., HmApiClient]


@pytest.fixture
def make_client(fake_hm: FakeHm, key_json_file: Path, sleeps: Sleeps) -> ClientFactory:
    def make(auth: str = "client_credentials", **options: Any) -> HmApiClient:
        settings = AuthSettings(
            auth=auth,  # type: ignore[arg-type]
            client_id=CLIENT_ID,
            client_secret=Secret(CLIENT_SECRET),
            private_key_file=key_json_file,
        )
        options.setdefault("retry", RetryPolicy(max_attempts=4, backoff_base_s=0.01))
        options.setdefault("sleep", sleeps)
        options.setdefault("timeout_s", 5.0)
        return HmApiClient(settings, base_url=fake_hm.base_url, **options)

    return make
