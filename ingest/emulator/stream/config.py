"""Settings of the vehicle stream: where to publish, in which format, how fast, how dirty.

Rates are probabilities per published MQTT message. ``rate`` (messages/s for the whole fleet) and
``vehicle_rate`` (messages/s per streaming vehicle) are alternatives: set exactly one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

StreamFormat = Literal["v1", "v2", "both"]
FORMATS: tuple[StreamFormat, ...] = ("v1", "v2", "both")
ENVIRONMENTS = ("live", "sandbox")

DEFAULT_RATE = 20.0  # messages/s for the whole fleet: readable progress, trivial load
DEFAULT_DUPLICATE_RATE = 0.02
DEFAULT_BAD_RATE = 0.01
# Off by default: invalid JSON already makes up a fifth of the bad messages; this knob adds more
# of it on its own (see messages.MALFORMED_KINDS) without changing a seeded stream that leaves it 0.
DEFAULT_MALFORMED_RATE = 0.0
# Share of property items sent as a `failure` instead of data (HM does this for e.g. rate limits).
DEFAULT_FAILURE_RATE = 0.02


@dataclass(frozen=True)
class BrokerTarget:
    """The MQTT broker the stream publishes to, and the client certificate it presents."""

    host: str
    port: int
    ca_file: Path
    cert_file: Path
    key_file: Path
    client_id: str
    # Off only where the broker's certificate cannot name the host the stream dials (the compose
    # stack's throwaway certificates name localhost, not `mosquitto`); the chain is still checked.
    verify_hostname: bool = True


@dataclass(frozen=True)
class StreamSettings:
    """What the stream sends; every field can be changed at runtime by ``PUT /_emulator/stream``
    except ``app_id``, ``environment`` and ``seed``."""

    app_id: str
    format: StreamFormat = "both"
    rate: float | None = DEFAULT_RATE
    vehicle_rate: float | None = None
    duplicate_rate: float = DEFAULT_DUPLICATE_RATE
    bad_rate: float = DEFAULT_BAD_RATE
    malformed_rate: float = DEFAULT_MALFORMED_RATE
    failure_rate: float = DEFAULT_FAILURE_RATE
    seed: int = 0
    environment: str = "live"
    paused: bool = False
    # Extra VINs cleared (approved at once) at start-up, so the stream runs without a client
    # driving clearance: load tests set a fleet size this way.
    vehicles: int = 0

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(problems))

    def problems(self) -> list[str]:
        found = []
        if not self.app_id:
            found.append("app_id must be set (the HM application id the daemon subscribes to)")
        if self.format not in FORMATS:
            found.append(f"format must be one of {', '.join(FORMATS)}, not {self.format!r}")
        if (self.rate is None) == (self.vehicle_rate is None):
            found.append("set exactly one of rate (whole fleet) and vehicle_rate (per vehicle)")
        for name in ("rate", "vehicle_rate"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                found.append(f"{name} must be > 0 messages/s, not {value}")
        for name in ("duplicate_rate", "bad_rate", "malformed_rate", "failure_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                found.append(f"{name} is a probability between 0 and 1, not {value}")
        if self.duplicate_rate + self.bad_rate + self.malformed_rate > 1.0:
            found.append("duplicate_rate + bad_rate + malformed_rate cannot exceed 1")
        if self.environment not in ENVIRONMENTS:
            found.append(f"environment must be one of {', '.join(ENVIRONMENTS)}")
        if self.vehicles < 0:
            found.append("vehicles cannot be negative")
        return found

    def messages_per_s(self, streaming: int) -> float:
        """Total publish rate while ``streaming`` vehicles are approved."""
        if streaming == 0:
            return 0.0
        if self.vehicle_rate is not None:
            return self.vehicle_rate * streaming
        assert self.rate is not None
        return self.rate

    def to_json(self) -> dict[str, Any]:
        return {
            "app_id": self.app_id,
            "environment": self.environment,
            "format": self.format,
            "rate": self.rate,
            "vehicle_rate": self.vehicle_rate,
            "duplicate_rate": self.duplicate_rate,
            "bad_rate": self.bad_rate,
            "malformed_rate": self.malformed_rate,
            "failure_rate": self.failure_rate,
            "seed": self.seed,
            "paused": self.paused,
            "vehicles": self.vehicles,
        }


# Fields PUT /_emulator/stream may change, with the JSON types each accepts.
MUTABLE: dict[str, tuple[type, ...]] = {
    "format": (str,),
    "rate": (int, float, type(None)),
    "vehicle_rate": (int, float, type(None)),
    "duplicate_rate": (int, float),
    "bad_rate": (int, float),
    "malformed_rate": (int, float),
    "failure_rate": (int, float),
    "paused": (bool,),
}


@dataclass(frozen=True)
class StreamConfig:
    """A stream to run: what to send and where."""

    settings: StreamSettings
    broker: BrokerTarget
