"""Realistic Auto API test traffic: V1 per-property messages and V2 envelopes, each with a unique
``message_id``, so tests and benchmarks can account for every message they publish."""

from __future__ import annotations

import datetime as dt
import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass

import orjson

VIN_ALPHABET = "ABCDEFGHJKLMNPRSTUVWXYZ0123456789"
ENVIRONMENT = "live"
LEVEL = "level13"


def make_vin(index: int) -> str:
    """A deterministic, valid-looking 17-character VIN for test vehicle ``index``."""
    digits = []
    value = index
    for _ in range(9):
        value, remainder = divmod(value, len(VIN_ALPHABET))
        digits.append(VIN_ALPHABET[remainder])
    return "WHMTESTV" + "".join(reversed(digits))


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    payload: bytes
    message_id: str
    vin: str
    items: int  # telemetry rows this message should produce (0 for an invalid one)


def _timestamp(base: dt.datetime, seconds: float) -> str:
    return (base + dt.timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def v1_message(app_id: str, vin: str, message_id: str, seq: int, base: dt.datetime) -> Message:
    """A V1 odometer, speed, ignition or position message (one property per message)."""
    kind = seq % 4
    capability, prop, value = [
        ("diagnostics", "odometer", {"value": 1000.0 + seq * 0.1, "unit": "kilometers"}),
        ("diagnostics", "speed", {"value": float(seq % 130), "unit": "kilometers_per_hour"}),
        ("ignition", "status", "on" if seq % 2 else "off"),
        (
            "vehicle_location",
            "coordinates",
            {"latitude": 52.52 + seq * 1e-5, "longitude": 13.405 + seq * 1e-5},
        ),
    ][kind]
    payload = {
        "version": 1,
        "message_id": message_id,
        "vin": vin,
        "capability": capability,
        "property": prop,
        "data": {capability: {prop: {"data": value, "timestamp": _timestamp(base, seq)}}},
    }
    topic = f"{ENVIRONMENT}/{LEVEL}/{app_id}/{vin}/{capability}/get/{prop}"
    return Message(topic, orjson.dumps(payload), message_id, vin, 1)


def v2_message(app_id: str, vin: str, message_id: str, seq: int, base: dt.datetime) -> Message:
    """A V2 envelope with four properties, one of them a failure item."""
    stamp = _timestamp(base, seq)
    data = {
        "diagnostics": {
            "odometer": [
                {"data": {"value": 2000.0 + seq, "unit": "kilometers"}, "timestamp": stamp}
            ],
            "speed": [{"data": {"value": 42.0, "unit": "kilometers_per_hour"}, "timestamp": stamp}],
        },
        "charging": {
            "battery_level": [{"data": (seq % 100) / 100, "timestamp": stamp}],
            "charging_rate": [
                {"failure": {"reason": "unknown", "description": "no data"}, "timestamp": stamp}
            ],
        },
    }
    payload = {
        "version": 2,
        "application_id": app_id,
        "message_id": message_id,
        "vin": vin,
        "data": data,
    }
    return Message(f"{ENVIRONMENT}/{LEVEL}/{app_id}", orjson.dumps(payload), message_id, vin, 4)


def invalid_message(app_id: str, vin: str, message_id: str, seq: int) -> Message:
    """A message the decoder must quarantine (cycling through several kinds of damage)."""
    topic = f"{ENVIRONMENT}/{LEVEL}/{app_id}/{vin}/diagnostics/get/odometer"
    kind = seq % 3
    if kind == 0:
        payload = b'{"version": 1, "message_id": "' + message_id.encode() + b'", "vin": '
    elif kind == 1:
        other = make_vin(10**6 + seq)
        payload = orjson.dumps(
            {
                "version": 1,
                "message_id": message_id,
                "vin": other,
                "data": {"diagnostics": {"odometer": {"data": {"value": 1, "unit": "meters"}}}},
            }
        )
    else:
        payload = orjson.dumps({"version": 7, "message_id": message_id, "vin": vin, "data": {}})
    return Message(topic, payload, message_id, vin, 0)


def stream(
    app_id: str,
    count: int,
    *,
    vehicles: int = 50,
    v2_fraction: float = 0.2,
    invalid_fraction: float = 0.0,
    seed: int = 7,
    prefix: str = "m",
    base: dt.datetime | None = None,
    random_ids: bool = False,
) -> Iterator[Message]:
    """``count`` messages across ``vehicles`` VINs, each with a unique message id.

    Ids are ``<prefix>-<seq>`` (in order, so tests can read the sequence number back), or with
    ``random_ids`` 32 upper-case hex digits in no order, as HM's look: the dedupe index files
    ids in order of their value, and ids in sequence would all land at its end, which costs a
    fraction of what a stream of real ids does (see README, The dedupe index as it grows).
    """
    rng = random.Random(seed)  # noqa: S311 (reproducible test data, not cryptography)
    base = base or dt.datetime(2026, 11, 28, tzinfo=dt.UTC)
    for seq in range(count):
        vin = make_vin(rng.randrange(vehicles))
        message_id = f"{prefix}-{seq:09d}"
        if random_ids:
            message_id = hashlib.blake2b(message_id.encode(), digest_size=16).hexdigest().upper()
        roll = rng.random()
        if roll < invalid_fraction:
            yield invalid_message(app_id, vin, message_id, seq)
        elif roll < invalid_fraction + v2_fraction:
            yield v2_message(app_id, vin, message_id, seq, base)
        else:
            yield v1_message(app_id, vin, message_id, seq, base)
