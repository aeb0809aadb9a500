"""The three authentication flows, token lifetime, revocation and scope checks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

if TYPE_CHECKING:
    from tests.emulator.conftest import HM

SANDBOX_VIN = "SBXTESTVN00000001"

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


def _other_key_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


async def _assertion_grant(hm: HM, assertion: str) -> Any:
    return await hm.http.post(
        f"{hm.base_url}/access_tokens",
        json={
            "client_id": hm.client_id,
            "client_assertion": assertion,
            "client_assertion_type": ASSERTION_TYPE,
            "grant_type": "client_credentials",
        },
    )


async def test_client_secret_grant_issues_es256_token(hm: HM) -> None:
    response = await hm.http.post(
        f"{hm.base_url}/access_tokens",
        json={
            "client_id": hm.client_id,
            "client_secret": hm.client_secret,
            "grant_type": "client_credentials",
        },
    )
    assert response.status_code == 200
    body = response.json()
    assert body["expires_in"] == 300
    assert body["token_type"] == "bearer"
    assert set(body["scope"].split()) >= {"fleet:clearance", "vehicle:eligibility-check"}
    assert jwt.get_unverified_header(body["access_token"])["alg"] == "ES256"
    listed = await hm.api("GET", "/fleets/vehicles", token=body["access_token"])
    assert listed.status_code == 200


@pytest.mark.parametrize(
    ("fields", "description"),
    [
        ({"client_id"}, "client_secret can't be blank"),
        ({"client_secret"}, "client_id can't be blank"),
        (set(), "client_id can't be blank, client_secret can't be blank"),
    ],
)
async def test_missing_client_credentials(hm: HM, fields: set[str], description: str) -> None:
    creds = {"client_id": hm.client_id, "client_secret": hm.client_secret}
    body = {k: v for k, v in creds.items() if k in fields}
    body["grant_type"] = "client_credentials"
    response = await hm.http.post(f"{hm.base_url}/access_tokens", json=body)
    assert response.status_code == 400
    assert response.json() == {"error": "invalid_request", "error_description": description}


@pytest.mark.parametrize(("grant", "fragment"), [(None, "blank"), ("password", "not supported")])
async def test_unsupported_grant(hm: HM, grant: str | None, fragment: str) -> None:
    body = {"client_id": hm.client_id, "client_secret": hm.client_secret, "grant_type": grant}
    response = await hm.http.post(f"{hm.base_url}/access_tokens", json=body)
    assert response.status_code == 400
    assert fragment in response.json()["error_description"]


async def test_wrong_client_secret_is_rejected(hm: HM) -> None:
    response = await hm.http.post(
        f"{hm.base_url}/access_tokens",
        json={
            "client_id": hm.client_id,
            "client_secret": "nope",
            "grant_type": "client_credentials",
        },
    )
    assert response.status_code == 400
    assert response.json() == {
        "error": "invalid_request",
        "error_description": "client_secret is invalid",
    }


async def test_form_encoded_grant_is_accepted(hm: HM) -> None:
    response = await hm.http.post(
        f"{hm.base_url}/access_tokens",
        data={
            "client_id": hm.client_id,
            "client_secret": hm.client_secret,
            "grant_type": "client_credentials",
        },
    )
    assert response.status_code == 200


async def test_client_assertion_grant(hm: HM) -> None:
    response = await _assertion_grant(hm, hm.assertion(hm.oauth_key))
    assert response.status_code == 200, response.text
    token = response.json()["access_token"]
    assert (await hm.api("GET", "/fleets/vehicles", token=token)).status_code == 200


def _bad_assertions(hm: HM) -> dict[str, str]:
    key = hm.oauth_key
    return {
        "bad signature": hm.assertion({**key, "private_key": _other_key_pem()}),
        "wrong aud": hm.assertion(key, aud="https://api.high-mobility.com/v1"),
        "expired iat": hm.assertion(key, iat=int(hm.clock.now()) - 31),
        "future iat": hm.assertion(key, iat=int(hm.clock.now()) + 31),
        "unknown iss": hm.assertion(key, iss="00000000-0000-0000-0000-000000000000"),
        "other flow's key": hm.assertion(hm.sa_key),
        "not a jwt": "garbage",
    }


# The OAuth spec documents only 400 for POST /v1/access_tokens; see ingest/emulator/auth.py.
@pytest.mark.parametrize(
    "case",
    [
        "bad signature",
        "wrong aud",
        "expired iat",
        "future iat",
        "unknown iss",
        "other flow's key",
        "not a jwt",
    ],
)
async def test_client_assertion_rejections(hm: HM, case: str) -> None:
    response = await _assertion_grant(hm, _bad_assertions(hm)[case])
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"
    assert "client_assertion is invalid" in response.json()["error_description"]


async def test_client_assertion_jti_is_single_use(hm: HM) -> None:
    assertion = hm.assertion(hm.oauth_key)
    assert (await _assertion_grant(hm, assertion)).status_code == 200
    again = await _assertion_grant(hm, assertion)
    assert again.status_code == 400
    assert "jti" in again.json()["error_description"]


async def test_iat_tolerance_edge_is_accepted(hm: HM) -> None:
    assertion = hm.assertion(hm.oauth_key, iat=int(hm.clock.now()) - 30)
    assert (await _assertion_grant(hm, assertion)).status_code == 200


async def _service_account(hm: HM, assertion: str, form: bool = False) -> Any:
    url = f"{hm.base_url}/auth_tokens"
    if form:
        return await hm.http.post(url, data={"assertion": assertion})
    return await hm.http.post(url, json={"assertion": assertion})


@pytest.mark.parametrize("form", [True, False], ids=["form", "json"])
async def test_service_account_flow(hm: HM, form: bool) -> None:
    response = await _service_account(hm, hm.assertion(hm.sa_key), form=form)
    assert response.status_code == 201, response.text
    body = response.json()
    assert set(body) == {"auth_token", "valid_from", "valid_until"}
    assert body["valid_from"] < body["valid_until"]
    listed = await hm.api("GET", "/fleets/vehicles", token=body["auth_token"])
    assert listed.status_code == 200


@pytest.mark.parametrize(
    "case",
    ["bad signature", "wrong aud", "expired iat", "unknown iss", "not a jwt"],
)
async def test_service_account_rejections_are_401(hm: HM, case: str) -> None:
    bad = _bad_assertions(hm)
    if case in ("bad signature", "wrong aud", "expired iat", "unknown iss"):
        # Same defects, but built on the service account key.
        bad = {
            "bad signature": hm.assertion({**hm.sa_key, "private_key": _other_key_pem()}),
            "wrong aud": hm.assertion(hm.sa_key, aud="https://api.high-mobility.com/v1"),
            "expired iat": hm.assertion(hm.sa_key, iat=int(hm.clock.now()) - 31),
            "unknown iss": hm.assertion(hm.sa_key, iss="00000000-0000-0000-0000-000000000000"),
        }
    response = await _service_account(hm, bad[case])
    assert response.status_code == 401
    [error] = response.json()["errors"]
    assert error["title"] == "Not authorized"


async def test_service_account_jti_reuse_is_401(hm: HM) -> None:
    assertion = hm.assertion(hm.sa_key)
    assert (await _service_account(hm, assertion)).status_code == 201
    assert (await _service_account(hm, assertion)).status_code == 401


async def test_service_account_missing_assertion_is_422_bare_array(hm: HM) -> None:
    response = await hm.http.post(f"{hm.base_url}/auth_tokens", json={})
    assert response.status_code == 422
    assert response.json()[0]["source"] == "assertion"


async def test_service_account_token_revocation(hm: HM) -> None:
    token = (await _service_account(hm, hm.assertion(hm.sa_key))).json()["auth_token"]
    deleted = await hm.http.delete(f"{hm.base_url}/auth_tokens/{token}")
    assert deleted.status_code == 201
    assert deleted.json()["auth_token"] == token
    assert (await hm.api("GET", "/fleets/vehicles", token=token)).status_code == 401
    again = await hm.http.delete(f"{hm.base_url}/auth_tokens/{token}")
    assert again.status_code == 404


async def test_token_expires_after_expires_in(hm: HM) -> None:
    token = await hm.token()
    await hm.advance(299)
    assert (await hm.api("GET", "/fleets/vehicles", token=token)).status_code == 200
    await hm.advance(1)
    expired = await hm.api("GET", "/fleets/vehicles", token=token)
    assert expired.status_code == 401
    assert expired.json()["errors"][0]["detail"] == "token has expired"


@pytest.mark.parametrize(
    "header",
    [None, "Bearer", "Basic abc", "Bearer not-a-token"],
)
async def test_missing_or_unknown_bearer_is_401(hm: HM, header: str | None) -> None:
    headers = {"Authorization": header} if header else {}
    response = await hm.http.get(f"{hm.base_url}/fleets/vehicles", headers=headers)
    assert response.status_code == 401
    [error] = response.json()["errors"]
    assert error["source"] == "Authorization"


async def _vehicle_token(hm: HM) -> dict[str, Any]:
    await hm.add(SANDBOX_VIN)
    await hm.advance(60)
    response = await hm.api("POST", "/fleets/access_tokens", json={"vin": SANDBOX_VIN})
    assert response.status_code == 200, response.text
    return dict(response.json())


async def test_scope_enforcement(hm: HM) -> None:
    vehicle_token = (await _vehicle_token(hm))["access_token"]
    fleet = await hm.api("GET", "/fleets/vehicles", token=vehicle_token)
    assert fleet.status_code == 403
    assert "fleet:clearance" in fleet.json()["errors"][0]["detail"]
    eligibility = await hm.api(
        "POST", "/eligibility", token=vehicle_token, json={"vin": SANDBOX_VIN, "brand": "sandbox"}
    )
    assert eligibility.status_code == 401


@pytest.mark.parametrize("grant", ["refresh_token", "refresh"])
async def test_refresh_grant(hm: HM, grant: str) -> None:
    issued = await _vehicle_token(hm)
    response = await hm.http.post(
        f"{hm.base_url}/access_tokens",
        json={
            "grant_type": grant,
            "client_id": hm.client_id,
            "client_secret": hm.client_secret,
            "refresh_token": issued["refresh_token"],
        },
    )
    assert response.status_code == 200, response.text
    assert response.json()["access_token"] != issued["access_token"]
    assert response.json()["refresh_token"] == issued["refresh_token"]


async def test_revoke_refresh_and_access_tokens(hm: HM) -> None:
    issued = await _vehicle_token(hm)
    app_token = await hm.token()
    for token, hint in ((issued["refresh_token"], "refresh_token"), (app_token, "access_token")):
        response = await hm.http.request(
            "DELETE",
            f"{hm.base_url}/access_tokens",
            json={
                "token": token,
                "client_id": hm.client_id,
                "client_secret": hm.client_secret,
                "token_type_hint": hint,
            },
        )
        assert response.status_code == 200
    refresh = await hm.http.post(
        f"{hm.base_url}/access_tokens",
        json={
            "grant_type": "refresh_token",
            "client_id": hm.client_id,
            "client_secret": hm.client_secret,
            "refresh_token": issued["refresh_token"],
        },
    )
    assert refresh.status_code == 400
    assert (await hm.api("GET", "/fleets/vehicles", token=app_token)).status_code == 401


async def test_revoke_needs_client_credentials(hm: HM) -> None:
    response = await hm.http.request(
        "DELETE",
        f"{hm.base_url}/access_tokens",
        json={"token": "x", "client_id": hm.client_id, "client_secret": "wrong"},
    )
    assert response.status_code == 400
    assert response.json()["error_description"] == "client_secret is invalid"
