"""Fleet clearance and eligibility endpoints (Bearer token required on all of them).

Status codes follow HM's OpenAPI files: item-level errors in ``POST /v1/fleets/vehicles`` (never an
HTTP error for a bad VIN), 404 for an unknown VIN, 409/422 for refused deletions, 400 with the OAuth
error shape from ``POST /v1/fleets/access_tokens``, 403 for a token without ``fleet:clearance``.
The eligibility spec documents no 403, so a token without its scope gets 401 there.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ingest.emulator.auth import require_scope
from ingest.emulator.catalogue import ELIGIBILITY_BRANDS, FLEET_BRANDS, vin_problem
from ingest.emulator.clock import isoformat
from ingest.emulator.context import EMULATOR
from ingest.emulator.errors import hm_error, oauth_error, read_params
from ingest.emulator.filters import FilterError, parse_filter
from ingest.emulator.state import ClearanceRefused, ClearanceStore
from ingest.emulator.tokens import VEHICLE_SCOPES

FLEET_SCOPE = "fleet:clearance"
ELIGIBILITY_SCOPE = "vehicle:eligibility-check"


def _item_error(vin: Any, description: str) -> dict[str, Any]:
    return {
        "vin": vin if isinstance(vin, str) else "",
        "status": "error",
        "description": description,
    }


def _valid_tags(tags: Any) -> bool:
    return isinstance(tags, dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in tags.items()
    )


async def post_vehicles(request: web.Request) -> web.Response:
    require_scope(request, FLEET_SCOPE)
    store = request.app[EMULATOR].store
    body = await read_params(request)
    vehicles = body.get("vehicles")
    if not isinstance(vehicles, list):
        raise hm_error(422, "Invalid input", "vehicles must be a list", "vehicles")
    with store.one_save():
        results = [_add_vehicle(store, item) for item in vehicles]
    return web.json_response({"vehicles": results})


def _add_vehicle(store: ClearanceStore, item: object) -> dict[str, Any]:
    if not isinstance(item, dict):
        return _item_error(None, "each vehicle must be an object")
    vin, brand, tags = item.get("vin"), item.get("brand"), item.get("tags", {})
    problem = vin_problem(vin)
    if problem is None and brand not in FLEET_BRANDS:
        problem = "The brand is invalid"
    if problem is None and not _valid_tags(tags):
        problem = "tags must map strings to strings"
    if problem is not None:
        return _item_error(vin, problem)
    # control_measures (odometer) is accepted and ignored: HM has marked it unnecessary.
    vehicle = store.add(str(vin), str(brand), tags)
    return {"vin": vehicle.vin, "status": vehicle.status, "tags": vehicle.tags}


async def get_vehicles(request: web.Request) -> web.Response:
    require_scope(request, FLEET_SCOPE)
    try:
        keep = parse_filter(request.query.get("filter"))
    except FilterError as exc:
        # The spec documents no 4xx for a bad filter; 422 with HM's error shape is our choice.
        raise hm_error(422, "Invalid input", str(exc), "filter") from exc
    vehicles = request.app[EMULATOR].store.all()
    return web.json_response([v.to_api() for v in vehicles if keep(v)])


async def get_vehicle(request: web.Request) -> web.Response:
    require_scope(request, FLEET_SCOPE)
    vehicle = request.app[EMULATOR].store.get(request.match_info["vin"])
    if vehicle is None:
        raise hm_error(404, "Not found", "Clearance not found for this vin", "vin")
    return web.json_response(vehicle.to_api())


async def delete_vehicle(request: web.Request) -> web.Response:
    require_scope(request, FLEET_SCOPE)
    try:
        vehicle = request.app[EMULATOR].store.delete(request.match_info["vin"])
    except ClearanceRefused as exc:
        raise hm_error(exc.http_status, exc.title, exc.detail, exc.source) from exc
    return web.json_response({"vin": vehicle.vin, "status": vehicle.status, "tags": vehicle.tags})


async def post_fleet_access_token(request: web.Request) -> web.Response:
    require_scope(request, FLEET_SCOPE)
    emu = request.app[EMULATOR]
    vin = (await read_params(request)).get("vin")
    if not isinstance(vin, str) or not vin:
        raise oauth_error("vin can't be blank")
    vehicle = emu.store.get(vin)
    if vehicle is None or vehicle.status != "approved":
        raise oauth_error("vin is not approved for this fleet")
    token, info = emu.tokens.issue("vehicle", VEHICLE_SCOPES, emu.creds.client_id, vin=vin)
    return web.json_response(
        {
            "access_token": token,
            "refresh_token": emu.tokens.new_refresh_token(vin, VEHICLE_SCOPES),
            "expires_in": emu.tokens.expires_in_s,
            "scope": VEHICLE_SCOPES,
            "token_type": "bearer",
            "validity_start_date": isoformat(info.iat),
            "validity_end_date": isoformat(info.exp),
            "status": "approved",
        }
    )


async def post_eligibility(request: web.Request) -> web.Response:
    require_scope(request, ELIGIBILITY_SCOPE, forbidden_status=401)
    emu = request.app[EMULATOR]
    body = await read_params(request)
    vin, brand = body.get("vin"), body.get("brand")
    problem = vin_problem(vin)
    if problem is not None:
        raise hm_error(422, "Invalid input", problem, "vin")
    if brand not in ELIGIBILITY_BRANDS:
        raise hm_error(422, "Invalid input", "The brand is invalid", "brand")
    # A vehicle the outcome rules would reject is reported as not eligible.
    eligible = emu.store.behaviour.outcome_for(str(vin), str(brand)).status != "rejected"
    return web.json_response(
        {
            "vin": vin,
            "eligible": eligible,
            "data_delivery": ["pull", "push"] if eligible else [],
            "connectivity_status": "activated" if eligible else "unknown",
        }
    )


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/fleets/vehicles", post_vehicles)
    app.router.add_get("/v1/fleets/vehicles", get_vehicles)
    app.router.add_get("/v1/fleets/vehicles/{vin}", get_vehicle)
    app.router.add_delete("/v1/fleets/vehicles/{vin}", delete_vehicle)
    app.router.add_post("/v1/fleets/access_tokens", post_fleet_access_token)
    app.router.add_post("/v1/eligibility", post_eligibility)
