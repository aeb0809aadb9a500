"""Local checks on VINs and brands, so a typo is refused here rather than sent to HM.

HM reports a bad VIN only as an item-level ``error`` inside a 200 answer; checking first gives
the operator one clear message naming the value and, for brands, the closest valid spelling.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

from ingest.errors import IngestError

# ISO 3779: 17 characters, digits and capitals except I, O and Q (mistakable for 1 and 0).
VIN_PATTERN = re.compile(r"[A-HJ-NPR-Z0-9]{17}")
VIN_LENGTH = 17

# Exact strings HM accepts (reference §3; the clearance spec's enum plus seat/cupra/vauxhall).
BRANDS: frozenset[str] = frozenset(
    {
        "alfaromeo", "audi", "bmw", "citroen", "cupra", "dacia", "ds", "fiat", "ford", "jeep",
        "kia", "lexus", "maserati", "mercedes-benz", "mini", "nissan", "opel", "peugeot",
        "polestar", "porsche", "renault", "seat", "skoda", "tesla", "toyota", "vauxhall",
        "volkswagen", "volvo-cars", "sandbox",
    }
)  # fmt: skip
# Show at most this many problems in one message; the rest are counted.
_MAX_LISTED = 10


class InvalidVehicleError(IngestError, ValueError):
    """A VIN or brand that HM would refuse. ``problems`` lists each one found."""

    def __init__(self, problems: list[str]) -> None:
        shown = problems[:_MAX_LISTED]
        more = len(problems) - len(shown)
        message = "; ".join(shown) + (f"; and {more} more" if more > 0 else "")
        super().__init__(message)
        self.problems = tuple(problems)


def vin_problem(vin: object) -> str | None:
    """Why ``vin`` is not a valid VIN, or ``None`` if it is."""
    if not isinstance(vin, str):
        return f"VIN {vin!r} is not a string"
    if VIN_PATTERN.fullmatch(vin):
        return None
    if len(vin) != VIN_LENGTH:
        return f"VIN {vin!r} has {len(vin)} characters; a VIN has {VIN_LENGTH}"
    if VIN_PATTERN.fullmatch(vin.upper()):
        return f"VIN {vin!r} has lower-case letters; write it as {vin.upper()!r}"
    bad = sorted({c for c in vin if not VIN_PATTERN.fullmatch(c * VIN_LENGTH)})
    listed = ", ".join(repr(c) for c in bad)
    return f"VIN {vin!r} contains {listed}; a VIN holds digits and capitals except I, O, Q"


def brand_problem(brand: object) -> str | None:
    """Why ``brand`` is not one of HM's brand strings, or ``None`` if it is."""
    if not isinstance(brand, str):
        return f"brand {brand!r} is not a string"
    if brand in BRANDS:
        return None
    suggestion = suggest_brand(brand)
    hint = (
        f"; did you mean {suggestion!r}?" if suggestion else f"; valid: {', '.join(sorted(BRANDS))}"
    )
    return f"brand {brand!r} is not one HM accepts{hint}"


def suggest_brand(brand: str) -> str | None:
    # Normalise the usual variants first ("Mercedes Benz", "volvo_cars", "Alfa Romeo").
    folded = re.sub(r"[\s_]+", "-", brand.strip().lower())
    for candidate in (folded, folded.replace("-", "")):
        if candidate in BRANDS:
            return candidate
    matches = difflib.get_close_matches(folded, BRANDS, n=1, cutoff=0.6)
    return matches[0] if matches else None


def validate_vin(vin: str) -> str:
    problem = vin_problem(vin)
    if problem:
        raise InvalidVehicleError([problem])
    return vin


def validate_vehicle(vin: str, brand: str) -> None:
    """Raise :class:`InvalidVehicleError` naming the bad VIN and/or brand."""
    validate_vehicles([(vin, brand)])


def validate_vehicles(vehicles: Iterable[tuple[str, str]]) -> None:
    """Check every (vin, brand) pair and report all problems at once."""
    problems: list[str] = []
    for vin, brand in vehicles:
        problems.extend(p for p in (vin_problem(vin), brand_problem(brand)) if p)
    if problems:
        raise InvalidVehicleError(problems)
