"""Decoder throughput on typical HM payloads: prints messages/s and rows/s (not a test).

Run from the repository root: ``python -m bench.decode_bench [--seconds 2]``.
Target (see ingest/decode.py): at least 60,000 typical V1 messages/s on one core.
"""

from __future__ import annotations

import argparse
import time

import orjson

from ingest.decode import Decoder

APP_ID = "48aa1779-91c2-468e-97e9-ab112efd53b9"
VIN = "WVWZZZ1JZ3W386752"
TS = "2022-01-18T13:32:13.648943Z"


def stamp(i: int) -> str:
    """A timestamp of its own per message, as a stream has: the items of one message share it."""
    return f"2022-01-18T13:{i // 60_000 % 60:02d}:{i // 1000 % 60:02d}.{i % 1000:03d}943Z"


def v1_messages(count: int) -> list[tuple[str, bytes]]:
    """A realistic mix: unit values, enums, booleans, coordinates, a multi-item list."""
    shapes: list[tuple[str, str, object]] = [
        ("diagnostics", "odometer", {"data": {"unit": "kilometers", "value": 8050.4}}),
        ("diagnostics", "speed", {"data": {"unit": "kilometers_per_hour", "value": 42}}),
        ("diagnostics", "fuel_level", {"data": 0.62}),
        ("ignition", "status", {"data": "on"}),
        ("charging", "plugged_in", {"data": "disconnected"}),
        ("vehicle_location", "coordinates", {"data": {"latitude": 52.5, "longitude": 13.4}}),
        ("doors", "locks_state", {"data": "locked"}),
        ("race", "brake_pedal_switch_active", {"data": True}),
        (
            "diagnostics",
            "tire_pressures",
            [
                {"data": {"location": loc, "pressure": {"unit": "bars", "value": 2.4}}}
                for loc in ("front_left", "front_right", "rear_left", "rear_right")
            ],
        ),
    ]
    messages = []
    for i in range(count):
        capability, prop, item = shapes[i % len(shapes)]
        if isinstance(item, list):
            value: object = [{**it, "timestamp": stamp(i)} for it in item]
        else:
            value = {**item, "timestamp": stamp(i)}  # type: ignore[dict-item]
        payload = {
            "version": 1,
            "message_id": f"{i:064X}",
            "vin": VIN,
            "capability": capability,
            "property": prop,
            "data": {capability: {prop: value}},
        }
        topic = f"live/level13/{APP_ID}/{VIN}/{capability}/get/{prop}"
        messages.append((topic, orjson.dumps(payload)))
    return messages


def v2_messages(count: int) -> list[tuple[str, bytes]]:
    """Envelopes of about 10 properties each, as a car reports a snapshot."""
    data = {
        "diagnostics": {
            "odometer": [{"data": {"unit": "kilometers", "value": 2050}, "timestamp": TS}],
            "speed": [{"data": {"unit": "kilometers_per_hour", "value": 42}, "timestamp": TS}],
            "fuel_level": [{"data": 0.5, "timestamp": TS}],
        },
        "race": {"vehicle_moving": [{"data": "moving", "timestamp": TS}]},
        "vehicle_location": {
            "coordinates": [{"data": {"latitude": 52.5, "longitude": 13.4}, "timestamp": TS}],
            "heading": [{"data": {"unit": "degrees", "value": 12.5}, "timestamp": TS}],
        },
        "charging": {
            "battery_level": [{"data": 0.8, "timestamp": TS}],
            "status": [{"failure": {"reason": "unknown", "description": "no data"}}],
        },
        "doors": {"locks_state": [{"data": "locked", "timestamp": TS}]},
        "ignition": {"status": [{"data": "off", "timestamp": TS}]},
    }
    topic = f"live/level13/{APP_ID}"
    return [
        (
            topic,
            orjson.dumps(
                {
                    "version": 2,
                    "application_id": APP_ID,
                    "message_id": f"{i:032X}",
                    "vin": VIN,
                    "data": data,
                }
            ).replace(TS.encode(), stamp(i).encode()),
        )
        for i in range(count)
    ]


def run(name: str, messages: list[tuple[str, bytes]], seconds: float) -> None:
    decoder = Decoder(app_id=APP_ID)
    decode = decoder.decode
    done = rows = 0
    received = time.time_ns() // 1000
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        for topic, payload in messages:
            result = decode(topic, payload, received)
            if result.rejection is not None:
                raise SystemExit(f"{name}: unexpected rejection {result.rejection}")
            rows += len(result.rows)
        done += len(messages)
    elapsed = time.perf_counter() - start
    print(
        f"{name}: {done / elapsed:>10,.0f} messages/s  {rows / elapsed:>10,.0f} rows/s  "
        f"({done:,} messages, {sum(len(p) for _, p in messages) / len(messages):.0f} B avg)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=2.0, help="time per payload kind")
    args = parser.parse_args()
    run("V1", v1_messages(9_000), args.seconds)
    run("V2", v2_messages(1_000), args.seconds)


if __name__ == "__main__":
    main()
