"""How the emulator decides what happens to a pending clearance, and how long each step takes.

The rule set, in order of precedence:

1. a per-VIN decision made through ``POST /_emulator/vehicles/{vin}/outcome`` (applied at once);
2. the first :class:`OutcomeRule` whose ``vin_glob`` (``fnmatch`` pattern, case-sensitive) and
   ``brand`` (when set) both match;
3. ``Behaviour.default``.

An outcome is ``approved``, ``rejected`` (with a reason) or ``pending``, which means "stay pending
until a decision is posted" (HM can take days). The default rules approve everything except VINs
ending in ``R``, which are rejected with reason ``vehicle_not_supported``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from typing import Any, Literal

OutcomeStatus = Literal["approved", "rejected", "pending"]
_OUTCOMES: frozenset[str] = frozenset({"approved", "rejected", "pending"})
ONE_DAY_S = 86_400.0


@dataclass(frozen=True)
class Outcome:
    status: OutcomeStatus
    reason: str | None = None

    @classmethod
    def from_json(cls, data: Any) -> Outcome:
        if not isinstance(data, dict) or data.get("status") not in _OUTCOMES:
            raise ValueError("outcome needs status 'approved', 'rejected' or 'pending'")
        reason = data.get("reason")
        if reason is not None and not isinstance(reason, str):
            raise ValueError("outcome reason must be a string")
        return cls(data["status"], reason)

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "reason": self.reason}


@dataclass(frozen=True)
class OutcomeRule:
    vin_glob: str = "*"
    outcome: Outcome = Outcome("approved")
    brand: str | None = None

    def matches(self, vin: str, brand: str) -> bool:
        return fnmatchcase(vin, self.vin_glob) and self.brand in (None, brand)

    @classmethod
    def from_json(cls, data: Any) -> OutcomeRule:
        if not isinstance(data, dict):
            raise ValueError("a rule is an object {vin_glob?, brand?, outcome}")
        return cls(
            vin_glob=str(data.get("vin_glob", "*")),
            outcome=Outcome.from_json(data.get("outcome")),
            brand=data.get("brand"),
        )

    def to_json(self) -> dict[str, Any]:
        return {"vin_glob": self.vin_glob, "brand": self.brand, "outcome": self.outcome.to_json()}


DEFAULT_RULES: tuple[OutcomeRule, ...] = (
    OutcomeRule("*R", Outcome("rejected", "vehicle_not_supported")),
)


@dataclass(frozen=True)
class Delays:
    """Seconds each asynchronous step takes; 0 makes the step due immediately."""

    decision_s: float = 5.0  # pending → approved / rejected
    revoke_s: float = 5.0  # revoking → revoked
    cancel_s: float = 5.0  # canceling → canceled

    def updated(self, data: Any) -> Delays:
        """A copy with the ``*_s`` fields present in ``data`` replaced."""
        if not isinstance(data, dict):
            raise ValueError("delays is an object of *_s numbers")
        values = {k: float(v) for k, v in data.items() if k in self.__dataclass_fields__}
        if any(v < 0 for v in values.values()):
            raise ValueError("delays cannot be negative")
        return replace(self, **values)


@dataclass(frozen=True)
class Behaviour:
    """Everything that decides clearance outcomes; replaceable at runtime via the admin API."""

    delays: Delays = field(default_factory=Delays)
    rules: tuple[OutcomeRule, ...] = DEFAULT_RULES
    default: Outcome = Outcome("approved")
    # HM refuses to cancel a pending clearance younger than one day (422 "too early").
    cancel_min_age_s: float = ONE_DAY_S

    def outcome_for(self, vin: str, brand: str) -> Outcome:
        for rule in self.rules:
            if rule.matches(vin, brand):
                return rule.outcome
        return self.default

    def to_json(self) -> dict[str, Any]:
        return {
            "delays": vars(self.delays),
            "rules": [r.to_json() for r in self.rules],
            "default": self.default.to_json(),
            "cancel_min_age_s": self.cancel_min_age_s,
        }

    def updated(self, data: Any) -> Behaviour:
        """A copy with the fields present in ``data`` (the admin API's JSON) replaced."""
        if not isinstance(data, dict):
            raise ValueError("behaviour is a JSON object")
        return Behaviour(
            delays=self.delays.updated(data["delays"]) if "delays" in data else self.delays,
            rules=tuple(OutcomeRule.from_json(r) for r in data["rules"])
            if "rules" in data
            else self.rules,
            default=Outcome.from_json(data["default"]) if "default" in data else self.default,
            cancel_min_age_s=float(data.get("cancel_min_age_s", self.cancel_min_age_s)),
        )
