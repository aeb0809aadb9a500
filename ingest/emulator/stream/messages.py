"""HM's MQTT messages, built from a vehicle's samples: V1 per property, V2 envelopes, bad ones.

Shapes follow hm-reference.md section 5 (and ``ingest/topics.py``): a V1 message carries one
property on ``{env}/level13/{app_id}/{vin}/{capability}/get/{property}``; a V2 envelope carries
``{capability: {property: [items]}}`` on ``{env}/level13/{app_id}``. An item is
``{"data": value, "timestamp": ISO-8601}`` or, when the vehicle could not deliver the value,
``{"failure": {"reason", "description"}, "timestamp"}``.

Bad messages are damaged on purpose, each in a way the decoder quarantines with a known reason
(:data:`BAD_KINDS`), so a demo can show the quarantine and check its count. Malformed ones
(:data:`MALFORMED_KINDS`) are not JSON at all, yet keep their ``"message_id": "..."`` intact in
the raw bytes, so an accounting that reads ids from raw payloads
(``ingest.testing.accounting.payload_message_id``) still finds every one of them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Final, Literal

import orjson

from ingest.emulator.stream.vehicle import Sample
from ingest.topics import v1_topic, v2_topic

Kind = Literal["message", "duplicate", "bad"]

# Failure reasons from the Auto API's ``failure`` type (misc/custom_types.yml), with the kind of
# description an OEM backend sends along.
FAILURES: Final = (
    ("unknown", "value not available from the vehicle"),
    ("rate_limit", "too many requests to the OEM backend"),
    ("execution_timeout", "the vehicle did not answer in time"),
    ("oem_error", "OEM backend error"),
    ("privacy_mode_active", "the driver switched on privacy mode"),
)
# Damage → the decoder's reason code (ingest/decode.py) for that damage.
BAD_KINDS: Final = {
    "truncated_json": "invalid_json",
    "vin_mismatch": "vin_mismatch",
    "unsupported_version": "unsupported_version",
    "bad_timestamp": "malformed_item",
    "missing_data": "missing_field",
}
_BAD_KIND_NAMES: Final = tuple(BAD_KINDS)
# Not-JSON damage (``malformed_rate``) → the decoder's reason code for it.
MALFORMED_KINDS: Final = {
    "json_cut": "invalid_json",  # cut short anywhere after the message id: a lost tail
    "json_trailing_garbage": "invalid_json",  # a second closing brace after the object
    "json_nan": "invalid_json",  # a NaN literal, which JSON does not have
    "json_invalid_utf8": "invalid_utf8",  # a byte that is not UTF-8 inside a string
}
_MALFORMED_KIND_NAMES: Final = tuple(MALFORMED_KINDS)


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One MQTT publish, with what the daemon should make of it."""

    topic: str
    payload: bytes
    vin: str
    message_id: str
    kind: Kind
    version: int
    items: int = 0  # telemetry rows the daemon writes for it (0 for a bad message)
    failures: int = 0  # of those items, how many are failure items
    damage: str | None = None  # for a bad message: a key of BAD_KINDS

    def repeated(self) -> Outgoing:
        """The same message sent again (HM delivers at least once)."""
        return Outgoing(
            self.topic, self.payload, self.vin, self.message_id, "duplicate", self.version,
            self.items, self.failures,
        )  # fmt: skip


