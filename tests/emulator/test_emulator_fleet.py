"""Fleet clearance endpoints, the asynchronous state machine, access tokens and eligibility."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.emulator.conftest import HM

VIN_A = "SBXTESTVN00000001"
VIN_B = "SBXTESTVN00000002"
VIN_REJECTED = "SBXTESTVN0000000R"  # the default rules reject VINs ending in R
STEP_S = 60  # conftest.TEST_BEHAVIOUR's delay for every asynchronous step


async def test_post_reports_per_vin_results(hm: HM) -> None:
    body = {
        "vehicles": [
            {"vin": VIN_A, "brand": "mercedes-benz", "tags": {"fleet": "north"}},
            {"vin": "SHORT", "brand": "bmw"},
            {"vin": "SBXTESTVN0000000I", "brand": "bmw"},
            {"vin": VIN_B, "brand": "unknown"},
            {"vin": "SBXTESTVN00000003", "brand": "nissan"},  # not in the spec's enum
            {"vin": "SBXTESTVN00000004", "brand": "bmw", "tags": {"n": 1}},
        ]
    }
    response = await hm.api("POST", "/fleets/vehicles", json=body)
    assert response.status_code == 200
    items = response.json()["vehicles"]
    assert items[0] == {"vin": VIN_A, "status": "pending", "tags": {"fleet": "north"}}
    assert [i["status"] for i in items[1:]] == ["error"] * 5
    assert items[1]["description"] == "vin should be 17 character(s)"
    assert "invalid characters" in items[2]["description"]
    assert items[3]["description"] == items[4]["description"] == "The brand is invalid"
    assert "tags" in items[5]["description"]
    listed = (await hm.api("GET", "/fleets/vehicles")).json()
    assert [v["vin"] for v in listed] == [VIN_A]


async def test_post_without_vehicles_list_is_422(hm: HM) -> None:
    response = await hm.api("POST", "/fleets/vehicles", json={"vin": VIN_A})
    assert response.status_code == 422
    assert response.json()["errors"][0]["source"] == "vehicles"


async def test_post_of_known_vin_reports_current_status(hm: HM) -> None:
    await hm.add(VIN_A)
    await hm.advance(STEP_S)
    again = await hm.add(VIN_A)
    assert again["status"] == "approved"
    vehicle = (await hm.api("GET", f"/fleets/vehicles/{VIN_A}")).json()
    assert [e["status"] for e in vehicle["changelog"]] == ["pending", "approved"]


async def test_approve_then_revoke_lifecycle(hm: HM) -> None:
    await hm.add(VIN_A, brand="bmw", team="a")
    assert await hm.status(VIN_A) == "pending"
    await hm.advance(STEP_S - 1)
    assert await hm.status(VIN_A) == "pending"
    await hm.advance(1)
    assert await hm.status(VIN_A) == "approved"
    deleted = await hm.api("DELETE", f"/fleets/vehicles/{VIN_A}")
    assert deleted.status_code == 200
    assert deleted.json() == {"vin": VIN_A, "status": "revoking", "tags": {"team": "a"}}
    assert await hm.status(VIN_A) == "revoking"
    in_transition = await hm.api("DELETE", f"/fleets/vehicles/{VIN_A}")
    assert in_transition.status_code == 409
    assert in_transition.json()["errors"][0]["detail"] == "Clearance is in transition mode"
    await hm.advance(STEP_S)
    vehicle = (await hm.api("GET", f"/fleets/vehicles/{VIN_A}")).json()
    assert vehicle["status"] == "revoked"
    assert vehicle["brand"] == "bmw"
    statuses = [e["status"] for e in vehicle["changelog"]]
    assert statuses == ["pending", "approved", "revoking", "revoked"]
    stamps = [e["timestamp"] for e in vehicle["changelog"]]
    assert stamps == sorted(stamps)
    removed = await hm.api("DELETE", f"/fleets/vehicles/{VIN_A}")
    assert removed.status_code == 409
    assert removed.json()["errors"][0]["detail"] == "Clearance is already removed"


async def test_cancel_lifecycle(hm: HM) -> None:
    await hm.add(VIN_A, brand="volkswagen")
    deleted = await hm.api("DELETE", f"/fleets/vehicles/{VIN_A}")
    assert deleted.status_code == 200
    assert deleted.json()["status"] == "canceling"
    # A canceling clearance must not be approved by the decision that would have been due.
    await hm.advance(STEP_S)
    vehicle = (await hm.api("GET", f"/fleets/vehicles/{VIN_A}")).json()
    assert [e["status"] for e in vehicle["changelog"]] == ["pending", "canceling", "canceled"]


async def test_rejection_carries_reason(hm: HM) -> None:
    await hm.add(VIN_REJECTED)
    changes = await hm.advance(STEP_S)
    assert changes == [
        {
            "vin": VIN_REJECTED,
            "status": "rejected",
            "reason": "vehicle_not_supported",
            "at": changes[0]["at"],
        }
    ]
    vehicle = (await hm.api("GET", f"/fleets/vehicles/{VIN_REJECTED}")).json()
    assert vehicle["changelog"][-1] == {
        "timestamp": vehicle["changelog"][-1]["timestamp"],
        "status": "rejected",
        "reason": "vehicle_not_supported",
    }
    assert "reason" not in vehicle["changelog"][0]


async def test_terminal_vin_can_be_requested_again(hm: HM) -> None:
    await hm.add(VIN_REJECTED)
    await hm.advance(STEP_S)
    assert (await hm.add(VIN_REJECTED))["status"] == "pending"
    vehicle = (await hm.api("GET", f"/fleets/vehicles/{VIN_REJECTED}")).json()
    assert [e["status"] for e in vehicle["changelog"]] == ["pending", "rejected", "pending"]


async def test_cancellation_refusals_are_422(hm: HM) -> None:
    await hm.add(VIN_A, brand="bmw")  # BMW is not among the brands HM can cancel
    unsupported = await hm.api("DELETE", f"/fleets/vehicles/{VIN_A}")
    assert unsupported.status_code == 422
    assert unsupported.json()["errors"][0]["detail"] == "cancellation is not supported for this vin"
    await hm.admin("PUT", "/behaviour", json={"cancel_min_age_s": 86400})
    await hm.add(VIN_B, brand="sandbox")
    too_early = await hm.api("DELETE", f"/fleets/vehicles/{VIN_B}")
    assert too_early.status_code == 422
    assert too_early.json()["errors"][0]["title"] == "too early"


async def test_unknown_vin_is_404(hm: HM) -> None:
    for method in ("GET", "DELETE"):
        response = await hm.api(method, f"/fleets/vehicles/{VIN_B}")
        assert response.status_code == 404
        assert response.json()["errors"][0]["source"] == "vin"


async def test_admin_decides_outcome(hm: HM) -> None:
    await hm.admin("PUT", "/behaviour", json={"default": {"status": "pending"}})
    await hm.add(VIN_A)
    await hm.add(VIN_B)
    await hm.advance(STEP_S * 100)
    assert await hm.status(VIN_A) == "pending"  # waits for a decision
    await hm.admin("POST", f"/vehicles/{VIN_A}/outcome", json={"status": "rejected", "reason": "x"})
    await hm.admin("POST", f"/vehicles/{VIN_B}/outcome", json={"status": "approved"})
    assert await hm.status(VIN_A) == "rejected"
    assert await hm.status(VIN_B) == "approved"
    not_pending = await hm.http.post(
        f"{hm.admin_url}/vehicles/{VIN_B}/outcome", json={"status": "rejected"}
    )
    assert not_pending.status_code == 409


async def test_rules_match_brand_and_glob(hm: HM) -> None:
    rules = [{"brand": "tesla", "outcome": {"status": "rejected", "reason": "no_fleet_api"}}]
    await hm.admin("PUT", "/behaviour", json={"rules": rules, "delays": {"decision_s": 0}})
    await hm.add(VIN_A, brand="tesla")
    await hm.add(VIN_B, brand="kia")
    assert await hm.status(VIN_A) == "rejected"
    assert await hm.status(VIN_B) == "approved"


@pytest.mark.parametrize(
    ("flt", "expected"),
    [
        ({"status": {"operator": "in", "value": ["approved"]}}, [VIN_A]),
        ({"status": {"operator": "eq", "value": "pending"}}, [VIN_B]),
        ({"vin": {"operator": "in", "value": [VIN_A, VIN_B]}}, [VIN_A, VIN_B]),
        ({"brand": {"operator": "eq", "value": "kia"}}, [VIN_B]),
        ({"tags": {"operator": "contains", "value": {"team": "a"}}}, [VIN_A]),
        ({"approved_at": {"operator": "gte", "value": "2000-01-01T00:00:00Z"}}, [VIN_A]),
        (
            {
                "status": {"operator": "in", "value": ["approved", "pending"]},
                "brand": {"operator": "eq", "value": "kia"},
            },
            [VIN_B],
        ),
    ],
)
async def test_filter(hm: HM, flt: dict[str, object], expected: list[str]) -> None:
    await hm.add(VIN_A, brand="audi", team="a")
    await hm.advance(STEP_S)
    await hm.add(VIN_B, brand="kia", team="b")
    response = await hm.api("GET", "/fleets/vehicles", params={"filter": json.dumps(flt)})
    assert response.status_code == 200
    assert sorted(v["vin"] for v in response.json()) == expected


@pytest.mark.parametrize(
    "raw", ["{not json", "[]", '{"status": {"operator": "like", "value": "a"}}', '{"x": 1}']
)
async def test_bad_filter_is_422(hm: HM, raw: str) -> None:
    response = await hm.api("GET", "/fleets/vehicles", params={"filter": raw})
    assert response.status_code == 422


async def test_fleet_access_token_only_for_approved(hm: HM) -> None:
    await hm.add(VIN_A)
    pending = await hm.api("POST", "/fleets/access_tokens", json={"vin": VIN_A})
    assert pending.status_code == 400
    assert pending.json()["error"] == "invalid_request"
    unknown = await hm.api("POST", "/fleets/access_tokens", json={"vin": VIN_B})
    assert unknown.status_code == 400
    await hm.advance(STEP_S)
    approved = await hm.api("POST", "/fleets/access_tokens", json={"vin": VIN_A})
    assert approved.status_code == 200
    assert {"access_token", "refresh_token", "expires_in", "token_type"} <= set(approved.json())


async def test_eligibility(hm: HM) -> None:
    ok = await hm.api("POST", "/eligibility", json={"vin": VIN_A, "brand": "bmw"})
    assert ok.status_code == 200
    assert ok.json()["eligible"] is True
    assert ok.json()["data_delivery"] == ["pull", "push"]
    no = await hm.api("POST", "/eligibility", json={"vin": VIN_REJECTED, "brand": "bmw"})
    assert no.json()["eligible"] is False
    bad_vin = await hm.api("POST", "/eligibility", json={"vin": "X", "brand": "bmw"})
    assert bad_vin.status_code == 422
    # Porsche is a fleet clearance brand but not in the eligibility spec's enum.
    bad_brand = await hm.api("POST", "/eligibility", json={"vin": VIN_A, "brand": "porsche"})
    assert bad_brand.status_code == 422
