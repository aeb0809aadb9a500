"""The demo's sample fleet: a CSV the daemon's fleet control reads (``ingest.fleet.desired``).

Every fourth VIN ends in ``R``, which the emulator's default outcome rule
(``*R=rejected:vehicle_not_supported``) rejects; the others are approved.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

BRANDS = ("bmw", "mercedes-benz", "volkswagen", "renault", "peugeot", "volvo-cars")
DEPOTS = ("berlin", "munich", "stuttgart")
REJECT_EVERY = 4
VIN_PREFIX = "HMFLEET"  # + 9 digits + one character: 17, without I, O or Q


@dataclass(frozen=True)
class FleetVehicle:
    vin: str
    brand: str
    depot: str

    @property
    def expect_rejected(self) -> bool:
        return self.vin.endswith("R")


def sample_fleet(size: int) -> list[FleetVehicle]:
    vehicles = []
    for index in range(size):
        last = "R" if index % REJECT_EVERY == REJECT_EVERY - 1 else "A"
        vehicles.append(
            FleetVehicle(
                f"{VIN_PREFIX}{index:09d}{last}",
                BRANDS[index % len(BRANDS)],
                DEPOTS[index % len(DEPOTS)],
            )
        )
    return vehicles


def write_fleet(path: Path, vehicles: list[FleetVehicle]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["vin", "brand", "depot"])
        writer.writerows([v.vin, v.brand, v.depot] for v in vehicles)
    return path
