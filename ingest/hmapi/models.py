"""Typed values exchanged with HM's fleet APIs, and their lenient parsers.

Parsing follows HM's advice that new fields appear over time: unknown keys are ignored and
statuses stay plain strings (a status HM adds tomorrow is kept, not rejected). Only what a result
cannot exist without (``vin``, ``status``) is required; its absence is an
:class:`~ingest.errors.ApiError`, because acting on a half-read fleet listing would be worse.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Literal

from ingest.errors import ApiError
from ingest.hmapi.secret import Secret


class ClearanceStatus(StrEnum):
    """Statuses HM documents. Results hold plain ``str``; compare with these members."""

    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"
    REVOKING = "revoking"
    REVOKED = "revoked"
    CANCELING = "canceling"
    CANCELED = "canceled"
    ERROR = "error"  # only in POST /v1/fleets/vehicles results


OdometerUnit = Literal["kilometers", "miles"]


@dataclass(frozen=True)
class Odometer:
    value: int
    unit: OdometerUnit = "kilometers"

    def __post_init__(self) -> None:
        if self.value < 0 or self.unit not in ("kilometers", "miles"):
            raise ValueError(f"odometer must be a non-negative int in kilometers|miles: {self!r}")


@dataclass(frozen=True)
class VehicleRequest:
    vin: str
    brand: str
    tags: Mapping[str, str] = field(default_factory=dict)
    odometer: Odometer | None = None

    def to_json(self) -> dict[str, Any]:
        item: dict[str, Any] = {"vin": self.vin, "brand": self.brand, "tags": dict(self.tags)}
        if self.odometer is not None:
            # Deprecated by HM but still accepted: sent only when configured (reference §3).
            odometer = {"value": self.odometer.value, "unit": self.odometer.unit}
            item["control_measures"] = {"odometer": odometer}
        return item


@dataclass(frozen=True)
class ChangelogEntry:
    timestamp: datetime | None
    status: str
    reason: str | None = None


@dataclass(frozen=True)
class Clearance:
    vin: str
    status: str
    brand: str | None
    tags: Mapping[str, str]
    changelog: tuple[ChangelogEntry, ...] = ()


@dataclass(frozen=True)
class ClearanceResult:
    """One VIN's outcome of a create or delete; ``status == "error"`` carries ``description``."""

    vin: str
    status: str
    tags: Mapping[str, str]
    description: str | None = None

    @property
    def is_error(self) -> bool:
        return self.status == ClearanceStatus.ERROR


@dataclass(frozen=True)
class Eligibility:
    vin: str
    eligible: bool
    data_delivery: tuple[str, ...]
    connectivity_status: str | None = None
    primary_user_assigned: bool | None = None


@dataclass(frozen=True)
class VehicleAccessToken:
    access_token: Secret[str]
    refresh_token: Secret[str] | None
    expires_in: int | None
    scope: str
    token_type: str = "bearer"  # noqa: S105 - the OAuth token type name, not a secret
    authorization_id: str | None = None
    status: str | None = None


def parse_timestamp(value: Any) -> datetime | None:
    """ISO 8601 from HM; a time without a zone is UTC (HM omits it in changelogs)."""
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _require_str(data: Mapping[str, Any], key: str, what: str) -> str:
    value = data.get(key)
    if not isinstance(value, str):
        raise ApiError(f"HM sent a {what} without a string {key!r}", status=200)
    return value


def _optional_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _tags(value: Any) -> Mapping[str, str]:
    if not isinstance(value, dict):
        return MappingProxyType({})
    return MappingProxyType({str(k): str(v) for k, v in value.items()})


def _object(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ApiError(
            f"HM sent {type(value).__name__} where a {what} object was expected", status=200
        )
    return value


def parse_clearance(value: Any) -> Clearance:
    data = _object(value, "clearance")
    changelog = tuple(
        ChangelogEntry(
            timestamp=parse_timestamp(entry.get("timestamp")),
            status=str(entry.get("status", "")),
            reason=_optional_str(entry.get("reason")),
        )
        for entry in data.get("changelog") or ()
        if isinstance(entry, dict)
    )
    return Clearance(
        vin=_require_str(data, "vin", "clearance"),
        status=_require_str(data, "status", "clearance"),
        brand=_optional_str(data.get("brand")),
        tags=_tags(data.get("tags")),
        changelog=changelog,
    )


def parse_clearance_result(value: Any) -> ClearanceResult:
    data = _object(value, "clearance result")
    return ClearanceResult(
        vin=_require_str(data, "vin", "clearance result"),
        status=_require_str(data, "status", "clearance result"),
        tags=_tags(data.get("tags")),
        description=_optional_str(data.get("description")),
    )


def parse_eligibility(value: Any) -> Eligibility:
    data = _object(value, "eligibility")
    eligible = data.get("eligible")
    if not isinstance(eligible, bool):
        raise ApiError("HM sent an eligibility result without a boolean 'eligible'", status=200)
    delivery = data.get("data_delivery")
    primary = data.get("primary_user_assigned")
    return Eligibility(
        vin=_require_str(data, "vin", "eligibility result"),
        eligible=eligible,
        data_delivery=tuple(str(d) for d in delivery) if isinstance(delivery, list) else (),
        connectivity_status=_optional_str(data.get("connectivity_status")),
        primary_user_assigned=primary if isinstance(primary, bool) else None,
    )


def parse_vehicle_access_token(value: Any) -> VehicleAccessToken:
    data = _object(value, "access token")
    refresh = data.get("refresh_token")
    expires_in = data.get("expires_in")
    return VehicleAccessToken(
        access_token=Secret(_require_str(data, "access_token", "token response")),
        refresh_token=Secret(refresh) if isinstance(refresh, str) else None,
        expires_in=int(expires_in) if isinstance(expires_in, int | float) else None,
        scope=_optional_str(data.get("scope")) or "",
        token_type=_optional_str(data.get("token_type")) or "bearer",
        authorization_id=_optional_str(data.get("authorization_id")),
        status=_optional_str(data.get("status")),
    )
