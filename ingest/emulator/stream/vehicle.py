"""One emulated vehicle: a small physical model that yields Auto API property values.

A vehicle cycles through parked → boarding → driving → stopping → alighting → parked, and charges
when its battery runs low. While driving, speed follows a random walk, the odometer rises with
speed x time, the position moves along a city loop (:mod:`.route`) and the battery drains;
while charging the battery fills at a DC fast-charging rate. Time comes from the emulator's clock,
so values agree with the items' timestamps; every random choice comes from the vehicle's own
seeded ``random.Random``, so a seed and the same clock readings reproduce a vehicle exactly.

Property names, units and enum values are Auto API level 13 (``auto-api/capabilities/*.yml``);
``tests/emulator/test_stream_properties.py`` checks them against the bundled catalogue and, where
present, HM's YAML.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Final, Literal

from ingest.emulator.stream.route import ROUTES, Route, route

Phase = Literal["parked", "boarding", "driving", "stopping", "alighting", "charging"]
DOORS: Final = ("front_left", "front_right", "rear_right", "rear_left")

# Physics, chosen to look like a compact EV in town and on a ring road.
MAX_STEP_S: Final = 1.0  # integrate in steps of at most this much simulated time
# After a long pause (stream paused, vehicle revoked) the model jumps instead of replaying hours.
MAX_CATCH_UP_S: Final = 600.0
ACCELERATION_KMH_PER_S: Final = 3.0
BRAKING_KMH_PER_S: Final = 8.0
CONSUMPTION_KWH_PER_KM: Final = 0.18
CHARGE_POWER_KW: Final = 120.0  # DC fast charging: a few % per minute, visible in a demo
CHARGE_TAPER_FROM: Final = 0.8  # above this, power falls linearly to a quarter
CHARGE_TARGET: Final = 0.9
LOW_BATTERY: Final = 0.25  # below this a parked vehicle always charges
TOP_UP_BELOW: Final = 0.6  # below this it charges with probability TOP_UP_CHANCE
TOP_UP_CHANCE: Final = 0.3
SPEEDS_KMH: Final = (30.0, 50.0, 50.0, 70.0, 100.0, 130.0)
# Seconds each phase lasts (uniform range); driving ends by braking to a halt.
DURATION_S: Final[dict[Phase, tuple[float, float]]] = {
    "parked": (3.0, 10.0),
    "boarding": (1.5, 4.0),
    "driving": (20.0, 90.0),
    "alighting": (1.5, 4.0),
    "charging": (0.0, 0.0),  # until the battery reaches CHARGE_TARGET
    "stopping": (0.0, 0.0),  # until the speed reaches 0
}

# The order V1 messages cycle through (one property per message): moving values more often.
V1_CYCLE: Final = (
    ("diagnostics", "speed"),
    ("vehicle_location", "coordinates"),
    ("diagnostics", "odometer"),
    ("charging", "battery_level"),
    ("diagnostics", "speed"),
    ("vehicle_location", "coordinates"),
    ("vehicle_location", "heading"),
    ("ignition", "state"),
    ("diagnostics", "speed"),
    ("vehicle_location", "coordinates"),
    ("charging", "status"),
    ("doors", "positions"),
    ("doors", "locks_state"),
    ("charging", "estimated_range"),
    ("charging", "charging_rate"),
    ("charging", "plugged_in"),
)
# Every property a vehicle reports, in envelope order (V2 sends them all in one message).
PROPERTIES: Final = tuple(dict.fromkeys(V1_CYCLE))


@dataclass(frozen=True)
class Sample:
    """One property's current value(s): one for single-valued, several for ``multiple`` ones."""

    capability: str
    property: str
    values: tuple[Any, ...]
    multiple: bool = False


def _unit(value: float, unit: str, digits: int = 1) -> dict[str, Any]:
    return {"value": round(value, digits), "unit": unit}


