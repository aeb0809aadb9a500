from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from ingest.errors import ApiError, AuthError, RateLimitedError, ServerError
from ingest.hmapi import (
    AuthSettings,
    ClearanceStatus,
    HmApiClient,
    InvalidVehicleError,
    NotFoundError,
    Odometer,
    RequestEvent,
    RetryEvent,
    RetryPolicy,
    Secret,
    VehicleRequest,
)
from ingest.hmapi.events import ApiEvent

from .conftest import CLIENT_ID, CLIENT_SECRET, ClientFactory, FakeHm, Scripted, Sleeps, hm_errors

VIN = "WBADT43452G296403"
VIN2 = "WBADT43452G296404"


def vins(n: int) -> list[str]:
    return [f"WBA{i:014d}" for i in range(n)]


# -- re-authentication -------------------------------------------------------------------


async def test_one_reauthentication_on_401_then_success(
    fake_hm: FakeHm, make_client: ClientFactory
) -> None:
    fake_hm.add_clearance(VIN, "approved")
    events: list[ApiEvent] = []
    async with make_client(on_event=events.append) as hm:
        await hm.tokens.token()
        fake_hm.valid_tokens.clear()  # HM revoked the token early
        clearance = await hm.get_clearance(VIN)
    assert clearance.status == "approved"
    assert len(fake_hm.issued) == 2
    calls = fake_hm.calls("fleet_get")
    assert [c.headers["Authorization"] for c in calls] == [
        f"Bearer {fake_hm.issued[0]}",
        f"Bearer {fake_hm.issued[1]}",
    ]
    assert [e.cause for e in events if isinstance(e, RetryEvent)] == ["unauthorized"]


async def test_second_401_raises_auth_error(fake_hm: FakeHm, make_client: ClientFactory) -> None:
    unauthorized = Scripted(401, hm_errors("Not authorized", "invalid token", "Authorization"))
    fake_hm.script("fleet_get", unauthorized, unauthorized, Scripted(200, {}))
    async with make_client() as hm:
        with pytest.raises(AuthError) as info:
            await hm.get_clearance(VIN)
    assert info.value.status == 401
    assert info.value.detail == "invalid token"
    assert info.value.source == "Authorization"
    assert len(fake_hm.calls("fleet_get")) == 2
    assert len(fake_hm.issued) == 2


async def test_403_is_auth_error_without_reauthentication(
    fake_hm: FakeHm, make_client: ClientFactory
) -> None:
    fake_hm.script("fleet_list", Scripted(403, hm_errors("Forbidden", "not a fleet")))
    async with make_client() as hm:
        with pytest.raises(AuthError, match="not a fleet"):
            await hm.list_clearances()
    assert len(fake_hm.issued) == 1


# -- 429 -----------------------------------------------------------------------------------


async def test_429_waits_for_retry_after_header(
    fake_hm: FakeHm, make_client: ClientFactory, sleeps: Sleeps
) -> None:
    fake_hm.script(
        "fleet_list",
        Scripted(429, hm_errors("Too many requests", "slow down"), {"Retry-After": "7"}),
    )
    async with make_client() as hm:
        assert await hm.list_clearances() == []
    assert sleeps.waits == [7.0]
    assert len(fake_hm.calls("fleet_list")) == 2


async def test_429_waits_for_retry_after_in_detail(
    fake_hm: FakeHm, make_client: ClientFactory, sleeps: Sleeps
) -> None:
    fake_hm.script("fleet_list", Scripted(429, hm_errors("Too many requests", "retry after 2s")))
    async with make_client() as hm:
        assert await hm.list_clearances() == []
    assert sleeps.waits == [2.0]


async def test_429_http_date_header_and_max_wait_cap(
    fake_hm: FakeHm, make_client: ClientFactory, sleeps: Sleeps
) -> None:
    later = datetime.now(UTC) + timedelta(hours=1)
    fake_hm.script(
        "fleet_list",
        Scripted(429, b"", {"Retry-After": format_datetime(later, usegmt=True)}),
    )
    policy = RetryPolicy(max_attempts=3, max_rate_limit_wait_s=45.0)
    async with make_client(retry=policy) as hm:
        await hm.list_clearances()
    assert sleeps.waits == [45.0]


