"""Fixed vocabularies the emulator checks requests against: brands, statuses, VIN syntax.

Brand lists follow HM's fleet clearance and eligibility OpenAPI enums. Where the project's reference
notes disagree with the official spec, the spec wins:

* ``nissan`` appears in the reference notes' brand list but not in the fleet clearance spec's
  ``brand`` enum, so the emulator treats it as an unknown brand.
* The eligibility spec accepts a narrower set of brands than fleet clearance.
"""

from __future__ import annotations

import re
from typing import Final, Literal

FLEET_BRANDS: Final = frozenset(
    {
        "alfaromeo", "audi", "bmw", "citroen", "cupra", "dacia", "ds", "fiat", "ford", "jeep",
        "kia", "lexus", "maserati", "mercedes-benz", "mini", "opel", "peugeot", "polestar",
        "porsche", "renault", "seat", "skoda", "tesla", "toyota", "vauxhall", "volkswagen",
        "volvo-cars", "sandbox",
    }
)  # fmt: skip

ELIGIBILITY_BRANDS: Final = frozenset(
    {
        "mercedes-benz", "ford", "bmw", "mini", "citroen", "peugeot", "opel", "vauxhall", "ds",
        "jeep", "fiat", "alfaromeo", "renault", "toyota", "lexus", "volvo-cars", "sandbox",
    }
)  # fmt: skip

# HM supports cancelling a pending clearance only for Mercedes-Benz, the VW group brands named in
# the DELETE description and the Stellantis brands. ``sandbox`` is added so tests can cancel.
STELLANTIS_BRANDS: Final = frozenset(
    {"alfaromeo", "citroen", "ds", "fiat", "jeep", "maserati", "opel", "peugeot", "vauxhall"}
)
CANCELLABLE_BRANDS: Final = (
    frozenset({"mercedes-benz", "volkswagen", "audi", "skoda", "seat", "cupra", "sandbox"})
    | STELLANTIS_BRANDS
)

Status = Literal["pending", "approved", "rejected", "revoking", "revoked", "canceling", "canceled"]
STATUSES: Final[tuple[Status, ...]] = (
    "pending", "approved", "rejected", "revoking", "revoked", "canceling", "canceled",
)  # fmt: skip
# Statuses from which nothing further happens on its own; a new POST starts a fresh clearance.
TERMINAL: Final = frozenset({"rejected", "revoked", "canceled"})
IN_TRANSITION: Final = frozenset({"revoking", "canceling"})

VIN_LENGTH: Final = 17
# ISO 3779: 17 characters, digits and capital letters except I, O and Q (confusable with 1 and 0).
_VIN_RE: Final = re.compile(r"[A-HJ-NPR-Z0-9]{17}")


def vin_problem(vin: object) -> str | None:
    """Why ``vin`` is not a valid VIN, or ``None``; wording follows HM's item-level errors."""
    if not isinstance(vin, str) or not vin:
        return "vin can't be blank"
    if len(vin) != VIN_LENGTH:
        return f"vin should be {VIN_LENGTH} character(s)"
    if not _VIN_RE.fullmatch(vin):
        return "vin has invalid characters (only 0-9 and A-Z except I, O and Q are allowed)"
    return None
