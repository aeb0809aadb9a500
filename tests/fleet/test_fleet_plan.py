"""plan(): desired fleet vs HM's listing → create / remove / keep / rejected / waiting."""

from __future__ import annotations

import pytest

from ingest.fleet import DesiredVehicle, Plan, RejectedVehicle, plan
from ingest.fleet.plan import EMPTY_PRUNE_REFUSED
from ingest.hmapi import ChangelogEntry, Clearance

from .conftest import vin


def held(number: int, status: str, reason: str | None = None) -> Clearance:
    changelog = (ChangelogEntry(None, "pending"), ChangelogEntry(None, status, reason))
    return Clearance(vin(number), status, "bmw", {}, changelog)


def want(*numbers: int) -> list[DesiredVehicle]:
    return [DesiredVehicle(vin(n), "bmw") for n in numbers]


def by_vin(*clearances: Clearance) -> dict[str, Clearance]:
    return {c.vin: c for c in clearances}


def test_desired_vins_by_current_status() -> None:
    current = by_vin(
        held(2, "pending"),
        held(3, "approved"),
        held(4, "rejected", "vehicle_not_supported"),
        held(5, "revoked"),
        held(6, "canceled"),
        held(7, "revoking"),
        held(8, "canceling"),
        held(9, "suspended"),  # a status HM might add: left alone
    )
    result = plan(want(1, 2, 3, 4, 5, 6, 7, 8, 9), current, prune=False)
    assert [v.vin for v in result.create] == [vin(1), vin(5), vin(6)]
    assert result.keep == [vin(2), vin(3), vin(9)]
    assert result.rejected == [RejectedVehicle(vin(4), "bmw", "vehicle_not_supported")]
    assert result.waiting == [vin(7), vin(8)]
    assert result.remove == []


def test_prune_removes_only_approved_or_pending_vins_not_desired() -> None:
    current = by_vin(
        held(1, "approved"),
        held(2, "approved"),
        held(3, "pending"),
        held(4, "rejected"),
        held(5, "revoked"),
        held(6, "revoking"),
    )
    assert plan(want(1), current, prune=False).remove == []
    pruned = plan(want(1), current, prune=True)
    assert pruned.remove == [vin(2), vin(3)]
    assert pruned.keep == [vin(1)]


@pytest.mark.parametrize("prune", [False, True])
def test_observe_only_plans_nothing(prune: bool) -> None:
    current = by_vin(held(1, "approved"), held(2, "pending"))
    result = plan(None, current, prune=prune)
    assert result == Plan()
    assert result.observe_only


def test_prune_against_an_empty_desired_fleet_removes_nothing() -> None:
    result = plan([], by_vin(held(1, "approved")), prune=True)
    assert result.remove == []
    assert result.prune_skipped == EMPTY_PRUNE_REFUSED


def test_rejected_without_reason_is_still_reported() -> None:
    current = by_vin(Clearance(vin(1), "rejected", None, {}))
    assert plan(want(1), current, prune=True).rejected == [RejectedVehicle(vin(1), None, None)]