async def test_429_exhausted_raises_rate_limited(
    fake_hm: FakeHm, make_client: ClientFactory, sleeps: Sleeps
) -> None:
    limited = Scripted(429, [{"title": "Too many requests", "detail": "retry after 3s"}])
    fake_hm.script("fleet_list", limited, limited)
    async with make_client(retry=RetryPolicy(max_attempts=2)) as hm:
        with pytest.raises(RateLimitedError) as info:
            await hm.list_clearances()
    assert info.value.retry_after_s == 3.0
    assert info.value.status == 429
    assert sleeps.waits == [3.0]


# -- 5xx, timeouts, connection errors --------------------------------------------------------


async def test_5xx_retried_with_backoff_then_success(
    fake_hm: FakeHm, make_client: ClientFactory, sleeps: Sleeps
) -> None:
    fake_hm.script("fleet_list", Scripted(500, b"oops"), Scripted(502, b""), Scripted(503, {}))
    policy = RetryPolicy(max_attempts=4, backoff_base_s=1.0, backoff_cap_s=3.0)
    events: list[ApiEvent] = []
    async with make_client(retry=policy, on_event=events.append) as hm:
        assert await hm.list_clearances() == []
    assert len(sleeps.waits) == 3
    # Full jitter within the capped exponential ceiling: 1, 2, then 4 capped at 3.
    for wait, ceiling in zip(sleeps.waits, [1.0, 2.0, 3.0], strict=True):
        assert 0.0 <= wait <= ceiling
    retries = [e for e in events if isinstance(e, RetryEvent)]
    assert [(r.endpoint, r.attempt, r.cause) for r in retries] == [
        ("fleet_vehicles_list", 1, "server_error"),
        ("fleet_vehicles_list", 2, "server_error"),
        ("fleet_vehicles_list", 3, "server_error"),
    ]
    statuses = [e.status for e in events if isinstance(e, RequestEvent)]
    assert statuses == [200, 500, 502, 503, 200]  # token, then the listing attempts


async def test_5xx_exhausted_raises_server_error(
    fake_hm: FakeHm, make_client: ClientFactory
) -> None:
    fake_hm.script("fleet_list", *[Scripted(500, hm_errors("Internal", "boom"))] * 4)
    async with make_client() as hm:
        with pytest.raises(ServerError) as info:
            await hm.list_clearances()
    assert info.value.status == 500
    assert info.value.detail == "boom"
    assert info.value.retriable
    assert len(fake_hm.calls("fleet_list")) == 4


async def test_timeout_is_retried_as_server_error(
    fake_hm: FakeHm, make_client: ClientFactory
) -> None:
    fake_hm.script("fleet_list", Scripted(200, [], delay_s=1.0))
    events: list[ApiEvent] = []
    async with make_client(timeout_s=0.2, on_event=events.append) as hm:
        assert await hm.list_clearances() == []
    retries = [e for e in events if isinstance(e, RetryEvent)]
    assert [r.cause for r in retries] == ["timeout"]
    assert any(isinstance(e, RequestEvent) and e.status == 0 for e in events)


async def test_connection_refused_is_retried_then_server_error(
    make_client: ClientFactory, sleeps: Sleeps
) -> None:
    settings = AuthSettings(client_id=CLIENT_ID, client_secret=Secret(CLIENT_SECRET))
    # Port 9 (discard) on loopback: nothing listens, the connection is refused at once.
    client = HmApiClient(
        settings, base_url="http://127.0.0.1:9/v1", sleep=sleeps,
        retry=RetryPolicy(max_attempts=3, backoff_base_s=0.01),
    )  # fmt: skip
    async with client as hm:
        with pytest.raises(ServerError) as info:
            await hm.list_clearances()
    assert info.value.status == 0
    assert isinstance(info.value.__cause__, httpx.ConnectError)
    assert len(sleeps.waits) == 2


# -- fleet clearance -------------------------------------------------------------------------


async def test_create_chunks_250_vehicles_into_3_posts(
    fake_hm: FakeHm, make_client: ClientFactory
) -> None:
    requests = [VehicleRequest(vin, "bmw", {"n": str(i)}) for i, vin in enumerate(vins(250))]
    async with make_client() as hm:
        results = await hm.create_clearances(requests)
    posts = fake_hm.calls("fleet_create")
    assert [len(p.body["vehicles"]) for p in posts] == [100, 100, 50]
    assert [r.vin for r in results] == vins(250)
    assert all(r.status == ClearanceStatus.PENDING for r in results)
    assert results[7].tags == {"n": "7"}


