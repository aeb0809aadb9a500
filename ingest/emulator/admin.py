"""Admin endpoints under ``/_emulator``: drive the emulator from tests in any process.

=======  ===================================  ====================================================
GET      /_emulator/state                     clock, vehicles (with admin decisions), behaviour,
                                              faults, webhook URL
POST     /_emulator/advance                   ``{"seconds": N}``: move the clock, settle, list the
                                              transitions that happened
POST     /_emulator/settle                    apply transitions due now
GET/PUT  /_emulator/behaviour                 delays, outcome rules, default, cancel_min_age_s
POST     /_emulator/vehicles/{vin}/outcome    ``{"status": "approved"|"rejected"|"pending",
                                              "reason"?}``: decide a pending VIN now
GET      /_emulator/faults                    active fault rules
POST     /_emulator/faults                    add one rule (see :mod:`ingest.emulator.faults`)
DELETE   /_emulator/faults                    clear all rules
PUT      /_emulator/webhook                   ``{"url": str | null}``: (re)configure, sends a ping
GET      /_emulator/webhook/deliveries        every delivery with its attempts
=======  ===================================  ====================================================

No authentication: the emulator listens on loopback and is a test double.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ingest.emulator.clock import isoformat
from ingest.emulator.context import EMULATOR
from ingest.emulator.errors import hm_error, read_params
from ingest.emulator.faults import Fault
from ingest.emulator.rules import Outcome
from ingest.emulator.state import ClearanceRefused, StatusChange


def _bad(detail: str) -> Exception:
    return hm_error(400, "Bad request", detail, "body")


def _changes(changes: list[StatusChange]) -> list[dict[str, Any]]:
    return [
        {"vin": c.vin, "status": c.status, "reason": c.reason, "at": isoformat(c.at)}
        for c in changes
    ]


async def get_state(request: web.Request) -> web.Response:
    emu = request.app[EMULATOR]
    vehicles = []
    for v in emu.store.all():
        item = v.to_api()
        item["decided"] = v.decided.to_json() if v.decided else None
        vehicles.append(item)
    return web.json_response(
        {
            "now": isoformat(emu.clock.now()),
            "now_unix": emu.clock.now(),
            "base_url": emu.base_url,
            "vehicles": vehicles,
            "behaviour": emu.store.behaviour.to_json(),
            "faults": emu.faults.to_json(),
            "webhook_url": emu.webhooks.url,
        }
    )


async def post_advance(request: web.Request) -> web.Response:
    emu = request.app[EMULATOR]
    seconds = (await read_params(request)).get("seconds")
    if not isinstance(seconds, int | float) or seconds < 0:
        raise _bad("seconds must be a non-negative number")
    emu.clock.advance(float(seconds))
    return web.json_response(
        {"now": isoformat(emu.clock.now()), "changes": _changes(emu.store.settle())}
    )


async def post_settle(request: web.Request) -> web.Response:
    return web.json_response({"changes": _changes(request.app[EMULATOR].store.settle())})


async def get_behaviour(request: web.Request) -> web.Response:
    return web.json_response(request.app[EMULATOR].store.behaviour.to_json())


async def put_behaviour(request: web.Request) -> web.Response:
    store = request.app[EMULATOR].store
    try:
        store.behaviour = store.behaviour.updated(await read_params(request))
    except (ValueError, TypeError, KeyError) as exc:
        raise _bad(str(exc)) from exc
    return web.json_response(store.behaviour.to_json())


async def post_outcome(request: web.Request) -> web.Response:
    store = request.app[EMULATOR].store
    try:
        outcome = Outcome.from_json(await read_params(request))
        vehicle = store.decide(request.match_info["vin"], outcome)
    except ValueError as exc:
        raise _bad(str(exc)) from exc
    except ClearanceRefused as exc:
        raise hm_error(exc.http_status, exc.title, exc.detail, exc.source) from exc
    return web.json_response(vehicle.to_api())


async def get_faults(request: web.Request) -> web.Response:
    return web.json_response(request.app[EMULATOR].faults.to_json())


async def post_faults(request: web.Request) -> web.Response:
    faults = request.app[EMULATOR].faults
    try:
        faults.add(Fault.from_json(await read_params(request)))
    except (ValueError, TypeError) as exc:
        raise _bad(str(exc)) from exc
    return web.json_response(faults.to_json())


async def delete_faults(request: web.Request) -> web.Response:
    faults = request.app[EMULATOR].faults
    faults.clear()
    return web.json_response(faults.to_json())


async def put_webhook(request: web.Request) -> web.Response:
    webhooks = request.app[EMULATOR].webhooks
    url = (await read_params(request)).get("url")
    if url is not None and not isinstance(url, str):
        raise _bad("url must be a string or null")
    webhooks.configure(url)
    return web.json_response({"url": webhooks.url})


async def get_deliveries(request: web.Request) -> web.Response:
    return web.json_response([d.to_json() for d in request.app[EMULATOR].webhooks.log])


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/_emulator/state", get_state)
    r.add_post("/_emulator/advance", post_advance)
    r.add_post("/_emulator/settle", post_settle)
    r.add_get("/_emulator/behaviour", get_behaviour)
    r.add_put("/_emulator/behaviour", put_behaviour)
    r.add_post("/_emulator/vehicles/{vin}/outcome", post_outcome)
    r.add_get("/_emulator/faults", get_faults)
    r.add_post("/_emulator/faults", post_faults)
    r.add_delete("/_emulator/faults", delete_faults)
    r.add_put("/_emulator/webhook", put_webhook)
    r.add_get("/_emulator/webhook/deliveries", get_deliveries)
