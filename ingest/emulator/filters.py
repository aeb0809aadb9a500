"""The ``filter`` query parameter of ``GET /v1/fleets/vehicles``.

It is URL-encoded JSON mapping a field to ``{"operator", "value"}``; several fields must all match.
Fields and operators follow the examples in HM's fleet clearance spec: ``vin``, ``status``,
``brand`` with ``eq``/``in``; ``tags`` with ``eq``/``contains``; ``approved_at`` and
``inserted_at`` with ``eq``/``lt``/``gt``/``lte``/``gte`` against an ISO 8601 time.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Callable
from datetime import datetime
from typing import Any

from ingest.emulator.state import Vehicle

_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "eq": operator.eq,
    "lt": operator.lt,
    "gt": operator.gt,
    "lte": operator.le,
    "gte": operator.ge,
}


_TIME_OPS = frozenset(_COMPARE)
_ALLOWED: dict[str, frozenset[str]] = {
    "vin": frozenset({"eq", "in"}),
    "status": frozenset({"eq", "in"}),
    "brand": frozenset({"eq", "in"}),
    "tags": frozenset({"eq", "contains"}),
    "approved_at": _TIME_OPS,
    "inserted_at": _TIME_OPS,
}


class FilterError(ValueError):
    pass


def _time(value: Any) -> float:
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError as exc:
        raise FilterError(f"{value!r} is not an ISO 8601 time") from exc


def _field_time(v: Vehicle, name: str) -> float | None:
    if name == "inserted_at":
        return v.changelog[0]["at"] if v.changelog else None
    approved = [e["at"] for e in v.changelog if e["status"] == "approved"]
    return approved[-1] if approved else None


def _matches(v: Vehicle, name: str, op: str, value: Any) -> bool:
    if name in ("vin", "status", "brand"):
        actual = getattr(v, name)
        if op == "eq":
            return bool(actual == value)
        if op == "in" and isinstance(value, list):
            return actual in value
    elif name == "tags" and isinstance(value, dict):
        if op == "eq":
            return v.tags == value
        if op == "contains":
            return all(v.tags.get(k) == val for k, val in value.items())
    elif name in ("approved_at", "inserted_at") and op in _COMPARE:
        at = _field_time(v, name)
        return at is not None and _COMPARE[op](at, _time(value))
    raise FilterError(f"unsupported filter: {name} {op} {value!r}")


def parse_filter(raw: str | None) -> Callable[[Vehicle], bool]:
    """A predicate for ``raw`` (already URL-decoded); raises :class:`FilterError`."""
    if not raw:
        return lambda _v: True
    try:
        spec = json.loads(raw)
    except ValueError as exc:
        raise FilterError("filter is not valid JSON") from exc
    if not isinstance(spec, dict):
        raise FilterError("filter must be a JSON object")
    clauses = []
    for name, cond in spec.items():
        if not isinstance(cond, dict) or "operator" not in cond or "value" not in cond:
            raise FilterError(f"filter {name} needs operator and value")
        op = str(cond["operator"])
        if op not in _ALLOWED.get(name, frozenset()):
            raise FilterError(f"unsupported filter: {name} {op}")
        if name.endswith("_at"):
            _time(cond["value"])  # reject a bad time even when the fleet is empty
        clauses.append((name, op, cond["value"]))
    return lambda v: all(_matches(v, n, o, val) for n, o, val in clauses)