async def test_create_item_errors_are_results_and_odometer_is_sent(
    fake_hm: FakeHm, make_client: ClientFactory
) -> None:
    # "BAD" VINs pass our check (valid characters) but the server refuses them per item.
    vehicles = [
        VehicleRequest(VIN, "mercedes-benz", odometer=Odometer(12000, "miles")),
        VehicleRequest("BAD00000000000001", "bmw"),
    ]
    async with make_client() as hm:
        results = await hm.create_clearances(vehicles, chunk_size=10)
    assert [r.status for r in results] == ["pending", "error"]
    assert results[1].is_error
    assert results[1].description == "vin should be 17 character(s)"
    sent = fake_hm.calls("fleet_create")[0].body["vehicles"]
    assert sent[0] == {
        "vin": VIN,
        "brand": "mercedes-benz",
        "tags": {},
        "control_measures": {"odometer": {"value": 12000, "unit": "miles"}},
    }
    assert "control_measures" not in sent[1]


async def test_invalid_input_is_refused_before_any_request(
    fake_hm: FakeHm, make_client: ClientFactory
) -> None:
    async with make_client() as hm:
        with pytest.raises(InvalidVehicleError) as info:
            await hm.create_clearances(
                [VehicleRequest(VIN, "bmw"), VehicleRequest("WBADT43452G29640O", "mercedes")]
            )
        with pytest.raises(ValueError, match="lower-case"):
            await hm.get_clearance(VIN.lower())
        with pytest.raises(InvalidVehicleError, match="volvo-cars"):
            await hm.eligibility(VIN, "volvo")
        with pytest.raises(InvalidVehicleError):
            await hm.delete_clearance("SHORT")
    message = str(info.value)
    assert "WBADT43452G29640O" in message
    assert "'mercedes-benz'" in message
    assert fake_hm.requests == []  # not even a token request


async def test_list_filter_is_url_encoded_json(fake_hm: FakeHm, make_client: ClientFactory) -> None:
    fake_hm.add_clearance(VIN, "approved")
    fake_hm.add_clearance(VIN2, "pending")
    events: list[ApiEvent] = []
    async with make_client(on_event=events.append) as hm:
        approved = await hm.list_clearances(status=["approved", "rejected"])
        everything = await hm.list_clearances()
    assert [c.vin for c in approved] == [VIN]
    assert {c.vin for c in everything} == {VIN, VIN2}
    filtered, unfiltered = fake_hm.calls("fleet_list")
    assert json.loads(filtered.query["filter"]) == {
        "status": {"operator": "in", "value": ["approved", "rejected"]}
    }
    assert unfiltered.query == {}


async def test_list_filter_raw_query_is_percent_encoded(
    fake_hm: FakeHm, make_client: ClientFactory
) -> None:
    seen: list[str] = []

    async def record(request: httpx.Request) -> None:
        seen.append(str(request.url))

    http = httpx.AsyncClient(event_hooks={"request": [record]})
    async with http, make_client(http=http) as hm:
        await hm.list_clearances(status="approved")  # a lone string is one status
    raw_query = urlsplit(seen[-1]).query
    assert "%7B" in raw_query
    assert "{" not in raw_query
    assert json.loads(parse_qs(raw_query)["filter"][0])["status"]["value"] == ["approved"]


async def test_clearance_parsing_is_lenient(fake_hm: FakeHm, make_client: ClientFactory) -> None:
    fake_hm.add_clearance(VIN, "suspended")  # a status HM might add one day
    fake_hm.clearances[VIN]["changelog"] = [
        {"timestamp": "2024-03-22T09:36:51", "status": "pending"},
        {"timestamp": "2024-03-23T10:00:00.094533Z", "status": "rejected", "reason": "no consent"},
        "not-an-object",
    ]
    async with make_client() as hm:
        clearance = await hm.get_clearance(VIN)
    assert clearance.status == "suspended"
    assert clearance.brand == "bmw"
    assert clearance.tags == {"fleet": "a"}
    first, second = clearance.changelog
    assert first.timestamp == datetime(2024, 3, 22, 9, 36, 51, tzinfo=UTC)
    assert second.reason == "no consent"
    assert second.timestamp is not None
    assert second.timestamp.tzinfo is not None


