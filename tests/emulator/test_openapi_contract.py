"""Contract tests: the emulator's real responses validated against HM's official OpenAPI files.

Skipped when the spec folder (``../shared/hm-specs`` beside the repository) is absent; the project
does not ship or read those files at runtime.

Known defect in the official files, patched here rather than followed: the fleet clearance
spec's ``ClearanceUnauthorizedErrors`` declares ``errors`` as an array of *arrays* of errors,
contradicting its own example, the reference notes, and the 401 bodies of the eligibility and
service account specs (all a flat array of error objects). The emulator answers with the flat
shape, and the test validates against the spec with that one schema corrected.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml
from openapi_core import OpenAPI
from openapi_core.datatypes import RequestParameters
from werkzeug.datastructures import Headers, ImmutableMultiDict

if TYPE_CHECKING:
    from tests.emulator.conftest import HM

pytestmark = pytest.mark.hmspecs

SPECS = Path(__file__).resolve().parents[3] / "shared" / "hm-specs" / "openapi"
# Requests are made against loopback; the specs only list HM's hosts, so requests are presented
# to openapi-core as if sent to the first server of each file.
SPEC_HOST = "https://api.high-mobility.com"
VIN = "SBXTESTVN00000001"
VIN_B = "SBXTESTVN00000002"

if not SPECS.is_dir():
    pytest.skip(f"HM's OpenAPI files not found at {SPECS}", allow_module_level=True)


class SpecRequest:
    """openapi-core's Request protocol over an ``httpx.Request``."""

    def __init__(self, request: httpx.Request) -> None:
        self._request = request
        url = urlsplit(str(request.url))
        self.host_url = SPEC_HOST
        self.path = url.path
        self.method = request.method.lower()
        self.body: bytes | None = request.content or None
        self.content_type = request.headers.get("content-type", "application/octet-stream")
        self.parameters = RequestParameters(
            query=ImmutableMultiDict(list(request.url.params.multi_items())),
            header=Headers(list(request.headers.items())),
            cookie=ImmutableMultiDict(),
        )


class SpecResponse:
    """openapi-core's Response protocol over an ``httpx.Response`` (already read)."""

    def __init__(self, response: httpx.Response) -> None:
        self.status_code = response.status_code
        self.content_type = response.headers.get("content-type", "").lower()
        self.headers = Headers(list(response.headers.items()))
        self.data: bytes | None = response.content or None


def _fleet_spec() -> OpenAPI:
    data = yaml.safe_load((SPECS / "hm-fleet-clearance-v1.yml").read_text())
    patched = copy.deepcopy(data)
    errors = patched["components"]["schemas"]["ClearanceUnauthorizedErrors"]["properties"]
    errors["errors"]["items"] = {"$ref": "#/components/schemas/Error"}
    return OpenAPI.from_dict(patched)


@pytest.fixture(scope="module")
def specs() -> dict[str, OpenAPI]:
    return {
        "/v1/access_tokens": OpenAPI.from_file_path(str(SPECS / "hm-oauth-rest-v1.yml")),
        "/v1/auth_tokens": OpenAPI.from_file_path(str(SPECS / "hm-service-account-token-v1.yml")),
        "/v1/eligibility": OpenAPI.from_file_path(str(SPECS / "hm-eligibility-v1.yml")),
        "/v1/fleets/": _fleet_spec(),
    }


def _spec_for(specs: dict[str, OpenAPI], path: str) -> OpenAPI:
    for prefix, spec in specs.items():
        if path.startswith(prefix):
            return spec
    raise AssertionError(f"no spec covers {path}")


