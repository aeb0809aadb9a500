"""The clearance store: HM's asynchronous fleet clearance state machine, persisted as JSON.

::

    POST   → pending ──(decision_s)──→ approved ──DELETE──→ revoking ──(revoke_s)──→ revoked
                     └─(decision_s)──→ rejected (reason)
           pending ──DELETE──→ canceling ──(cancel_s)──→ canceled

Transitions are evaluated lazily against an injected clock: :meth:`ClearanceStore.settle` applies
every transition that is due, stamping each changelog entry with the moment it became due (not the
moment it was noticed), so results do not depend on how often anyone looks. The app calls
``settle()`` before every request and from a slow background tick so webhooks fire on their own.

A POST for a VIN whose clearance ended (rejected, revoked, canceled) starts a fresh ``pending``
clearance, appending to the same changelog; for any other known VIN it reports the current status.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from ingest.emulator.catalogue import CANCELLABLE_BRANDS, IN_TRANSITION, TERMINAL, Status
from ingest.emulator.clock import Clock, isoformat
from ingest.emulator.rules import Behaviour, Outcome

STATE_FILE = "clearances.json"
STATE_VERSION = 1


class StatusChange(NamedTuple):
    vin: str
    status: Status
    reason: str | None
    at: float


class ClearanceRefused(Exception):
    """A request the state machine refuses; carries HM's error fields and the HTTP status."""

    def __init__(self, http_status: int, title: str, detail: str, source: str) -> None:
        super().__init__(detail)
        self.http_status = http_status
        self.title = title
        self.detail = detail
        self.source = source


