"""Secrets never reach logs or reprs, even when everything goes wrong and DEBUG is on."""

from __future__ import annotations

import logging

import pytest

from ingest.errors import AuthError
from ingest.hmapi import AuthSettings, Secret

from .conftest import CLIENT_SECRET, ClientFactory, FakeHm, Scripted, hm_errors

VIN = "WBADT43452G296403"


@pytest.mark.parametrize("flow", ["client_credentials", "private_key", "service_account"])
async def test_no_secret_in_captured_logs(
    fake_hm: FakeHm,
    make_client: ClientFactory,
    caplog: pytest.LogCaptureFixture,
    flow: str,
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger: ours, httpx, httpcore, asyncio
    unauthorized = Scripted(401, hm_errors("Not authorized", "invalid token", "Authorization"))
    fake_hm.script("fleet_list", Scripted(503, b""), unauthorized)
    fake_hm.script("fleet_get", unauthorized, unauthorized)
    async with make_client(flow) as hm:
        await hm.list_clearances()
        with pytest.raises(AuthError) as info:
            await hm.get_clearance(VIN)
        token = await hm.fleet_access_token(VIN)
        assert token.refresh_token is not None
        await hm.refresh_access_token(token.refresh_token)
        await hm.revoke_token(token.refresh_token)
        text = "\n".join(r.getMessage() for r in caplog.records)
        dumped = repr(hm.tokens.__dict__) + repr(info.value) + repr(token)
    assert "retrying" in text  # the retries were logged at all
    assert "fleet_vehicles_list" in text
    secrets = [*fake_hm.issued, CLIENT_SECRET, "refresh-1", "refresh-2", f"vehicle-access-{VIN}"]
    secrets += [c.body["client_assertion"] for c in fake_hm.calls("access_tokens")
                if isinstance(c.body, dict) and "client_assertion" in c.body]  # fmt: skip
    secrets += [c.body["assertion"] for c in fake_hm.calls("auth_tokens")]
    assert len(fake_hm.issued) >= 3
    for secret in secrets:
        assert secret not in text
        assert secret not in dumped


def test_auth_settings_repr_masks_client_secret() -> None:
    settings = AuthSettings(client_id="id", client_secret=Secret(CLIENT_SECRET))
    assert CLIENT_SECRET not in repr(settings)
    assert "client_secret=***" in repr(settings)