async def _exchanges(hm: HM) -> list[httpx.Response]:
    """Drive every endpoint through its success and error answers; return the /v1 responses."""
    seen: list[httpx.Response] = []

    async def keep(response: httpx.Response) -> None:
        await response.aread()
        if response.request.url.path.startswith("/v1/"):
            seen.append(response)

    hm.http.event_hooks["response"].append(keep)
    base = hm.base_url
    creds = {"client_id": hm.client_id, "client_secret": hm.client_secret}
    token = await hm.token()
    await hm.http.post(f"{base}/access_tokens", json={"grant_type": "client_credentials"})
    await hm.http.post(
        f"{base}/access_tokens",
        json={**creds, "client_secret": "x", "grant_type": "client_credentials"},
    )
    await hm.http.post(
        f"{base}/access_tokens",
        json={
            "client_id": hm.client_id,
            "grant_type": "client_credentials",
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": hm.assertion(hm.oauth_key),
        },
    )
    sa = await hm.http.post(f"{base}/auth_tokens", json={"assertion": hm.assertion(hm.sa_key)})
    await hm.http.post(f"{base}/auth_tokens", json={"assertion": "bad"})
    await hm.http.post(f"{base}/auth_tokens", json={})
    await hm.http.delete(f"{base}/auth_tokens/{sa.json()['auth_token']}")
    await hm.http.delete(f"{base}/auth_tokens/unknown")

    await hm.api("GET", "/fleets/vehicles", token="bad")
    body = {
        "vehicles": [
            {"vin": VIN, "brand": "sandbox", "tags": {"k": "v"}},
            {"vin": VIN_B, "brand": "bmw"},
            {"vin": "SHORT", "brand": "bmw"},
        ]
    }
    await hm.api("POST", "/fleets/vehicles", token=token, json=body)
    await hm.api("POST", "/fleets/vehicles", token=token, json={})
    await hm.api("DELETE", f"/fleets/vehicles/{VIN_B}", token=token)  # 422: BMW cannot cancel
    await hm.api("POST", "/fleets/access_tokens", token=token, json={"vin": VIN})  # 400
    await hm.advance(60)
    vehicle = await hm.api("POST", "/fleets/access_tokens", token=token, json={"vin": VIN})
    await hm.http.post(
        f"{base}/access_tokens",
        json={
            **creds,
            "grant_type": "refresh_token",
            "refresh_token": vehicle.json()["refresh_token"],
        },
    )
    await hm.http.request(
        "DELETE", f"{base}/access_tokens", json={**creds, "token": vehicle.json()["refresh_token"]}
    )
    await hm.api("GET", "/fleets/vehicles", token=vehicle.json()["access_token"])  # 403
    await hm.api(
        "GET",
        "/fleets/vehicles",
        token=token,
        params={"filter": '{"status": {"operator": "eq", "value": "approved"}}'},
    )
    await hm.api("GET", f"/fleets/vehicles/{VIN}", token=token)
    await hm.api("GET", "/fleets/vehicles/SBXTESTVN00000009", token=token)
    await hm.api("DELETE", f"/fleets/vehicles/{VIN}", token=token)
    await hm.api("DELETE", f"/fleets/vehicles/{VIN}", token=token)  # 409
    await hm.api("DELETE", "/fleets/vehicles/SBXTESTVN00000009", token=token)  # 404
    await hm.advance(60)
    await hm.api("GET", "/fleets/vehicles", token=token)  # with a full changelog
    await hm.admin("POST", "/faults", json={"kind": "429", "count": 1})
    await hm.api("GET", "/fleets/vehicles", token=token)

    await hm.api("POST", "/eligibility", token=token, json={"vin": VIN, "brand": "bmw"})
    await hm.api("POST", "/eligibility", token=token, json={"vin": "X", "brand": "bmw"})
    await hm.api("POST", "/eligibility", token="bad", json={"vin": VIN, "brand": "bmw"})
    return seen


def _describe(r: httpx.Response) -> str:
    return f"{r.request.method} {r.request.url.path} → {r.status_code}"


def _errors(specs: dict[str, OpenAPI], responses: list[httpx.Response]) -> Iterator[str]:
    for r in responses:
        spec = _spec_for(specs, r.request.url.path)
        for error in spec.iter_response_errors(SpecRequest(r.request), SpecResponse(r)):
            detail = getattr(error, "__cause__", None) or error
            yield f"{_describe(r)}: {error!r} {detail!r} body={r.text[:300]}"


async def test_responses_match_hm_openapi(hm: HM, specs: dict[str, OpenAPI]) -> None:
    responses = await _exchanges(hm)
    covered = {
        (r.request.method, r.request.url.path.split("/")[2], r.status_code) for r in responses
    }
    expected: set[Any] = {
        ("POST", "access_tokens", 200),
        ("POST", "access_tokens", 400),
        ("DELETE", "access_tokens", 200),
        ("POST", "auth_tokens", 201),
        ("POST", "auth_tokens", 401),
        ("POST", "auth_tokens", 422),
        ("DELETE", "auth_tokens", 201),
        ("DELETE", "auth_tokens", 404),
        ("POST", "fleets", 200),
        ("POST", "fleets", 400),
        ("POST", "fleets", 422),
        ("GET", "fleets", 200),
        ("GET", "fleets", 401),
        ("GET", "fleets", 403),
        ("GET", "fleets", 404),
        ("GET", "fleets", 429),
        ("DELETE", "fleets", 200),
        ("DELETE", "fleets", 404),
        ("DELETE", "fleets", 409),
        ("DELETE", "fleets", 422),
        ("POST", "eligibility", 200),
        ("POST", "eligibility", 401),
        ("POST", "eligibility", 422),
    }
    assert expected <= covered, sorted(expected - covered)
    problems = list(_errors(specs, responses))
    assert not problems, "\n".join(problems)


def test_unpatched_fleet_spec_rejects_flat_401_errors() -> None:
    """Guards the patch above: if HM fixes the schema, this fails and the patch can go."""
    spec = yaml.safe_load((SPECS / "hm-fleet-clearance-v1.yml").read_text())
    items = spec["components"]["schemas"]["ClearanceUnauthorizedErrors"]["properties"]["errors"]
    assert items["items"] == {"$ref": "#/components/schemas/Errors"}


def test_validator_catches_a_wrong_body(specs: dict[str, OpenAPI]) -> None:
    """A test that cannot fail is a defect: prove a non-conforming answer is reported."""
    request = httpx.Request("GET", "http://127.0.0.1:1/v1/fleets/vehicles")
    wrong = httpx.Response(200, json={"vehicles": []}, request=request)  # spec: a bare array
    assert list(_errors(specs, [wrong]))
    unpatched = OpenAPI.from_file_path(str(SPECS / "hm-fleet-clearance-v1.yml"))
    flat_401 = httpx.Response(
        401, json={"errors": [{"title": "Not authorized", "detail": "x"}]}, request=request
    )
    assert list(unpatched.iter_response_errors(SpecRequest(request), SpecResponse(flat_401)))
