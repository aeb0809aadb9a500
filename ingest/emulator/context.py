"""The emulator's parts, bundled so every handler reaches them through ``request.app[EMULATOR]``."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from ingest.emulator.clock import Clock
from ingest.emulator.faults import FaultInjector
from ingest.emulator.keys import Credentials
from ingest.emulator.rules import Behaviour
from ingest.emulator.state import ClearanceStore
from ingest.emulator.tokens import TokenAuthority
from ingest.emulator.webhooks import WebhookSender

DEFAULT_TOKEN_TTL_S = 300  # HM's access tokens live five minutes


@dataclass(frozen=True)
class EmulatorConfig:
    behaviour: Behaviour = field(default_factory=Behaviour)
    expires_in_s: int = DEFAULT_TOKEN_TTL_S
    webhook_url: str | None = None
    webhook_max_attempts: int = 5
    webhook_backoff_s: float = 0.5
    # How often the background task settles due transitions so webhooks fire without traffic.
    tick_s: float = 0.25
    fault_seed: int | None = None


@dataclass
class Emulator:
    config: EmulatorConfig
    clock: Clock
    creds: Credentials
    store: ClearanceStore
    tokens: TokenAuthority
    faults: FaultInjector
    webhooks: WebhookSender
    base_url: str = ""  # e.g. http://127.0.0.1:8080/v1, known once the port is bound


EMULATOR = web.AppKey("emulator", Emulator)
