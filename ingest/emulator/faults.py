"""Fault injection: make the emulator answer 429 or 5xx, or answer slowly, on demand.

Faults are rules, checked in order for every ``/v1/...`` request (never for ``/_emulator``):

``{"kind": "429" | "5xx" | "delay", "count": N?, "fraction": 0..1?, "path_prefix": "/v1/..."?,
"status": 500..599 (5xx, default 503), "retry_after_s": 10 (429), "retry_after_header": false,
"delay_s": 1.0 (delay)}``

With ``count`` a rule fires for the next N matching requests and then disappears; with ``fraction``
it fires at random for that share of matching requests (seeded, so runs repeat) until cleared;
with neither it fires for every matching request until cleared. A ``delay`` rule holds the request
and then lets it through, so it combines with the others.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Literal

from aiohttp import web

from ingest.emulator.errors import hm_error

FaultKind = Literal["429", "5xx", "delay"]
_KINDS = frozenset({"429", "5xx", "delay"})


@dataclass
class Fault:
    kind: FaultKind
    count: int | None = None
    fraction: float | None = None
    path_prefix: str = "/v1/"
    status: int = 503
    retry_after_s: int = 10
    retry_after_header: bool = False
    delay_s: float = 1.0

    @classmethod
    def from_json(cls, data: Any) -> Fault:
        if not isinstance(data, dict) or str(data.get("kind")) not in _KINDS:
            raise ValueError("a fault needs kind '429', '5xx' or 'delay'")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["kind"] = str(known["kind"])
        fault = cls(**known)
        if fault.kind == "5xx" and not 500 <= fault.status <= 599:
            raise ValueError("a 5xx fault needs a status between 500 and 599")
        if fault.fraction is not None and not 0.0 <= fault.fraction <= 1.0:
            raise ValueError("fraction must be between 0 and 1")
        return fault


class FaultInjector:
    def __init__(self, seed: int | None = None) -> None:
        self.faults: list[Fault] = []
        self._random = random.Random(seed)  # noqa: S311 -- test randomness, not security
        self.fired = 0

    def add(self, fault: Fault) -> None:
        self.faults.append(fault)

    def clear(self) -> None:
        self.faults.clear()

    def to_json(self) -> list[dict[str, Any]]:
        return [asdict(f) for f in self.faults]

    def _take(self, path: str, kinds: frozenset[str]) -> Fault | None:
        for fault in self.faults:
            if fault.kind not in kinds or not path.startswith(fault.path_prefix):
                continue
            if fault.fraction is not None and self._random.random() >= fault.fraction:
                continue
            if fault.count is not None:
                fault.count -= 1
                if fault.count <= 0:
                    self.faults.remove(fault)
            self.fired += 1
            return fault
        return None

    async def apply(self, request: web.Request) -> None:
        """Sleep for a delay fault, raise for an error fault, or do nothing."""
        if not request.path.startswith("/v1/"):
            return
        delay = self._take(request.path, frozenset({"delay"}))
        if delay is not None:
            await asyncio.sleep(delay.delay_s)
        fault = self._take(request.path, frozenset({"429", "5xx"}))
        if fault is None:
            return
        if fault.kind == "429":
            headers = (
                {"Retry-After": str(fault.retry_after_s)} if fault.retry_after_header else None
            )
            raise hm_error(
                429,
                "Too many requests",
                f"retry after {fault.retry_after_s}s",
                f"fleet-manager-api:{uuid.uuid4()}",
                headers,
            )
        raise hm_error(fault.status, "Server error", "injected fault", "emulator")
