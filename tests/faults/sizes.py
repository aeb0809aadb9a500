"""How big each scenario runs: CI (the pytest suite) and full (``report --full``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sizes:
    kills: int
    broker_kills: int
    network_rounds: int
    disk_messages: int
    torn_messages: int
    hostile_count: int
    hostile_big: int


CI = Sizes(
    kills=10,
    broker_kills=2,
    network_rounds=1,
    disk_messages=6000,
    torn_messages=4000,
    hostile_count=300,
    hostile_big=4,
)
FULL = Sizes(
    kills=20,
    broker_kills=5,
    network_rounds=3,
    disk_messages=20000,
    torn_messages=10000,
    hostile_count=3000,
    hostile_big=20,
)