@dataclass
class Vehicle:
    vin: str
    brand: str
    tags: dict[str, str]
    status: Status
    since: float  # when the current status was entered
    changelog: list[dict[str, Any]] = field(default_factory=list)  # {"at", "status", "reason"?}
    decided: Outcome | None = None  # an admin decision overriding the rules

    def enter(self, status: Status, at: float, reason: str | None = None) -> StatusChange:
        self.status = status
        self.since = at
        entry: dict[str, Any] = {"at": at, "status": status}
        if reason is not None:
            entry["reason"] = reason
        self.changelog.append(entry)
        return StatusChange(self.vin, status, reason, at)

    def to_api(self) -> dict[str, Any]:
        """The object ``GET /v1/fleets/vehicles`` returns."""
        changelog = []
        for e in self.changelog:
            item = {"timestamp": isoformat(e["at"]), "status": e["status"]}
            if "reason" in e:
                item["reason"] = e["reason"]
            changelog.append(item)
        return {
            "vin": self.vin,
            "status": self.status,
            "brand": self.brand,
            "tags": dict(self.tags),
            "changelog": changelog,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "vin": self.vin,
            "brand": self.brand,
            "tags": self.tags,
            "status": self.status,
            "since": self.since,
            "changelog": self.changelog,
            "decided": self.decided.to_json() if self.decided else None,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Vehicle:
        decided = Outcome.from_json(d["decided"]) if d.get("decided") else None
        return cls(
            d["vin"], d["brand"], d["tags"], d["status"], d["since"], d["changelog"], decided
        )


class ClearanceStore:
    def __init__(
        self,
        state_dir: Path,
        clock: Clock,
        behaviour: Behaviour,
        on_change: Callable[[StatusChange], None] | None = None,
    ) -> None:
        self._path = state_dir / STATE_FILE
        self._clock = clock
        self.behaviour = behaviour
        self._on_change = on_change
        self._vehicles: dict[str, Vehicle] = {}
        self._deferring = False
        self._dirty = False
        self._load()

    @contextlib.contextmanager
    def one_save(self) -> Iterator[None]:
        """Group many commands (a POST of 1,000 vehicles) into one rewrite of the state file."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
            if self._dirty:
                self._save()

    # -- queries --------------------------------------------------------------------------
    def get(self, vin: str) -> Vehicle | None:
        self.settle()
        return self._vehicles.get(vin)

    def all(self) -> list[Vehicle]:
        self.settle()
        return list(self._vehicles.values())

    # -- commands -------------------------------------------------------------------------
    def add(self, vin: str, brand: str, tags: dict[str, str]) -> Vehicle:
        self.settle()
        now = self._clock.now()
        vehicle = self._vehicles.get(vin)
        if vehicle is not None and vehicle.status not in TERMINAL:
            return vehicle
        if vehicle is None:
            vehicle = Vehicle(vin, brand, dict(tags), "pending", now)
            self._vehicles[vin] = vehicle
        vehicle.brand, vehicle.tags, vehicle.decided = brand, dict(tags), None
        self._emit([vehicle.enter("pending", now)])
        return vehicle

    def delete(self, vin: str) -> Vehicle:
        """Start revoking (approved) or canceling (pending); raises :class:`ClearanceRefused`."""
        self.settle()
        vehicle = self._vehicles.get(vin)
        if vehicle is None:
            raise ClearanceRefused(404, "Not found", "Clearance not found for this vin", "vin")
        if vehicle.status in TERMINAL:
            raise ClearanceRefused(409, "Conflict", "Clearance is already removed", "vin")
        if vehicle.status in IN_TRANSITION:
            raise ClearanceRefused(409, "Conflict", "Clearance is in transition mode", "vin")
        now = self._clock.now()
        if vehicle.status == "approved":
            self._emit([vehicle.enter("revoking", now)])
            return vehicle
        if vehicle.brand not in CANCELLABLE_BRANDS:
            raise ClearanceRefused(
                422, "not supported", "cancellation is not supported for this vin", "vin"
            )
        if now - vehicle.since < self.behaviour.cancel_min_age_s:
            raise ClearanceRefused(
                422,
                "too early",
                "the pending status could only be canceled after 1 day it's created",
                "status",
            )
        self._emit([vehicle.enter("canceling", now)])
        return vehicle

    def decide(self, vin: str, outcome: Outcome) -> Vehicle:
        """Fix a pending VIN's outcome; a final outcome is applied immediately."""
        self.settle()
        vehicle = self._vehicles.get(vin)
        if vehicle is None:
            raise ClearanceRefused(404, "Not found", "unknown vin", "vin")
        if vehicle.status != "pending":
            raise ClearanceRefused(409, "Conflict", f"vin is {vehicle.status}, not pending", "vin")
        vehicle.decided = outcome
        if outcome.status == "pending":
            self._save()
            return vehicle
        self._emit([vehicle.enter(outcome.status, self._clock.now(), outcome.reason)])
        return vehicle

    def settle(self) -> list[StatusChange]:
        """Apply every transition that is due by now; returns them in the order applied."""
        now = self._clock.now()
        changes: list[StatusChange] = []
        for vehicle in self._vehicles.values():
            while (step := self._next_step(vehicle)) is not None and step[1] <= now:
                status, due, reason = step
                changes.append(vehicle.enter(status, due, reason))
        self._emit(changes)
        return changes

    def _next_step(self, v: Vehicle) -> tuple[Status, float, str | None] | None:
        delays = self.behaviour.delays
        if v.status == "pending":
            outcome = v.decided or self.behaviour.outcome_for(v.vin, v.brand)
            if outcome.status == "pending":
                return None
            return outcome.status, v.since + delays.decision_s, outcome.reason
        if v.status == "revoking":
            return "revoked", v.since + delays.revoke_s, None
        if v.status == "canceling":
            return "canceled", v.since + delays.cancel_s, None
        return None

    def _emit(self, changes: list[StatusChange]) -> None:
        if not changes:
            return
        self._save()
        if self._on_change is not None:
            for change in changes:
                self._on_change(change)

    # -- persistence ----------------------------------------------------------------------
    def _load(self) -> None:
        if not self._path.exists():
            return
        data = json.loads(self._path.read_text(encoding="utf-8"))
        if data.get("version") != STATE_VERSION:
            raise ValueError(f"{self._path}: unsupported state version {data.get('version')!r}")
        self._vehicles = {d["vin"]: Vehicle.from_json(d) for d in data["vehicles"]}

    def _save(self) -> None:
        if self._deferring:
            self._dirty = True
            return
        self._dirty = False
        # Write-then-rename so a crash never leaves a half-written state file behind. No fsync:
        # this is a test double, and losing the last change on power loss is acceptable here.
        data = {
            "version": STATE_VERSION,
            "vehicles": [v.to_json() for v in self._vehicles.values()],
        }
        tmp = self._path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
        os.replace(tmp, self._path)
