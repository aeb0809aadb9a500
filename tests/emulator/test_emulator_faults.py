"""Fault injection through the admin API: 429s, 5xx, delays."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.emulator.conftest import HM


async def test_429_for_next_n_requests(hm: HM) -> None:
    token = await hm.token()
    fault = {"kind": "429", "count": 2, "retry_after_s": 7, "retry_after_header": True}
    await hm.admin("POST", "/faults", json=fault)
    for _ in range(2):
        response = await hm.api("GET", "/fleets/vehicles", token=token)
        assert response.status_code == 429
        [error] = response.json()["errors"]
        assert error["detail"] == "retry after 7s"
        assert error["title"] == "Too many requests"
        assert response.headers["Retry-After"] == "7"
    assert (await hm.api("GET", "/fleets/vehicles", token=token)).status_code == 200
    assert (await hm.admin("GET", "/faults")).json() == []


async def test_429_without_header_by_default(hm: HM) -> None:
    token = await hm.token()
    await hm.admin("POST", "/faults", json={"kind": "429", "count": 1})
    response = await hm.api("GET", "/fleets/vehicles", token=token)
    assert response.status_code == 429
    assert "Retry-After" not in response.headers


async def test_5xx_on_a_path_until_cleared(hm: HM) -> None:
    token = await hm.token()
    await hm.admin(
        "POST", "/faults", json={"kind": "5xx", "status": 502, "path_prefix": "/v1/eligibility"}
    )
    for _ in range(3):
        failed = await hm.api(
            "POST", "/eligibility", token=token, json={"vin": "SBXTESTVN00000001", "brand": "bmw"}
        )
        assert failed.status_code == 502
    assert (await hm.api("GET", "/fleets/vehicles", token=token)).status_code == 200
    assert (await hm.admin("GET", "/state")).status_code == 200  # admin is never faulted
    await hm.admin("DELETE", "/faults")
    ok = await hm.api(
        "POST", "/eligibility", token=token, json={"vin": "SBXTESTVN00000001", "brand": "bmw"}
    )
    assert ok.status_code == 200


async def test_fraction_is_a_share_of_requests(hm: HM) -> None:
    token = await hm.token()
    await hm.admin("POST", "/faults", json={"kind": "5xx", "fraction": 0.5})
    statuses = [
        (await hm.api("GET", "/fleets/vehicles", token=token)).status_code for _ in range(40)
    ]
    failures = statuses.count(503)
    assert 5 < failures < 35
    assert set(statuses) == {200, 503}


async def test_delay_then_answer(hm: HM) -> None:
    token = await hm.token()
    await hm.admin("POST", "/faults", json={"kind": "delay", "delay_s": 0.05, "count": 1})
    assert (await hm.api("GET", "/fleets/vehicles", token=token)).status_code == 200
    assert hm.server.emulator.faults.fired == 1


async def test_invalid_fault_is_400(hm: HM) -> None:
    for bad in ({"kind": "teapot"}, {"kind": "5xx", "status": 404}, {"kind": "429", "fraction": 2}):
        response = await hm.http.post(f"{hm.admin_url}/faults", json=bad)
        assert response.status_code == 400
