"""``/_emulator/stream``: read the stream's counters, pause it, change its rates at runtime.

=======  ======================  ===============================================================
GET      /_emulator/stream       settings, streaming VINs, totals and per-VIN counters
                                 (``?vehicles=0`` leaves the per-VIN table out)
PUT      /_emulator/stream       change any of ``paused``, ``format``, ``rate``,
                                 ``vehicle_rate``, ``duplicate_rate``, ``bad_rate``,
                                 ``malformed_rate``, ``failure_rate``; answers like GET
=======  ======================  ===============================================================

Without ``--mqtt-broker`` the emulator has no stream and both answer 404.
"""

from __future__ import annotations

from aiohttp import web

from ingest.emulator.errors import hm_error, read_params
from ingest.emulator.stream.runner import VehicleStream

STREAM = web.AppKey("stream", VehicleStream)


async def get_stream(request: web.Request) -> web.Response:
    stream = request.app[STREAM]
    per_vin = request.query.get("vehicles", "1") not in ("0", "false")
    return web.json_response(stream.to_json(per_vin=per_vin))


async def put_stream(request: web.Request) -> web.Response:
    stream = request.app[STREAM]
    try:
        stream.update(await read_params(request))
    except (ValueError, TypeError) as exc:
        raise hm_error(400, "Bad request", str(exc), "body") from exc
    return web.json_response(stream.to_json(per_vin=False))


async def no_stream(request: web.Request) -> web.Response:
    raise hm_error(
        404,
        "Not found",
        "this emulator runs no vehicle stream (start it with --mqtt-broker)",
        "path",
    )


def add_routes(app: web.Application, stream: VehicleStream | None) -> None:
    if stream is None:
        app.router.add_get("/_emulator/stream", no_stream)
        app.router.add_put("/_emulator/stream", no_stream)
        return
    app[STREAM] = stream
    app.router.add_get("/_emulator/stream", get_stream)
    app.router.add_put("/_emulator/stream", put_stream)
