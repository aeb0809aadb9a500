from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from ingest.errors import AuthError, ConfigError, CredentialError
from ingest.hmapi import AuthSettings, HmApiClient, Secret, TokenRenewedEvent, load_signing_key
from ingest.hmapi.auth import build_flow
from ingest.hmapi.events import ApiEvent
from ingest.hmapi.tokens import renew_margin_s

from .conftest import CLIENT_ID, CLIENT_SECRET, KEY_ID, ClientFactory, FakeHm, Scripted

VIN = "WBADT43452G296403"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_client_credentials_flow_sends_id_and_secret(
    fake_hm: FakeHm, make_client: ClientFactory
) -> None:
    async with make_client("client_credentials") as hm:
        await hm.list_clearances()
    [call] = fake_hm.calls("access_tokens")
    assert call.body == {
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "grant_type": "client_credentials",
    }
    assert call.headers["Content-Type"] == "application/json"
    [listing] = fake_hm.calls("fleet_list")
    assert listing.headers["Authorization"] == f"Bearer {fake_hm.issued[0]}"


async def test_private_key_flow_sends_a_verified_client_assertion(
    fake_hm: FakeHm, make_client: ClientFactory
) -> None:
    before = int(time.time())
    async with make_client("private_key") as hm:
        await hm.list_clearances()
    [call] = fake_hm.calls("access_tokens")
    assert set(call.body) == {
        "client_id",
        "client_assertion",
        "client_assertion_type",
        "grant_type",
    }
    assert call.body["client_assertion_type"] == (
        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    )
    assert call.body["grant_type"] == "client_credentials"
    # The server verified the signature with the public key and the audience; check the claims.
    [header] = fake_hm.jwt_headers
    assert header == {"alg": "ES256", "typ": "JWT"}
    [claims] = fake_hm.jwt_claims
    assert claims["ver"] == 2
    assert claims["iss"] == KEY_ID
    assert claims["aud"] == fake_hm.base_url
    assert isinstance(claims["iat"], int)
    assert before <= claims["iat"] <= int(time.time())
    assert uuid.UUID(claims["jti"]).version == 4
    assert len(fake_hm.calls("fleet_list")) == 1


async def test_service_account_flow_posts_a_form_encoded_assertion(
    fake_hm: FakeHm, make_client: ClientFactory
) -> None:
    async with make_client("service_account") as hm:
        await hm.list_clearances()
    [call] = fake_hm.calls("auth_tokens")
    assert call.headers["Content-Type"].startswith("application/x-www-form-urlencoded")
    assert list(call.body) == ["assertion"]
    [claims] = fake_hm.jwt_claims
    assert claims["iss"] == KEY_ID
    assert claims["aud"] == fake_hm.base_url
    assert fake_hm.calls("fleet_list")[0].headers["Authorization"] == (
        f"Bearer {fake_hm.issued[0]}"
    )


@pytest.mark.parametrize("naive", [True, False])
async def test_service_account_lifetime_from_zoned_or_naive_timestamps(
    fake_hm: FakeHm, make_client: ClientFactory, naive: bool
) -> None:
    fake_hm.naive_timestamps = naive
    fake_hm.token_lifetime_s = 600
    events: list[ApiEvent] = []
    async with make_client("service_account", on_event=events.append) as hm:
        await hm.list_clearances()
    [renewal] = [e for e in events if isinstance(e, TokenRenewedEvent)]
    assert renewal.lifetime_s == 600
    assert renewal.flow == "service_account"


async def test_each_assertion_has_a_fresh_jti(fake_hm: FakeHm, make_client: ClientFactory) -> None:
    async with make_client("private_key") as hm:
        await hm.list_clearances()
        hm.tokens.invalidate()
        await hm.list_clearances()
    assert len(fake_hm.jwt_claims) == 2
    assert fake_hm.jwt_claims[0]["jti"] != fake_hm.jwt_claims[1]["jti"]
    assert len(fake_hm.issued) == 2


async def test_wrong_audience_is_refused_by_the_server_as_auth_error(
    fake_hm: FakeHm, make_client: ClientFactory
) -> None:
    fake_hm.expected_audience = "https://api.high-mobility.com/v1"  # as production would
    async with make_client("private_key") as hm:
        with pytest.raises(AuthError) as info:
            await hm.list_clearances()
    assert info.value.status == 400
    assert info.value.title == "invalid_request"
    assert "audience" in (info.value.detail or "").lower()
    assert fake_hm.calls("fleet_list") == []