class MessageFactory:
    def __init__(self, app_id: str, environment: str = "live") -> None:
        self.app_id = app_id
        self.environment = environment

    def _items(
        self, sample: Sample, stamp: str, rng: random.Random, failure_rate: float
    ) -> list[dict[str, Any]]:
        if failure_rate and rng.random() < failure_rate:
            reason, description = rng.choice(FAILURES)
            return [{"failure": {"reason": reason, "description": description}, "timestamp": stamp}]
        return [{"data": value, "timestamp": stamp} for value in sample.values]

    def v1(
        self,
        vin: str,
        message_id: str,
        sample: Sample,
        *,
        stamp: str,
        rng: random.Random,
        failure_rate: float,
    ) -> Outgoing:
        items = self._items(sample, stamp, rng, failure_rate)
        # A single-valued property is one item object; a ``multiple`` one is a list of items.
        prop_data: Any = items if sample.multiple else items[0]
        payload = {
            "version": 1,
            "message_id": message_id,
            "vin": vin,
            "capability": sample.capability,
            "property": sample.property,
            "data": {sample.capability: {sample.property: prop_data}},
        }
        topic = v1_topic(self.environment, self.app_id, vin, sample.capability, sample.property)
        failures = sum(1 for item in items if "failure" in item)
        return Outgoing(
            topic, orjson.dumps(payload), vin, message_id, "message", 1, len(items), failures
        )

    def v2(
        self,
        vin: str,
        message_id: str,
        samples: list[Sample],
        *,
        stamp: str,
        rng: random.Random,
        failure_rate: float,
    ) -> Outgoing:
        data: dict[str, dict[str, list[dict[str, Any]]]] = {}
        count = failures = 0
        for sample in samples:
            items = self._items(sample, stamp, rng, failure_rate)
            data.setdefault(sample.capability, {})[sample.property] = items
            count += len(items)
            failures += sum(1 for item in items if "failure" in item)
        payload = {
            "version": 2,
            "application_id": self.app_id,
            "message_id": message_id,
            "vin": vin,
            "data": data,
        }
        topic = v2_topic(self.environment, self.app_id)
        return Outgoing(
            topic, orjson.dumps(payload), vin, message_id, "message", 2, count, failures
        )

    def bad(
        self, vin: str, message_id: str, sample: Sample, stamp: str, rng: random.Random
    ) -> Outgoing:
        """A message the decoder must quarantine; which damage is drawn from ``rng``."""
        damage = rng.choice(_BAD_KIND_NAMES)
        good = self.v1(vin, message_id, sample, stamp=stamp, rng=rng, failure_rate=0.0)
        body = orjson.loads(good.payload)
        topic, version = good.topic, 1
        if damage == "truncated_json":
            payload = good.payload[: len(good.payload) // 2]
        else:
            if damage == "vin_mismatch":
                body["vin"] = vin[:-1] + ("0" if vin[-1] != "0" else "1")
            elif damage == "unsupported_version":
                body["version"] = 3
            elif damage == "bad_timestamp":
                item = body["data"][sample.capability][sample.property]
                (item[0] if isinstance(item, list) else item)["timestamp"] = "yesterday at noon"
            elif damage == "missing_data":
                envelope = self.v2(
                    vin, message_id, [sample], stamp=stamp, rng=rng, failure_rate=0.0
                )
                body = orjson.loads(envelope.payload)
                del body["data"]
                topic, version = envelope.topic, 2
            payload = orjson.dumps(body)
        return Outgoing(topic, payload, vin, message_id, "bad", version, damage=damage)

    def malformed(
        self, vin: str, message_id: str, sample: Sample, stamp: str, rng: random.Random
    ) -> Outgoing:
        """A V1 message that is not valid JSON (or not UTF-8), its message id still readable."""
        damage = rng.choice(_MALFORMED_KIND_NAMES)
        good = self.v1(vin, message_id, sample, stamp=stamp, rng=rng, failure_rate=0.0)
        payload = good.payload
        if damage == "json_cut":
            # Anywhere past the id's closing quote and before the last byte: any proper prefix
            # of a JSON object is invalid, and the id stays whole.
            id_end = payload.index(message_id.encode()) + len(message_id) + 1
            payload = payload[: rng.randrange(id_end, len(payload))]
        elif damage == "json_trailing_garbage":
            payload += b"}"
        elif damage == "json_nan":
            payload = payload.replace(b'"version":1,', b'"version":NaN,', 1)
        else:  # json_invalid_utf8
            payload = payload.replace(b'"property":"', b'"property":"\xff', 1)
        assert payload != good.payload, damage  # every shape must have changed something
        return Outgoing(good.topic, payload, vin, message_id, "bad", 1, damage=damage)