class VehicleSim:
    def __init__(self, vin: str, rng: random.Random, now: float) -> None:
        self.vin = vin
        self._rng = rng
        self._route: Route = route(rng.randrange(len(ROUTES)))
        self.distance_km = rng.uniform(0.0, self._route.length_km)
        self.odometer_km = rng.uniform(5_000.0, 80_000.0)
        self.capacity_kwh = rng.choice((50.0, 64.0, 77.0))
        self.battery = rng.uniform(0.2, 0.95)
        self.speed_kmh = 0.0
        self.target_kmh = 0.0
        self.phase: Phase = "parked"
        self.phase_left_s = self._duration("parked")
        self.charging_status = "not_charging"
        self.updated = now

    # -- simulation -----------------------------------------------------------------------------

    def _duration(self, phase: Phase) -> float:
        low, high = DURATION_S[phase]
        return self._rng.uniform(low, high)

    def _enter(self, phase: Phase) -> None:
        self.phase = phase
        self.phase_left_s = self._duration(phase)
        if phase == "charging":
            self.charging_status = "charging"
        elif phase == "boarding":
            self.charging_status = "not_charging"
        elif phase == "driving":
            self.target_kmh = self._rng.choice(SPEEDS_KMH)

    def advance(self, now: float) -> None:
        """Move the simulation to ``now`` (a clock that went backwards changes nothing)."""
        left = min(MAX_CATCH_UP_S, max(0.0, now - self.updated))
        self.updated = max(self.updated, now)
        while left > 0:
            step = min(left, MAX_STEP_S)
            self._step(step)
            left -= step

    def _step(self, dt: float) -> None:
        self.phase_left_s -= dt
        if self.phase in ("driving", "stopping"):
            self._drive(dt)
        elif self.phase == "charging":
            self._charge(dt)
        elif self.phase_left_s <= 0:
            self._next_phase()

    def _drive(self, dt: float) -> None:
        if self.phase == "driving" and self.phase_left_s <= 0:
            self.phase, self.target_kmh = "stopping", 0.0
        elif self.phase == "driving" and self._rng.random() < dt / 10:
            self.target_kmh = self._rng.choice(SPEEDS_KMH)  # a new speed limit every ~10 s
        if self.speed_kmh < self.target_kmh:
            self.speed_kmh = min(self.target_kmh, self.speed_kmh + ACCELERATION_KMH_PER_S * dt)
        else:
            self.speed_kmh = max(self.target_kmh, self.speed_kmh - BRAKING_KMH_PER_S * dt)
        km = self.speed_kmh * dt / 3600.0
        self.odometer_km += km
        self.distance_km += km
        self.battery = max(0.0, self.battery - km * CONSUMPTION_KWH_PER_KM / self.capacity_kwh)
        if self.phase == "stopping" and self.speed_kmh == 0.0:
            self._enter("alighting")

    def charging_power_kw(self) -> float:
        if self.phase != "charging" or self.charging_status != "charging":
            return 0.0
        if self.battery <= CHARGE_TAPER_FROM:
            return CHARGE_POWER_KW
        share = (self.battery - CHARGE_TAPER_FROM) / (1.0 - CHARGE_TAPER_FROM)
        return CHARGE_POWER_KW * (1.0 - 0.75 * share)

    def _charge(self, dt: float) -> None:
        if self.charging_status == "charging":
            kwh = self.charging_power_kw() * dt / 3600.0
            self.battery = min(1.0, self.battery + kwh / self.capacity_kwh)
            if self.battery >= CHARGE_TARGET:
                self.charging_status = "charging_complete"
                self.phase_left_s = self._duration("parked")
        elif self.phase_left_s <= 0:
            self._enter("boarding")

    def _next_phase(self) -> None:
        if self.phase == "parked":
            top_up = self.battery < TOP_UP_BELOW and self._rng.random() < TOP_UP_CHANCE
            self._enter("charging" if self.battery < LOW_BATTERY or top_up else "boarding")
        elif self.phase == "boarding":
            self._enter("driving")
        elif self.phase == "alighting":
            self._enter("parked")

    # -- what the vehicle reports -----------------------------------------------------------------

    @property
    def ignition(self) -> str:
        return {
            "parked": "lock",
            "charging": "lock",
            "boarding": "accessory",
            "alighting": "off",
        }.get(self.phase, "on")

    @property
    def locked(self) -> bool:
        return self.phase in ("parked", "charging", "driving", "stopping")

    def door_positions(self) -> tuple[dict[str, str], ...]:
        # The driver's door stands open while getting in or out.
        open_door = self.phase in ("boarding", "alighting")
        return tuple(
            {
                "location": door,
                "position": "open" if open_door and door == "front_left" else "closed",
            }
            for door in DOORS
        )

    def sample(self, capability: str, prop: str) -> Sample:
        """The current value of one property of :data:`PROPERTIES`."""
        if (capability, prop) == ("doors", "positions"):
            return Sample(capability, prop, self.door_positions(), multiple=True)
        return Sample(capability, prop, (self._value(capability, prop),))

    def _value(self, capability: str, prop: str) -> Any:
        match capability, prop:
            case "diagnostics", "speed":
                return _unit(self.speed_kmh, "kilometers_per_hour")
            case "diagnostics", "odometer":
                return _unit(self.odometer_km, "kilometers", 2)
            case "vehicle_location", "coordinates":
                position = self._route.at(self.distance_km)
                return {
                    "latitude": round(position.latitude, 6),
                    "longitude": round(position.longitude, 6),
                }
            case "vehicle_location", "heading":
                return _unit(self._route.at(self.distance_km).heading_deg, "degrees")
            case "charging", "battery_level":
                return round(self.battery, 4)
            case "charging", "status":
                return self.charging_status
            case "charging", "estimated_range":
                km = self.battery * self.capacity_kwh / CONSUMPTION_KWH_PER_KM
                return _unit(km, "kilometers", 0)
            case "charging", "charging_rate":
                return _unit(self.charging_power_kw(), "kilowatts")
            case "charging", "plugged_in":
                return "plugged_in" if self.phase == "charging" else "disconnected"
            case "ignition", "state":
                return self.ignition
            case "doors", "locks_state":
                return "locked" if self.locked else "unlocked"
        raise KeyError(f"{capability}.{prop} is not a property this vehicle reports")

    def samples(self) -> list[Sample]:
        return [self.sample(c, p) for c, p in PROPERTIES]