async def test_bad_client_secret_raises_auth_error_without_retrying(
    fake_hm: FakeHm, make_client: ClientFactory
) -> None:
    fake_hm.script(
        "access_tokens",
        Scripted(
            400, {"error": "invalid_request", "error_description": "client_secret is invalid"}
        ),
    )
    async with make_client() as hm:
        with pytest.raises(AuthError, match="client_secret is invalid") as info:
            await hm.list_clearances()
    assert info.value.detail == "client_secret is invalid"
    assert len(fake_hm.calls("access_tokens")) == 1


async def test_token_endpoint_5xx_is_retried(fake_hm: FakeHm, make_client: ClientFactory) -> None:
    fake_hm.script("access_tokens", Scripted(503, b"<html>down</html>"))
    async with make_client() as hm:
        assert await hm.list_clearances() == []
    assert len(fake_hm.calls("access_tokens")) == 2


async def test_token_is_cached_and_renewed_ahead_of_expiry(
    fake_hm: FakeHm, make_client: ClientFactory
) -> None:
    clock = FakeClock()
    events: list[ApiEvent] = []
    async with make_client(clock=clock, on_event=events.append) as hm:
        await hm.list_clearances()
        clock.now += 200  # 100 s left of 300: more than the 30 s margin
        await hm.list_clearances()
        assert len(fake_hm.issued) == 1
        clock.now += 71  # 29 s left: inside the margin, renew before HM would refuse it
        await hm.list_clearances()
        assert len(fake_hm.issued) == 2
        assert hm.tokens.renewals == 2
    tokens = [c.headers["Authorization"] for c in fake_hm.calls("fleet_list")]
    assert tokens == [f"Bearer {fake_hm.issued[0]}"] * 2 + [f"Bearer {fake_hm.issued[1]}"]
    renewals = [e for e in events if isinstance(e, TokenRenewedEvent)]
    assert [r.reason for r in renewals] == ["initial", "expiring"]


def test_renew_margin() -> None:
    assert renew_margin_s(300) == 30  # 10 % would be 30 too
    assert renew_margin_s(3600) == 360  # 10 % of a long-lived token
    assert renew_margin_s(40) == 20  # short tokens: half their life, not always stale


async def test_concurrent_callers_share_one_renewal(
    fake_hm: FakeHm, make_client: ClientFactory
) -> None:
    async with make_client() as hm:
        results = await asyncio.gather(*(hm.list_clearances() for _ in range(20)))
    assert len(results) == 20
    assert len(fake_hm.calls("access_tokens")) == 1
    assert len(fake_hm.calls("fleet_list")) == 20


async def test_invalidate_with_a_stale_token_keeps_the_newer_one(
    fake_hm: FakeHm, make_client: ClientFactory
) -> None:
    async with make_client() as hm:
        first = await hm.tokens.token()
        hm.tokens.invalidate(first)
        second = await hm.tokens.token()
        hm.tokens.invalidate(first)  # a late caller still holding the old token
        assert await hm.tokens.token() == second
    assert first != second
    assert len(fake_hm.issued) == 2


def test_settings_name_the_missing_key(key_json_file: Path) -> None:
    with pytest.raises(ConfigError) as info:
        AuthSettings(auth="client_credentials", client_id=CLIENT_ID)
    assert info.value.key == "api.client_secret"
    with pytest.raises(ConfigError) as info:
        AuthSettings(auth="service_account")
    assert info.value.key == "api.private_key_file"
    with pytest.raises(ConfigError) as info:
        AuthSettings(auth="private_key", private_key_file=key_json_file)
    assert info.value.key == "api.client_id"
    with pytest.raises(ConfigError) as info:
        AuthSettings(auth="magic")  # type: ignore[arg-type]
    assert info.value.key == "api.auth"


def test_a_bad_key_file_stops_client_construction(tmp_path: Path) -> None:
    path = tmp_path / "key.json"
    path.write_text("garbage")
    settings = AuthSettings(auth="service_account", private_key_file=path)
    with pytest.raises(CredentialError, match=str(path)):
        HmApiClient(settings, base_url="http://127.0.0.1:9/v1")


def test_pem_without_id_is_refused_when_the_flow_is_built(
    tmp_path: Path, key_json_file: Path
) -> None:
    key = load_signing_key(key_json_file).private_key.reveal()
    pem = tmp_path / "k.pem"
    pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    settings = AuthSettings(auth="private_key", client_id=CLIENT_ID, private_key_file=pem)
    with pytest.raises(CredentialError, match="key id"):
        build_flow(settings, audience="http://x/v1")
    with_id = AuthSettings(
        auth="private_key", client_id=CLIENT_ID, private_key_file=pem, key_id=KEY_ID
    )
    assert build_flow(with_id, audience="http://x/v1").name == "private_key"


def test_settings_repr_hides_the_secret() -> None:
    settings = AuthSettings(client_id=CLIENT_ID, client_secret=Secret(CLIENT_SECRET))
    assert CLIENT_SECRET not in repr(settings)
