"""The daemon's HTTP server: ``/metrics``, ``/healthz``, ``/readyz`` and extra routes (webhook).

aiohttp serves it on the event loop; every handler is cheap (a registry scrape of a few hundred
series takes well under a millisecond), so nothing here needs a thread.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ingest.health import HealthState, Verdict
from ingest.metrics import Metrics

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _verdict_response(verdict: Verdict) -> web.Response:
    return web.json_response(
        {"status": "ok" if verdict.ok else "failing", "checks": verdict.checks},
        status=200 if verdict.ok else 503,
    )


def build_app(
    metrics: Metrics,
    health: HealthState,
    extra_routes: list[tuple[str, str, Handler]] | None = None,
    *,
    client_max_size: int = 1024**2,
) -> web.Application:
    async def metrics_handler(_: web.Request) -> web.Response:
        body = generate_latest(metrics.registry)
        response = web.Response(body=body)
        # CONTENT_TYPE_LATEST carries a charset parameter that aiohttp refuses in content_type.
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def healthz(_: web.Request) -> web.Response:
        return _verdict_response(health.live())

    async def readyz(_: web.Request) -> web.Response:
        return _verdict_response(health.ready())

    app = web.Application(client_max_size=client_max_size)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    for method, path, handler in extra_routes or []:
        app.router.add_route(method, path, handler)
    return app


@contextlib.asynccontextmanager
async def serve(app: web.Application, host: str, port: int) -> AsyncIterator[int]:
    """Serve ``app`` on ``host:port`` (0 picks a free port); yields the bound port."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    try:
        server = site._server  # aiohttp exposes the bound socket only here
        sockets = getattr(server, "sockets", None) or []
        yield sockets[0].getsockname()[1] if sockets else port
    finally:
        await runner.cleanup()
