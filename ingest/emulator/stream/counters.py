"""What the stream sent, in total and per VIN: what ``GET /_emulator/stream`` reports.

``messages`` counts distinct good messages and ``items`` the telemetry rows they should become, so
a consumer that deduplicates by ``message_id`` and quarantines the ``bad`` ones can be checked
exactly: rows written == ``items``, quarantined == ``bad``, dropped repeats == ``duplicates``.
``bad`` includes the malformed (not-JSON) messages; ``bad_kinds`` counts each damage apart.
PUBACKs arrive on paho's network thread, hence the lock.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from ingest.emulator.clock import isoformat
from ingest.emulator.stream.messages import Outgoing


@dataclass
class VinCounters:
    messages: int = 0
    items: int = 0
    failures: int = 0
    duplicates: int = 0
    bad: int = 0
    first_at: float | None = None
    last_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("first_at", "last_at"):
            data[key] = isoformat(data[key]) if data[key] is not None else None
        return data


class StreamCounters:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.sent = 0
        self.acked = 0
        self.by_version: Counter[str] = Counter()
        self.bad_kinds: Counter[str] = Counter()
        self.vins: dict[str, VinCounters] = {}

    def record(self, out: Outgoing, at: float) -> None:
        with self._lock:
            self.sent += 1
            vin = self.vins.setdefault(out.vin, VinCounters())
            vin.first_at = at if vin.first_at is None else vin.first_at
            vin.last_at = at
            if out.kind == "message":
                vin.messages += 1
                vin.items += out.items
                vin.failures += out.failures
                self.by_version[f"v{out.version}"] += 1
            elif out.kind == "duplicate":
                vin.duplicates += 1
            else:
                vin.bad += 1
                self.bad_kinds[out.damage or "unknown"] += 1

    def ack(self) -> None:
        with self._lock:
            self.acked += 1

    @property
    def unacked(self) -> int:
        with self._lock:
            return self.sent - self.acked

    def totals(self) -> dict[str, Any]:
        with self._lock:
            vins = list(self.vins.values())
            return {
                "sent": self.sent,
                "acked": self.acked,
                "messages": sum(v.messages for v in vins),
                "items": sum(v.items for v in vins),
                "failures": sum(v.failures for v in vins),
                "duplicates": sum(v.duplicates for v in vins),
                "bad": sum(v.bad for v in vins),
                "by_version": dict(self.by_version),
                "bad_kinds": dict(self.bad_kinds),
            }

    def per_vin(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {vin: c.to_json() for vin, c in sorted(self.vins.items())}
