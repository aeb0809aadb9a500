"""Fixtures for the fleet tests: the HM emulator on a real loopback port with a manual clock,
the project's API client built from ``[api]`` settings, and a fresh store and metrics each test."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from ingest.config import ApiSettings
from ingest.emulator import Behaviour, Delays, EmulatorConfig, EmulatorServer, ManualClock
from ingest.fleet import ClearanceStateStore, TransitionHistory, build_api_client
from ingest.hmapi import HmApiClient, RetryPolicy
from ingest.metrics import Metrics

# Nothing happens on its own until a test advances the emulator's clock by STEP_S.
STEP_S = 60.0
TEST_CONFIG = EmulatorConfig(
    behaviour=Behaviour(delays=Delays(STEP_S, STEP_S, STEP_S), cancel_min_age_s=0.0),
    fault_seed=7,
)
# Fast client retries: a 429's "retry after 10s" is capped to 10 ms here.
TEST_RETRY = RetryPolicy(max_attempts=2, backoff_base_s=0.001, max_rate_limit_wait_s=0.01)


def vin(n: int, last: str = "0") -> str:
    """A valid VIN numbered ``n``; the emulator rejects VINs ending in R."""
    return f"SBXFLEET{n:08d}{last}"


@dataclass
class Emulator:
    server: EmulatorServer
    http: httpx.AsyncClient
    clock: ManualClock

    @property
    def info(self) -> dict[str, Any]:
        return self.server.info()

    def api_settings(self) -> ApiSettings:
        info = self.info
        return ApiSettings(
            base_url=info["base_url"],
            client_id=info["client_id"],
            client_secret=SecretStr(info["client_secret"]),
        )

    async def admin(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await self.http.request(method, f"{self.server.admin_url}{path}", **kwargs)
        assert response.status_code < 300, response.text
        return response.json()

    async def advance(self, seconds: float = STEP_S) -> list[dict[str, Any]]:
        return list((await self.admin("POST", "/advance", json={"seconds": seconds}))["changes"])

    async def fault(self, **rule: Any) -> None:
        await self.admin("POST", "/faults", json=rule)

    async def clear_faults(self) -> None:
        await self.admin("DELETE", "/faults")

    async def statuses(self) -> dict[str, str]:
        state = await self.admin("GET", "/state")
        return {v["vin"]: v["status"] for v in state["vehicles"]}


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(start=float(int(time.time())))


@pytest.fixture
async def emulator(tmp_path: Path, clock: ManualClock) -> AsyncIterator[Emulator]:
    async with (
        EmulatorServer(tmp_path / "emulator", config=TEST_CONFIG, clock=clock) as server,
        httpx.AsyncClient(timeout=10) as http,
    ):
        yield Emulator(server, http, clock)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


@pytest.fixture
async def client(emulator: Emulator, metrics: Metrics) -> AsyncIterator[HmApiClient]:
    async with build_api_client(emulator.api_settings(), metrics=metrics, retry=TEST_RETRY) as api:
        yield api


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ClearanceStateStore]:
    with ClearanceStateStore(tmp_path / "state" / "clearance.sqlite3") as opened:
        yield opened


@pytest.fixture
def history(store: ClearanceStateStore, tmp_path: Path) -> TransitionHistory:
    return TransitionHistory(store, tmp_path / "out")


def api_calls(metrics: Metrics, endpoint: str, status: int = 200) -> float:
    """Requests the client reported for ``endpoint`` (through build_api_client's metrics hook)."""
    value = metrics.registry.get_sample_value(
        "hm_ingest_api_requests_total", {"endpoint": endpoint, "status": str(status)}
    )
    return value or 0.0
