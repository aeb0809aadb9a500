"""Closed driving loops through real streets, and positions along them.

Waypoints are (latitude, longitude) in degrees. Distances use the equirectangular approximation,
good to well under 1 % over a few kilometres, which is all a demo route needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

EARTH_RADIUS_KM = 6371.0

# A few city loops, each a closed ring (the last point leads back to the first).
ROUTES: tuple[tuple[tuple[float, float], ...], ...] = (
    # Berlin: Brandenburger Tor, Unter den Linden, Alexanderplatz, Potsdamer Platz
    ((52.5163, 13.3777), (52.5170, 13.3889), (52.5192, 13.4061), (52.5219, 13.4132),
     (52.5130, 13.4070), (52.5096, 13.3760), (52.5145, 13.3501)),
    # Munich: Marienplatz, Odeonsplatz, Englischer Garten, Isartor, Sendlinger Tor
    ((48.1374, 11.5755), (48.1422, 11.5775), (48.1528, 11.5920), (48.1351, 11.5823),
     (48.1340, 11.5671), (48.1395, 11.5601)),
    # Stuttgart: Schlossplatz, Hauptbahnhof, Killesberg, Feuersee
    ((48.7784, 9.1800), (48.7840, 9.1816), (48.8020, 9.1680), (48.7730, 9.1640),
     (48.7700, 9.1750)),
)  # fmt: skip


def _distance_km(a: tuple[float, float], b: tuple[float, float]) -> float:
    lat = math.radians((a[0] + b[0]) / 2)
    dx = math.radians(b[1] - a[1]) * math.cos(lat)
    dy = math.radians(b[0] - a[0])
    return EARTH_RADIUS_KM * math.hypot(dx, dy)


def _bearing_deg(a: tuple[float, float], b: tuple[float, float]) -> float:
    lat = math.radians((a[0] + b[0]) / 2)
    dx = math.radians(b[1] - a[1]) * math.cos(lat)
    dy = math.radians(b[0] - a[0])
    return math.degrees(math.atan2(dx, dy)) % 360.0


@dataclass(frozen=True)
class Position:
    latitude: float
    longitude: float
    heading_deg: float


class Route:
    """One closed loop; ``at(distance_km)`` wraps around it."""

    def __init__(self, points: tuple[tuple[float, float], ...]) -> None:
        self._points = points
        self._legs = [(points[i], points[(i + 1) % len(points)]) for i in range(len(points))]
        self._lengths = [_distance_km(a, b) for a, b in self._legs]
        self.length_km = sum(self._lengths)

    def at(self, distance_km: float) -> Position:
        remaining = distance_km % self.length_km
        for (a, b), length in zip(self._legs, self._lengths, strict=True):
            if remaining <= length:
                f = remaining / length if length else 0.0
                return Position(
                    a[0] + (b[0] - a[0]) * f, a[1] + (b[1] - a[1]) * f, _bearing_deg(a, b)
                )
            remaining -= length
        a, b = self._legs[-1]
        return Position(b[0], b[1], _bearing_deg(a, b))


def route(index: int) -> Route:
    return Route(ROUTES[index % len(ROUTES)])
