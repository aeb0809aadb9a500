"""Fixtures for the emulator tests: a real emulator on a loopback port, driven over real HTTP.

There is no HM client library to use here (another module provides it), so :class:`HM` builds the
requests by hand, which also keeps these tests independent of that client's behaviour.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from aiohttp import web

from ingest.emulator import (
    Behaviour,
    Delays,
    EmulatorConfig,
    EmulatorServer,
    ManualClock,
)

# Long enough that nothing happens until a test advances the clock.
STEP_S = 60.0
TEST_BEHAVIOUR = Behaviour(delays=Delays(STEP_S, STEP_S, STEP_S), cancel_min_age_s=0.0)
TEST_CONFIG = EmulatorConfig(behaviour=TEST_BEHAVIOUR, webhook_backoff_s=0.01, fault_seed=7)
SANDBOX_VIN = "SBXTESTVN00000001"


class HM:
    """Hand-built HM requests against one emulator."""

    def __init__(self, server: EmulatorServer, http: httpx.AsyncClient, clock: ManualClock) -> None:
        self.server = server
        self.http = http
        self.clock = clock
        info = server.info()
        self.base_url: str = info["base_url"]
        self.admin_url: str = info["admin_url"]
        self.client_id: str = info["client_id"]
        self.client_secret: str = info["client_secret"]
        self.webhook_secret: str = info["webhook_secret"]
        self.oauth_key = json.loads(Path(info["private_key_file"]).read_text())
        self.sa_key = json.loads(Path(info["service_account_key_file"]).read_text())

    def assertion(self, key: dict[str, Any], **claims: Any) -> str:
        body: dict[str, Any] = {
            "ver": 2,
            "iss": key["id"],
            "aud": self.base_url,
            "iat": int(self.clock.now()),
            "jti": str(uuid.uuid4()),
        }
        body.update(claims)
        return jwt.encode(body, key["private_key"], algorithm="ES256", headers={"typ": "JWT"})

    async def token(self) -> str:
        response = await self.http.post(
            f"{self.base_url}/access_tokens",
            json={
                "client_id": self.client_id,
                "client_secret": self.client_secret,
                "grant_type": "client_credentials",
            },
        )
        assert response.status_code == 200, response.text
        return str(response.json()["access_token"])

    async def api(
        self, method: str, path: str, token: str | None = None, **kwargs: Any
    ) -> httpx.Response:
        if token is None:
            token = await self.token()
        headers = {"Authorization": f"Bearer {token}"}
        return await self.http.request(method, f"{self.base_url}{path}", headers=headers, **kwargs)

    async def admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = await self.http.request(method, f"{self.admin_url}{path}", **kwargs)
        assert response.status_code < 300, response.text
        return response

    async def advance(self, seconds: float) -> list[dict[str, Any]]:
        response = await self.admin("POST", "/advance", json={"seconds": seconds})
        return list(response.json()["changes"])

    async def add(self, vin: str, brand: str = "sandbox", **tags: str) -> dict[str, Any]:
        body = {"vehicles": [{"vin": vin, "brand": brand, "tags": tags}]}
        response = await self.api("POST", "/fleets/vehicles", json=body)
        assert response.status_code == 200, response.text
        [item] = response.json()["vehicles"]
        assert item["status"] != "error", item
        return dict(item)

    async def status(self, vin: str) -> str:
        response = await self.api("GET", f"/fleets/vehicles/{vin}")
        assert response.status_code == 200, response.text
        return str(response.json()["status"])


@pytest.fixture
def clock() -> ManualClock:
    # Whole seconds, so an assertion iat of "now - 30" is exactly at the tolerance edge.
    return ManualClock(start=float(int(time.time())))


@pytest.fixture
async def hm(tmp_path: Path, clock: ManualClock) -> AsyncIterator[HM]:
    async with (
        EmulatorServer(tmp_path / "emulator", config=TEST_CONFIG, clock=clock) as server,
        httpx.AsyncClient(timeout=10) as http,
    ):
        yield HM(server, http, clock)


class Receiver:
    """A webhook endpoint that checks signatures and can be told to fail the first N requests."""

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.fail_next = 0
        self.requests: list[dict[str, Any]] = []  # every request, failed or not
        self.bad_signatures = 0
        self._changed = asyncio.Condition()
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        key = self.secret.encode()
        want256 = "sha256=" + hmac.new(key, raw, hashlib.sha256).hexdigest()
        want1 = "sha1=" + hmac.new(key, raw, hashlib.sha1).hexdigest()
        ok = hmac.compare_digest(request.headers.get("X-HM-Signature-256", ""), want256)
        ok = ok and hmac.compare_digest(request.headers.get("X-HM-Signature", ""), want1)
        status = 200
        if not ok:
            self.bad_signatures += 1
            status = 401
        elif self.fail_next > 0:
            self.fail_next -= 1
            status = 500
        async with self._changed:
            self.requests.append(
                {"headers": dict(request.headers), "body": json.loads(raw), "status": status}
            )
            self._changed.notify_all()
        return web.Response(status=status)

    def accepted(self, event: str | None = None) -> list[dict[str, Any]]:
        return [
            r
            for r in self.requests
            if r["status"] == 200 and event in (None, r["headers"].get("X-HM-Event"))
        ]

    async def wait_until(self, predicate: Any, deadline_s: float = 5.0) -> None:
        async with asyncio.timeout(deadline_s), self._changed:
            await self._changed.wait_for(lambda: predicate(self))


@pytest.fixture
async def receiver(hm: HM) -> AsyncIterator[Receiver]:
    rec = Receiver(hm.webhook_secret)
    app = web.Application()
    app.router.add_post("/hook", rec.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    rec.url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    yield rec
    await runner.cleanup()
