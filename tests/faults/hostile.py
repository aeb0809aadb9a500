"""Hostile MQTT payloads: a deterministic corpus and Hypothesis strategies.

Every hostile message carries the bytes ``"message_id":"<id>"`` somewhere (even inside invalid
UTF-8 or broken JSON), so the accounting can find it in ``rejected/`` by its raw payload. All of
them must be quarantined; none may be valid telemetry.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable

import orjson
from hypothesis import strategies as st

from ingest.testing.daemon import APP_ID
from ingest.testing.traffic import ENVIRONMENT, LEVEL, Message, make_vin

V1_TOPIC = f"{ENVIRONMENT}/{LEVEL}/{APP_ID}/{{vin}}/diagnostics/get/odometer"
V2_TOPIC = f"{ENVIRONMENT}/{LEVEL}/{APP_ID}"
MEGABYTE = 1024 * 1024


def _v1(message_id: str, vin: str, data: object, **fields: object) -> dict[str, object]:
    body: dict[str, object] = {
        "version": 1,
        "message_id": message_id,
        "vin": vin,
        "capability": "diagnostics",
        "property": "odometer",
        "data": {"diagnostics": {"odometer": data}},
    }
    body.update(fields)
    return body


def _json(value: object) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:
        # An integer past 64 bits (hypothesis draws them): valid JSON that orjson will not
        # write. The standard library writes it, and the decoder must still cope with it.
        return json.dumps(value).encode()


def _marker(message_id: str) -> bytes:
    return b'"message_id":"' + message_id.encode() + b'"'


# Each family: (name, make(message_id, vin, rng) -> (topic, payload)).
Family = tuple[str, Callable[[str, str, random.Random], tuple[str, bytes]]]

FAMILIES: list[Family] = [
    (
        "invalid_utf8",
        lambda i, v, r: (
            V1_TOPIC.format(vin=v),
            b'{"version":1,' + _marker(i) + b',"vin":"\xff\xfe' + r.randbytes(8) + b'"}',
        ),
    ),
    (
        "nested_arrays_past_parser_limit",
        lambda i, v, r: (
            V1_TOPIC.format(vin=v),
            b"{" + _marker(i) + b',"data":' + b"[" * 5000 + b"]" * 5000 + b"}",
        ),
    ),
    (
        "nested_item_data_300",  # parses (orjson allows 1024 levels), too deep to re-encode
        lambda i, v, r: (
            V1_TOPIC.format(vin=v),
            _json(_v1(i, v, {"data": "@"})).replace(b'"@"', b"[" * 300 + b"]" * 300),
        ),
    ),
    (
        "nested_availability_300",
        lambda i, v, r: (
            V1_TOPIC.format(vin=v),
            _json(_v1(i, v, {"data": 1, "availability": "@"})).replace(
                b'"@"', b'{"a":' * 300 + b"1" + b"}" * 300
            ),
        ),
    ),
    (
        "number_overflows_double",
        lambda i, v, r: (
            V1_TOPIC.format(vin=v),
            _json(_v1(i, v, {"data": {"value": 1, "unit": "kilometers"}})).replace(
                b'"value":1', b'"value":' + r.choice([b"1e400", b"-1e999", b"9" * 400])
            ),
        ),
    ),
    (
        "huge_version",
        lambda i, v, r: (
            V1_TOPIC.format(vin=v),
            b'{"version":' + b"9" * 40 + b"," + _marker(i) + b"}",
        ),
    ),
    (
        "nan_infinity",
        lambda i, v, r: (
            V1_TOPIC.format(vin=v),
            _json(_v1(i, v, {"data": 1})).replace(
                b'"data":1', b'"data":' + r.choice([b"NaN", b"Infinity", b"-Infinity"])
            ),
        ),
    ),
    (
        "not_an_object",
        lambda i, v, r: (V1_TOPIC.format(vin=v), b"[{" + _marker(i) + b"}]"),
    ),
    (
        "bom_prefix",
        lambda i, v, r: (V1_TOPIC.format(vin=v), b"\xef\xbb\xbf" + _json(_v1(i, v, {"data": 1}))),
    ),
    (
        "lone_surrogate",
        lambda i, v, r: (
            V1_TOPIC.format(vin=v),
            _json(_v1(i, v, {"data": "x"})).replace(b'"data":"x"', b'"data":"\\ud800"'),
        ),
    ),
    (
        "truncated_json",
        lambda i, v, r: (
            V1_TOPIC.format(vin=v),
            _json(_v1(i, v, {"data": 1}))[: -r.randint(1, 20)],
        ),
    ),
    (
        "wrong_topic_shape",
        lambda i, v, r: (
            f"{ENVIRONMENT}/{LEVEL}/{APP_ID}/{v}/extra/levels/here/too/many",
            _json(_v1(i, v, {"data": 1})),
        ),
    ),
    (
        "v2_payload_on_v1_topic",
        lambda i, v, r: (
            V1_TOPIC.format(vin=v),
            _json({"version": 2, "application_id": APP_ID, "message_id": i, "vin": v, "data": {}}),
        ),
    ),
    (
        "vin_mismatch",
        lambda i, v, r: (
            V1_TOPIC.format(vin=v),
            _json(_v1(i, make_vin(r.randrange(10**6)), {"data": 1})),
        ),
    ),
    (
        "invalid_v2_vin",
        lambda i, v, r: (
            V2_TOPIC,
            _json(
                {
                    "version": 2,
                    "application_id": APP_ID,
                    "message_id": i,
                    "vin": "short",
                    "data": {},
                }
            ),
        ),
    ),
    (
        "app_mismatch",
        lambda i, v, r: (
            V2_TOPIC,
            _json(
                {
                    "version": 2,
                    "application_id": "another-app",
                    "message_id": i,
                    "vin": v,
                    "data": {},
                }
            ),
        ),
    ),
    (
        "bad_timestamp",
        lambda i, v, r: (
            V1_TOPIC.format(vin=v),
            _json(
                _v1(
                    i,
                    v,
                    {
                        "data": 1,
                        "timestamp": r.choice(["99999-01-01T00:00:00Z", "yesterday", 1e300]),
                    },
                )
            ),
        ),
    ),
    (
        "control_bytes",
        lambda i, v, r: (
            V1_TOPIC.format(vin=v),
            b"\x00\x01{" + _marker(i) + b"}\x00" + r.randbytes(32),
        ),
    ),
]


def _big(message_id: str, vin: str, rng: random.Random) -> tuple[str, bytes]:
    """A multi-megabyte payload: a valid-looking message padded past the 1 MiB limit."""
    size = rng.randint(2, 4) * MEGABYTE
    head = _json(_v1(message_id, vin, {"data": "@"}))
    return V1_TOPIC.format(vin=vin), head.replace(b'"@"', b'"' + b"A" * size + b'"')


def hostile_corpus(count: int, *, big: int = 0, seed: int = 6) -> list[Message]:
    """``count`` hostile messages cycling through :data:`FAMILIES`, ``big`` of them multi-MB."""
    rng = random.Random(seed)
    messages = []
    for index in range(count):
        message_id = f"h{seed}-{index:06d}"
        vin = make_vin(rng.randrange(50))
        if index < big:
            topic, payload = _big(message_id, vin, rng)
        else:
            _, make = FAMILIES[index % len(FAMILIES)]
            topic, payload = make(message_id, vin, rng)
        messages.append(Message(topic, payload, message_id, vin, 0))
    rng.shuffle(messages)
    return messages


# -- Hypothesis --------------------------------------------------------------------------------

_json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20)
)
_json_value = st.recursive(
    _json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=30,
)


@st.composite
def hostile_message(draw: st.DrawFn, message_id: str) -> Message:
    """A message whose payload is broken somewhere: random bytes around the id marker, a
    random JSON document where the Auto API structure belongs, or a random field dropped."""
    vin = make_vin(draw(st.integers(0, 49)))
    kind = draw(st.sampled_from(["bytes", "structure", "field"]))
    topic = V1_TOPIC.format(vin=vin)
    if kind == "bytes":
        payload = (
            draw(st.binary(max_size=200)) + _marker(message_id) + draw(st.binary(max_size=200))
        )
        # Unbalanced on purpose: never a valid document.
        payload = b"{" + payload
    elif kind == "structure":
        data = draw(_json_value.filter(lambda v: not isinstance(v, dict)))
        body = _v1(message_id, vin, {})
        body["data"] = data  # must be capability -> property -> item(s): an object
        payload = _json(body)
    else:
        body = _v1(message_id, vin, {"data": 1})
        drop = draw(st.sampled_from(["version", "vin", "data"]))
        del body[drop]
        payload = _json(body)
    return Message(topic, payload, message_id, vin, 0)
