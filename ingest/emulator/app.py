"""Assembling and serving the emulator: :class:`EmulatorServer` and :func:`run_emulator`.

``EmulatorServer`` is the in-process entry point for tests (port 0 by default; read ``base_url``
after entering). ``run_emulator`` serves until its stop event is set and prints one JSON line with
everything a client needs: ``base_url``, ``admin_url``, ``client_id``, ``client_secret``,
``private_key_file`` (OAuth client_assertion key), ``service_account_key_file``,
``webhook_secret`` and ``stream`` (the vehicle stream's settings, or null without one).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TextIO

from aiohttp import web

from ingest.emulator import admin, auth, routes
from ingest.emulator.clock import Clock, SystemClock
from ingest.emulator.context import EMULATOR, Emulator, EmulatorConfig
from ingest.emulator.errors import ApiFailure
from ingest.emulator.faults import FaultInjector
from ingest.emulator.keys import load_or_create, write_key_file
from ingest.emulator.state import ClearanceStore
from ingest.emulator.stream import StreamConfig, VehicleStream
from ingest.emulator.stream import admin as stream_admin
from ingest.emulator.tokens import TokenAuthority
from ingest.emulator.webhooks import WebhookSender

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def build_emulator(state_dir: Path, config: EmulatorConfig, clock: Clock) -> Emulator:
    state_dir.mkdir(parents=True, exist_ok=True)
    creds = load_or_create(state_dir, clock.now())
    webhooks = WebhookSender(
        creds.webhook_secret, clock, config.webhook_max_attempts, config.webhook_backoff_s
    )
    store = ClearanceStore(state_dir, clock, config.behaviour, on_change=webhooks.on_change)
    return Emulator(
        config=config,
        clock=clock,
        creds=creds,
        store=store,
        tokens=TokenAuthority(creds, clock, config.expires_in_s),
        faults=FaultInjector(config.fault_seed),
        webhooks=webhooks,
    )


@web.middleware
async def _errors_and_faults(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        await request.app[EMULATOR].faults.apply(request)
        return await handler(request)
    except ApiFailure as failure:
        return failure.response


async def _background(app: web.Application) -> AsyncIterator[None]:
    emu = app[EMULATOR]

    async def tick() -> None:
        while True:
            await asyncio.sleep(emu.config.tick_s)
            emu.store.settle()

    tasks = [
        asyncio.create_task(emu.webhooks.run(), name="emulator-webhooks"),
        asyncio.create_task(tick(), name="emulator-settle-tick"),
    ]
    yield
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task


def make_app(emu: Emulator, stream: VehicleStream | None = None) -> web.Application:
    app = web.Application(middlewares=[_errors_and_faults])
    app[EMULATOR] = emu
    auth.add_routes(app)
    routes.add_routes(app)
    admin.add_routes(app)
    stream_admin.add_routes(app, stream)
    app.cleanup_ctx.append(_background)
    return app


class EmulatorServer:
    """The emulator on a real HTTP socket, as an async context manager.

    With ``stream``, it also publishes vehicle telemetry for approved VINs (``self.stream``),
    connected once the HTTP side is up and stopped (PUBACKs drained) before it goes down.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        config: EmulatorConfig | None = None,
        clock: Clock | None = None,
        stream: StreamConfig | None = None,
    ) -> None:
        self.state_dir = state_dir
        self._host, self._port = host, port
        self.emulator = build_emulator(
            state_dir, config or EmulatorConfig(), clock or SystemClock()
        )
        self.stream = (
            VehicleStream(stream.settings, stream.broker, self.emulator.store, self.emulator.clock)
            if stream is not None
            else None
        )
        self._runner = web.AppRunner(make_app(self.emulator, self.stream))
        self.origin = ""
        self.key_files: dict[str, Path] = {}

    @property
    def base_url(self) -> str:
        return self.emulator.base_url

    @property
    def admin_url(self) -> str:
        return f"{self.origin}/_emulator"

    async def __aenter__(self) -> Self:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        port = self._runner.addresses[0][1]
        host = "127.0.0.1" if self._host in ("", "0.0.0.0") else self._host  # noqa: S104
        host = f"[{host}]" if ":" in host else host
        self.origin = f"http://{host}:{port}"
        emu = self.emulator
        emu.base_url = emu.tokens.base_url = f"{self.origin}/v1"
        creds = emu.creds
        self.key_files = {
            "private_key_file": write_key_file(
                self.state_dir, creds.oauth_key, self.origin, f"{emu.base_url}/access_tokens"
            ),
            "service_account_key_file": write_key_file(
                self.state_dir,
                creds.service_account_key,
                self.origin,
                f"{emu.base_url}/auth_tokens",
            ),
        }
        if emu.config.webhook_url:
            emu.webhooks.configure(emu.config.webhook_url)
        if self.stream is not None:
            try:
                await self.stream.start()
            except BaseException:
                await self._runner.cleanup()
                raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self.stream is not None:
                await self.stream.stop()
        finally:
            await self._runner.cleanup()

    def info(self) -> dict[str, Any]:
        """What the start-up JSON line says."""
        creds = self.emulator.creds
        return {
            "base_url": self.base_url,
            "admin_url": self.admin_url,
            "client_id": creds.client_id,
            "client_secret": creds.client_secret,
            "private_key_file": str(self.key_files["private_key_file"]),
            "service_account_key_file": str(self.key_files["service_account_key_file"]),
            "webhook_secret": creds.webhook_secret,
            "stream": self._stream_info(),
        }

    def _stream_info(self) -> dict[str, Any] | None:
        if self.stream is None:
            return None
        return {
            "url": f"{self.admin_url}/stream",
            "broker": f"{self.stream.target.host}:{self.stream.target.port}",
            "client_id": self.stream.target.client_id,
            **self.stream.settings.to_json(),
        }


def parse_listen(api_listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) → (host, port)."""
    host, sep, port = api_listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--api-listen must be HOST:PORT, got {api_listen!r}")
    return host.strip("[]"), int(port)


async def run_emulator(
    api_listen: str,
    state_dir: Path,
    *,
    config: EmulatorConfig | None = None,
    stop: asyncio.Event | None = None,
    out: TextIO = sys.stdout,
    stream: StreamConfig | None = None,
) -> None:
    """Serve until ``stop`` is set (forever without one), after printing the JSON line."""
    host, port = parse_listen(api_listen)
    async with EmulatorServer(
        state_dir, host=host, port=port, config=config, stream=stream
    ) as server:
        out.write(json.dumps(server.info()) + "\n")
        out.flush()
        await (stop or asyncio.Event()).wait()