async def test_get_unknown_vin_is_not_found(fake_hm: FakeHm, make_client: ClientFactory) -> None:
    async with make_client() as hm:
        with pytest.raises(NotFoundError) as info:
            await hm.get_clearance(VIN)
    assert isinstance(info.value, ApiError)
    assert info.value.status == 404
    assert not info.value.retriable


async def test_delete_revokes_cancels_and_reports_conflicts(
    fake_hm: FakeHm, make_client: ClientFactory
) -> None:
    fake_hm.add_clearance(VIN, "approved")
    fake_hm.add_clearance(VIN2, "pending")
    fake_hm.script(
        "fleet_delete",
        Scripted(200, {"vin": VIN, "status": "revoking"}),
        Scripted(200, {"vin": VIN2, "status": "canceling"}),
        Scripted(409, hm_errors("Conflict", "Clearance is already removed")),
        Scripted(
            422, hm_errors("too early", "the pending status could only be canceled after 1 day")
        ),
    )
    async with make_client() as hm:
        revoked = await hm.delete_clearance(VIN)
        canceled = await hm.delete_clearance(VIN2)
        with pytest.raises(ApiError) as conflict:
            await hm.delete_clearance(VIN)
        with pytest.raises(ApiError) as too_early:
            await hm.delete_clearance(VIN2)
    assert (revoked.status, canceled.status) == ("revoking", "canceling")
    assert conflict.value.status == 409
    assert conflict.value.detail == "Clearance is already removed"
    assert too_early.value.status == 422
    assert "1 day" in (too_early.value.detail or "")
    assert [c.path for c in fake_hm.calls("fleet_delete")] == [
        f"/v1/fleets/vehicles/{v}" for v in (VIN, VIN2, VIN, VIN2)
    ]


async def test_eligibility(fake_hm: FakeHm, make_client: ClientFactory) -> None:
    async with make_client() as hm:
        result = await hm.eligibility(VIN, "bmw")
    assert result.eligible is True
    assert result.data_delivery == ("pull", "push")
    assert result.connectivity_status == "activated"
    assert fake_hm.calls("eligibility")[0].body == {"vin": VIN, "brand": "bmw"}


# -- per-VIN tokens ---------------------------------------------------------------------------


async def test_fleet_access_token_refresh_and_revoke(
    fake_hm: FakeHm, make_client: ClientFactory
) -> None:
    async with make_client() as hm:
        token = await hm.fleet_access_token(VIN)
        assert token.refresh_token is not None
        refreshed = await hm.refresh_access_token(token.refresh_token)
        await hm.revoke_token(refreshed.access_token, "access_token")
    assert token.access_token.reveal() == f"vehicle-access-{VIN}"
    assert token.expires_in == 600
    assert "vehicle-access" not in repr(token)
    assert refreshed.access_token.reveal() == "vehicle-access-2"
    refresh_call, revoke_call = fake_hm.calls("access_tokens")[1:]
    assert refresh_call.body == {
        "grant_type": "refresh_token",
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "refresh_token": "refresh-1",
    }
    assert "Authorization" not in refresh_call.headers
    assert revoke_call.method == "DELETE"
    assert revoke_call.body == {
        "token": "vehicle-access-2",
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "token_type_hint": "access_token",
    }


async def test_refresh_falls_back_to_hm_refresh_grant_name(
    fake_hm: FakeHm, make_client: ClientFactory
) -> None:
    fake_hm.accepted_refresh_grant = "refresh"
    async with make_client() as hm:
        refreshed = await hm.refresh_access_token("refresh-1")
    assert refreshed.refresh_token == Secret("refresh-2")
    grants = [c.body["grant_type"] for c in fake_hm.calls("access_tokens")]
    assert grants == ["refresh_token", "refresh"]


async def test_refused_refresh_token_is_auth_error(
    fake_hm: FakeHm, make_client: ClientFactory
) -> None:
    fake_hm.script(
        "access_tokens",
        Scripted(400, {"error": "invalid_grant", "error_description": "refresh_token is invalid"}),
    )
    async with make_client() as hm:
        with pytest.raises(AuthError, match="refresh_token is invalid"):
            await hm.refresh_access_token("stale")
    assert len(fake_hm.calls("access_tokens")) == 1
