"""Webhook deliveries: signed, one per status change, retried with the same delivery id."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.emulator.conftest import HM, Receiver

VIN = "SBXTESTVN00000001"
VIN_REJECTED = "SBXTESTVN0000000R"


async def test_ping_on_configure(hm: HM, receiver: Receiver) -> None:
    await hm.admin("PUT", "/webhook", json={"url": receiver.url})
    await receiver.wait_until(lambda r: r.accepted("ping"))
    [ping] = receiver.accepted("ping")
    assert ping["body"]["event"]["type"] == "ping"
    assert receiver.bad_signatures == 0


async def test_status_changes_are_delivered_signed(hm: HM, receiver: Receiver) -> None:
    await hm.admin("PUT", "/webhook", json={"url": receiver.url})
    await hm.add(VIN)
    await hm.add(VIN_REJECTED)
    await hm.advance(60)
    await hm.api("DELETE", f"/fleets/vehicles/{VIN}")
    await receiver.wait_until(lambda r: len(r.accepted("fleet_clearance_changed")) == 5)
    events = [
        (
            r["body"]["vehicle"]["vin"],
            r["body"]["event"]["action"],
            r["body"]["event"].get("detail"),
        )
        for r in receiver.accepted("fleet_clearance_changed")
    ]
    assert events == [
        (VIN, "pending", None),
        (VIN_REJECTED, "pending", None),
        (VIN, "approved", None),
        (VIN_REJECTED, "rejected", "vehicle_not_supported"),
        (VIN, "revoking", None),
    ]
    first = receiver.accepted("fleet_clearance_changed")[0]
    assert first["body"]["event"]["type"] == "fleet_clearance_changed"
    assert first["body"]["event"]["received_at"].endswith("Z")
    ids = {r["headers"]["X-HM-Delivery"] for r in receiver.requests}
    assert len(ids) == len(receiver.requests)  # every delivery has its own id
    assert receiver.bad_signatures == 0


async def test_failed_delivery_is_retried_with_same_id(hm: HM, receiver: Receiver) -> None:
    await hm.admin("PUT", "/webhook", json={"url": receiver.url})
    await receiver.wait_until(lambda r: r.accepted("ping"))
    receiver.fail_next = 2
    await hm.add(VIN)
    await receiver.wait_until(lambda r: r.accepted("fleet_clearance_changed"))
    attempts = [r for r in receiver.requests if r["headers"]["X-HM-Event"] != "ping"]
    assert [a["status"] for a in attempts] == [500, 500, 200]
    assert len({a["headers"]["X-HM-Delivery"] for a in attempts}) == 1
    deliveries = (await hm.admin("GET", "/webhook/deliveries")).json()
    assert deliveries[-1]["attempts"] == ["500", "500", "200"]
    assert deliveries[-1]["delivered"] is True


async def test_retries_are_bounded(hm: HM, receiver: Receiver) -> None:
    hm.server.emulator.webhooks.max_attempts = 3
    receiver.fail_next = 100
    await hm.admin("PUT", "/webhook", json={"url": receiver.url})
    await hm.add(VIN)
    # The ping gives up after 3 attempts, then the status change gets its own 3.
    await receiver.wait_until(lambda r: len(r.requests) == 6)
    deliveries = (await hm.admin("GET", "/webhook/deliveries")).json()
    assert [d["attempts"] for d in deliveries] == [["500"] * 3, ["500"] * 3]
    assert not any(d["delivered"] for d in deliveries)


async def test_unreachable_receiver_does_not_break_the_api(hm: HM) -> None:
    hm.server.emulator.webhooks.max_attempts = 2
    await hm.admin("PUT", "/webhook", json={"url": "http://127.0.0.1:9/nowhere"})
    await hm.add(VIN)
    assert await hm.status(VIN) == "pending"
