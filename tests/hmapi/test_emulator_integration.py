"""The client against the project's HM emulator (``ingest.emulator``), all three auth flows.

Skipped while the emulator is not importable: it is built alongside this client.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ingest.hmapi import AuthSettings, HmApiClient, RetryPolicy, Secret, VehicleRequest

emulator_app = pytest.importorskip("ingest.emulator.app", reason="HM emulator not available yet")

VINS = ["WBADT43452G296403", "WBADT43452G296404"]


def _settings(info: dict[str, Any], flow: str) -> AuthSettings:
    key_file = info["service_account_key_file" if flow == "service_account" else "private_key_file"]
    return AuthSettings(
        auth=flow,  # type: ignore[arg-type]
        client_id=info["client_id"],
        client_secret=Secret(info["client_secret"]),
        private_key_file=Path(key_file),
    )


@pytest.mark.parametrize("flow", ["client_credentials", "private_key", "service_account"])
async def test_clearance_round_trip(tmp_path: Path, flow: str) -> None:
    async with emulator_app.EmulatorServer(tmp_path) as server:
        info = server.info()
        client = HmApiClient(
            _settings(info, flow),
            base_url=info["base_url"],
            retry=RetryPolicy(max_attempts=3, backoff_base_s=0.01),
        )
        async with client as hm:
            created = await hm.create_clearances([VehicleRequest(v, "sandbox") for v in VINS])
            listed = await hm.list_clearances()
            one = await hm.get_clearance(VINS[0])
    assert [r.vin for r in created] == VINS
    assert all(not r.is_error for r in created)
    assert {c.vin for c in listed} >= set(VINS)
    assert one.vin == VINS[0]
    assert hm.tokens.renewals == 1
