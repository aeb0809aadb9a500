from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pyarrow as pa
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ingest import decode as d
from ingest.decode import COLUMNS, Decoded, Decoder, _parse_iso8601, parse_timestamp_ms
from ingest.schemas import TELEMETRY, arrow_schema, load_definition

APP = "48aa1779-91c2-468e-97e9-ab112efd53b9"
VIN = "WVWZZZ1JZ3W386752"
MID = "B10BB67D6B4D2EBAB49FD3F81D41111C2AC0D6E0816DE47F87DCDD1388F3D911"
RECEIVED = 1_700_000_000_123_456
TS = "2022-01-18T13:32:13Z"
TS_MS = 1_642_512_733_000
V2_TOPIC = f"live/level13/{APP}"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def v1_topic(capability: str, prop: str, vin: str = VIN) -> str:
    return f"live/level13/{APP}/{vin}/{capability}/get/{prop}"


def v1(capability: str, prop: str, value: Any, **extra: Any) -> tuple[str, bytes]:
    body = {
        "version": 1,
        "message_id": MID,
        "vin": VIN,
        "capability": capability,
        "property": prop,
        "data": {capability: {prop: value}},
        **extra,
    }
    return v1_topic(capability, prop), orjson.dumps(body)


def v2(data: Any, **extra: Any) -> tuple[str, bytes]:
    body = {"version": 2, "application_id": APP, "message_id": MID, "vin": VIN, "data": data}
    body.update(extra)
    return V2_TOPIC, orjson.dumps(body)


def run(message: tuple[str, bytes], decoder: Decoder | None = None) -> Decoded:
    return (decoder or Decoder()).decode(message[0], message[1], RECEIVED)


def ok(message: tuple[str, bytes]) -> list[dict[str, Any]]:
    result = run(message)
    assert result.rejection is None, result.rejection
    return [dict(zip(COLUMNS, row, strict=True)) for row in result.rows]


def rejected(message: tuple[str, bytes], decoder: Decoder | None = None) -> d.Rejection:
    result = run(message, decoder)
    assert result.rows == []
    assert result.rejection is not None
    assert result.rejection.reason in d.REASONS
    return result.rejection


VALUE_COLUMNS = ("value_number", "value_unit", "value_string", "value_bool", "value_json")


def values(row: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(row[c] for c in VALUE_COLUMNS)


# --- layout --------------------------------------------------------------------------------------


def test_columns_match_the_telemetry_schema_file() -> None:
    assert [f["name"] for f in load_definition(TELEMETRY)["fields"]] == list(COLUMNS)


def test_rows_load_into_the_arrow_schema() -> None:
    rows = run(
        v2(
            {
                "diagnostics": {
                    "odometer": [{"data": {"value": 1, "unit": "kilometers"}, "timestamp": TS}]
                },
                "race": {"vehicle_moving": [{"data": "moving"}, {"data": True}]},
                "x": {"y": [{"data": [1, 2], "failure": {"reason": "r"}, "availability": {}}]},
            }
        )
    ).rows
    columns = list(zip(*rows, strict=True))
    table = pa.table(
        [
            pa.array(col, type=f.type)
            for col, f in zip(columns, arrow_schema(TELEMETRY), strict=True)
        ],
        schema=arrow_schema(TELEMETRY),
    )
    assert table.num_rows == 4
    assert table.column("timestamp")[0].value == TS_MS


# --- V1 value shapes -----------------------------------------------------------------------------


def test_v1_unit_value_from_the_reference_example() -> None:
    (row,) = ok(
        v1(
            "diagnostics",
            "odometer",
            {"data": {"unit": "kilometers", "value": 8050.4}, "timestamp": TS},
        )
    )
    assert row["message_id"] == MID
    assert row["item_index"] == 0
    assert (row["vin"], row["capability"], row["property"]) == (VIN, "diagnostics", "odometer")
    assert row["timestamp"] == TS_MS
    assert row["received_at"] == RECEIVED
    assert values(row) == (8050.4, "kilometers", None, None, None)
    assert (row["failure_reason"], row["failure_description"], row["availability_json"]) == (
        None,
        None,
        None,
    )
    assert row["payload_version"] == 1
    assert row["topic"] == v1_topic("diagnostics", "odometer")


@pytest.mark.parametrize(
    ("capability", "prop", "data", "expected"),
    [
        ("diagnostics", "fuel_level", 0.9, (0.9, None, None, None, None)),
        ("diagnostics", "engine_rpm_int", 2500, (2500.0, None, None, None, None)),
        ("ignition", "status", "on", (None, None, "on", None, None)),
        ("race", "brake_pedal_switch_active", True, (None, None, None, True, None)),
        ("race", "brake_pedal_switch_active", False, (None, None, None, False, None)),
        (
            "vehicle_location",
            "coordinates",
            {"longitude": 13.4, "latitude": 52.5},
            (None, None, None, None, '{"latitude":52.5,"longitude":13.4}'),
        ),
        ("x", "list_value", [3, "a", None], (None, None, None, None, '[3,"a",null]')),
        ("x", "nulled", None, (None, None, None, None, None)),
        # a unit object with an extra key is structured data, not a unit value
        (
            "x",
            "not_unit",
            {"value": 1, "unit": "bars", "z": 1},
            (None, None, None, None, '{"unit":"bars","value":1,"z":1}'),
        ),
        # a boolean "value" is not a number
        (
            "x",
            "bool_unit",
            {"value": True, "unit": "bars"},
            (None, None, None, None, '{"unit":"bars","value":true}'),
        ),
    ],
)
def test_v1_value_shapes(capability: str, prop: str, data: Any, expected: tuple[Any, ...]) -> None:
    (row,) = ok(v1(capability, prop, {"data": data, "timestamp": TS}))
    assert values(row) == expected
    assert type(row["value_number"]) in (float, type(None))


def test_v1_missing_timestamp_and_data_give_nulls() -> None:
    (row,) = ok(v1("doors", "locks_state", {}))
    assert row["timestamp"] is None
    assert values(row) == (None,) * 5


def test_v1_failure_without_data() -> None:
    item = {
        "failure": {"reason": "unknown", "description": "Property not available"},
        "timestamp": TS,
    }
    (row,) = ok(v1("charging", "status", item))
    assert (row["failure_reason"], row["failure_description"]) == (
        "unknown",
        "Property not available",
    )
    assert values(row) == (None,) * 5


def test_v1_failure_with_data_keeps_both() -> None:
    item = {"data": "charging", "failure": {"reason": "rate_limit"}, "timestamp": TS}
    (row,) = ok(v1("charging", "status", item))
    assert row["value_string"] == "charging"
    assert (row["failure_reason"], row["failure_description"]) == ("rate_limit", None)


def test_v1_availability_is_sorted_json() -> None:
    item = {"data": 1, "availability": {"update_rate": "trip", "rate_limit": {"value": 1}}}
    (row,) = ok(v1("diagnostics", "fuel_level", item))
    assert row["availability_json"] == '{"rate_limit":{"value":1},"update_rate":"trip"}'


def test_v1_multi_item_list_numbers_items_in_order() -> None:
    items = [
        {"data": {"location": loc, "pressure": {"unit": "bars", "value": p}}, "timestamp": TS}
        for loc, p in (("front_left", 2.1), ("front_right", 2.2), ("rear_left", 2.3))
    ]
    rows = ok(v1("diagnostics", "tire_pressures", items))
    assert [r["item_index"] for r in rows] == [0, 1, 2]
    assert [orjson.loads(r["value_json"])["location"] for r in rows] == [
        "front_left",
        "front_right",
        "rear_left",
    ]
    assert all(r["property"] == "tire_pressures" for r in rows)


def test_v1_capability_and_property_fields_are_optional() -> None:
    topic, payload = v1("diagnostics", "speed", {"data": 1})
    body = orjson.loads(payload)
    del body["capability"], body["property"]
    assert len(ok((topic, orjson.dumps(body)))) == 1


def test_empty_v1_list_gives_no_rows_and_no_rejection() -> None:
    result = run(v1("diagnostics", "tire_pressures", []))
    assert result.rejection is None
    assert result.rows == []


# --- V2 ------------------------------------------------------------------------------------------


def test_v2_every_shape_in_one_envelope() -> None:
    data = {
        "diagnostics": {
            "odometer": [{"data": {"value": 2050, "unit": "kilometers"}, "timestamp": TS}],
            "tire_pressures": [
                {"data": {"location": "spare"}},
                {"data": {"location": "front_left"}},
            ],
        },
        "race": {
            "vehicle_moving": [{"data": "moving", "timestamp": "2021-10-06T13:59:25.648943Z"}]
        },
        "vehicle_location": {"coordinates": [{"data": {"latitude": 1.5, "longitude": -2}}]},
        "charging": {"status": [{"failure": {"reason": "unknown", "description": "n/a"}}]},
        "ignition": {"status": [{"data": False, "availability": {"update_rate": "on_change"}}]},
        "future_capability": {"future_property": [{"data": 7}]},
    }
    result = run(v2(data, extra_key="allowed"))
    assert result.rejection is None
    rows = [dict(zip(COLUMNS, row, strict=True)) for row in result.rows]
    assert [r["item_index"] for r in rows] == list(range(8))
    assert [(r["capability"], r["property"]) for r in rows] == [
        ("diagnostics", "odometer"),
        ("diagnostics", "tire_pressures"),
        ("diagnostics", "tire_pressures"),
        ("race", "vehicle_moving"),
        ("vehicle_location", "coordinates"),
        ("charging", "status"),
        ("ignition", "status"),
        ("future_capability", "future_property"),
    ]
    assert values(rows[0]) == (2050.0, "kilometers", None, None, None)
    assert rows[3]["value_string"] == "moving"
    assert rows[3]["timestamp"] == 1_633_528_765_648
    assert rows[4]["value_json"] == '{"latitude":1.5,"longitude":-2}'
    assert rows[5]["failure_reason"] == "unknown"
    assert rows[6]["value_bool"] is False
    assert rows[6]["availability_json"] == '{"update_rate":"on_change"}'
    assert rows[7]["value_number"] == 7.0
    assert all(r["payload_version"] == 2 and r["topic"] == V2_TOPIC for r in rows)
    assert all(r["vin"] == VIN and r["message_id"] == MID for r in rows)
    assert result.unknown_properties == 1
    assert (result.message_id, result.vin) == (MID, VIN)


def test_unknown_properties_are_counted_per_item_and_kept() -> None:
    result = run(v2({"diagnostics": {"made_up": [{"data": 1}, {"data": 2}], "speed": [{}]}}))
    assert result.rejection is None
    assert len(result.rows) == 3
    assert result.unknown_properties == 2


def test_v2_without_application_id_is_accepted() -> None:
    topic, payload = v2({"diagnostics": {"speed": [{"data": 1}]}})
    body = orjson.loads(payload)
    del body["application_id"]
    assert len(ok((topic, orjson.dumps(body)))) == 1


def test_float_version_number_is_accepted() -> None:
    # janus-0002 types "version" as a JSON number, so 2.0 is the same version.
    topic, payload = v2({})
    assert run((topic, payload.replace(b'"version":2', b'"version":2.0'))).rejection is None


# --- timestamps ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2022-01-18T13:32:13Z", TS_MS),
        ("2022-01-18T13:32:13", TS_MS),  # no zone = UTC
        ("2022-01-18t13:32:13z", TS_MS),
        ("2022-01-18 13:32:13+00:00", TS_MS),
        ("2022-01-18T15:32:13+02:00", TS_MS),
        ("2022-01-18T15:32:13+0200", TS_MS),
        ("2022-01-18T15:32:13+02", TS_MS),
        ("2022-01-18T08:02:13-05:30", TS_MS),
        ("2022-01-18T13:32:13.5Z", TS_MS + 500),
        ("2022-01-18T13:32:13.648943Z", TS_MS + 648),
        ("2022-01-18T13:32:13.123456789123Z", TS_MS + 123),
        ("1969-12-31T23:59:59.999Z", -1),
        ("2024-02-29T00:00:00Z", 1_709_164_800_000),
    ],
)
def test_timestamps(text: str, expected: int) -> None:
    assert parse_timestamp_ms(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "yesterday",
        "",
        "2022-01-18",
        "2022-01-18T13:32",
        "2022-13-18T13:32:13Z",
        "2023-02-29T13:32:13Z",
        "2022-01-18T24:00:00Z",
        "2022-01-18T13:60:00Z",
        "2022-01-18T13:32:13+24:00",
        "2022-01-18T13:32:13.Z",
        "2022-01-18T13:32:13ZZ",
        "\uff12\uff10\uff12\uff12-01-18T13:32:13Z",  # full-width digits are not ISO 8601
    ],
)
def test_invalid_timestamps(text: str) -> None:
    assert parse_timestamp_ms(text) is None


@given(
    st.from_regex(
        r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{0,12})?Z", fullmatch=True
    )
)
@example("2022-01-18T13:32:13.Z")
@example("2022-13-18T13:32:13Z")
@example("2022-01-18T24:00:00.000Z")
@example("0000-01-01T00:00:00Z")
@settings(max_examples=500)
def test_the_fast_path_agrees_with_the_grammar(text: str) -> None:
    # HM's own layout goes through fromisoformat; every value, valid or not (month 13, hour 24,
    # "13.Z"), must come out as the regex grammar says, which is the parser for everything else.
    assert parse_timestamp_ms(text) == _parse_iso8601(text)


def test_the_remembered_timestamp_is_only_reused_for_the_same_text() -> None:
    assert parse_timestamp_ms("2022-01-18T13:32:13Z") == TS_MS
    assert parse_timestamp_ms("2022-01-18T13:32:13Z") == TS_MS
    assert parse_timestamp_ms("2022-01-18T13:32:14Z") == TS_MS + 1000
    assert parse_timestamp_ms("2022-01-18T13:32:61Z") is None
    assert parse_timestamp_ms("2022-01-18T13:32:61Z") is None
    assert parse_timestamp_ms("2022-01-18T13:32:13.5Z") == TS_MS + 500


# --- rejections ----------------------------------------------------------------------------------


def test_payload_too_large_is_checked_before_parsing() -> None:
    rejection = rejected((v1_topic("a", "b"), b"x" * 101), Decoder(max_payload_bytes=100))
    assert rejection.reason == d.REASON_PAYLOAD_TOO_LARGE
    assert "101 bytes" in rejection.detail
    assert "100" in rejection.detail
    assert rejection.vin == VIN  # read from the topic


def test_invalid_utf8() -> None:
    rejection = rejected((V2_TOPIC, b'{"vin": "\xff"}'))
    assert rejection.reason == d.REASON_INVALID_UTF8
    assert "not UTF-8" in rejection.detail
    assert "byte 9" in rejection.detail


@pytest.mark.parametrize("payload", [b"{", b'{"version": NaN}', b"[Infinity]", b"", b"{'a': 1}"])
def test_invalid_json(payload: bytes) -> None:
    rejection = rejected((V2_TOPIC, payload))
    assert rejection.reason == d.REASON_INVALID_JSON
    assert rejection.detail.startswith("payload is not JSON")


@pytest.mark.parametrize(
    ("payload", "kind"), [(b"[1]", "array"), (b'"x"', "string"), (b"1", "number")]
)
def test_not_an_object(payload: bytes, kind: str) -> None:
    rejection = rejected((V2_TOPIC, payload))
    assert rejection.reason == d.REASON_NOT_AN_OBJECT
    assert f"JSON {kind}" in rejection.detail


@pytest.mark.parametrize(
    ("version", "shown"), [(None, "is missing"), (3, "is 3"), ("2", "is '2'"), (True, "is true")]
)
def test_unsupported_version(version: Any, shown: str) -> None:
    topic, payload = v2({})
    body = orjson.loads(payload)
    if version is None:
        del body["version"]
    else:
        body["version"] = version
    rejection = rejected((topic, orjson.dumps(body)))
    assert rejection.reason == d.REASON_UNSUPPORTED_VERSION
    assert f"version {shown}" in rejection.detail
    assert (rejection.message_id, rejection.vin) == (MID, VIN)


@pytest.mark.parametrize(
    ("field", "value", "shown"),
    [
        ("message_id", None, "message_id is missing"),
        ("message_id", "", "message_id must be a non-empty string, got ''"),
        ("message_id", 12, "message_id must be a non-empty string, got 12"),
        ("vin", None, "vin is missing"),
        ("vin", ["x"], "vin must be a non-empty string"),
        ("data", None, "data is missing"),
        ("data", [], "data must be an object, got array"),
        ("capability", 5, "capability must be a string, got number"),
    ],
)
def test_missing_field(field: str, value: Any, shown: str) -> None:
    topic, payload = v1("diagnostics", "speed", {"data": 1})
    body = orjson.loads(payload)
    if value is None:
        del body[field]
    else:
        body[field] = value
    rejection = rejected((topic, orjson.dumps(body)))
    assert rejection.reason == d.REASON_MISSING_FIELD
    assert shown in rejection.detail


def test_bad_topic() -> None:
    _, payload = v1("diagnostics", "speed", {"data": 1})
    rejection = rejected((f"live/level13/{APP}/{VIN}/diagnostics/set/speed", payload))
    assert rejection.reason == d.REASON_BAD_TOPIC
    assert "action 'set'" in rejection.detail
    assert (rejection.message_id, rejection.vin) == (MID, VIN)


def test_vin_mismatch() -> None:
    _, payload = v1("diagnostics", "speed", {"data": 1})
    other = "WVWZZZ1JZ3W000000"
    rejection = rejected((v1_topic("diagnostics", "speed", vin=other), payload))
    assert rejection.reason == d.REASON_VIN_MISMATCH
    assert VIN in rejection.detail
    assert other in rejection.detail


@pytest.mark.parametrize(
    ("mutate", "shown"),
    [
        (lambda b: b.update(capability="doors"), "payload capability 'doors' differs"),
        (lambda b: b.update(property="odometer"), "payload property 'odometer' differs"),
        (lambda b: b.update(data={"doors": {"speed": {}}}), "data.doors differs from topic"),
        (
            lambda b: b.update(data={"diagnostics": {"odometer": {}}}),
            "data.diagnostics.odometer differs from topic property 'speed'",
        ),
        (lambda b: b.update(version=2), "payload version 2 arrived on a V1 topic"),
    ],
)
def test_topic_mismatch_v1(mutate: Any, shown: str) -> None:
    topic, payload = v1("diagnostics", "speed", {"data": 1})
    body = orjson.loads(payload)
    mutate(body)
    rejection = rejected((topic, orjson.dumps(body)))
    assert rejection.reason == d.REASON_TOPIC_MISMATCH
    assert shown in rejection.detail


def test_topic_mismatch_v1_payload_on_v2_topic() -> None:
    _, payload = v1("diagnostics", "speed", {"data": 1})
    rejection = rejected((V2_TOPIC, payload))
    assert rejection.reason == d.REASON_TOPIC_MISMATCH
    assert "payload version 1 arrived on a V2 topic" in rejection.detail


def test_app_mismatch_against_configuration() -> None:
    rejection = rejected(v2({}), Decoder(app_id="other-app"))
    assert rejection.reason == d.REASON_APP_MISMATCH
    assert APP in rejection.detail
    assert "'other-app'" in rejection.detail


def test_configured_app_id_accepts_its_own_topics() -> None:
    assert run(v2({}), Decoder(app_id=APP)).rejection is None


def test_app_mismatch_between_v2_topic_and_payload() -> None:
    rejection = rejected(v2({}, application_id="someone-else"))
    assert rejection.reason == d.REASON_APP_MISMATCH
    assert "application_id 'someone-else'" in rejection.detail


@pytest.mark.parametrize(
    "vin", ["WVWZZZ1JZ3W38675", "wvwzzz1jz3w386752", "WVWZZZ1JZ3W38675!", "Ä" * 17]
)
def test_invalid_vin_v2(vin: str) -> None:
    rejection = rejected(v2({}, vin=vin))
    assert rejection.reason == d.REASON_INVALID_VIN
    assert repr(vin) in rejection.detail
    assert rejection.vin == vin


def test_hm_test_vin_with_letter_i_is_accepted() -> None:
    # HM's own V2 example uses EXVETESTVIN000001 although ISO 3779 forbids I, O and Q.
    assert run(v2({}, vin="EXVETESTVIN000001")).rejection is None


@pytest.mark.parametrize(
    ("message", "shown"),
    [
        (v2({"diagnostics": {"odometer": [{"timestamp": "yesterday"}]}}),
         "data.diagnostics.odometer[0].timestamp: 'yesterday' is not ISO 8601"),
        (v2({"diagnostics": {"odometer": [{}, {}, {"timestamp": 5}]}}),
         "data.diagnostics.odometer[2].timestamp: 5 is not ISO 8601"),
        (v1("diagnostics", "speed", {"timestamp": "2022-01-18"}),
         "data.diagnostics.speed.timestamp: '2022-01-18' is not ISO 8601"),
        (v2({"diagnostics": {"odometer": {"data": 1}}}),
         "data.diagnostics.odometer: V2 properties are arrays of items, got object"),
        (v2({"diagnostics": [1]}), "data.diagnostics: expected an object of properties, got array"),
        (v2({"diagnostics": {"odometer": [1]}}),
         "data.diagnostics.odometer[0]: expected an object"),
        (v1("diagnostics", "speed", 5), "data.diagnostics.speed: expected an object"),
        (v1("diagnostics", "speed", [{}, "x"]), "data.diagnostics.speed[1]: expected an object"),
        (v2({"charging": {"status": [{"failure": "broken"}]}}),
         "data.charging.status[0].failure: expected an object, got string"),
        (v2({"charging": {"status": [{"failure": {"reason": 3}}]}}),
         "data.charging.status[0].failure.reason: expected a string, got number"),
        (v2({"charging": {"status": [{"availability": [1]}]}}),
         "data.charging.status[0].availability: expected an object, got array"),
    ],
)  # fmt: skip
def test_malformed_item(message: tuple[str, bytes], shown: str) -> None:
    rejection = rejected(message)
    assert rejection.reason == d.REASON_MALFORMED_ITEM
    assert rejection.detail.startswith(shown)


def test_a_late_malformed_item_rejects_the_whole_message() -> None:
    data = {"diagnostics": {"speed": [{"data": 1}] * 5, "odometer": [{"failure": 1}]}}
    result = run(v2(data))
    assert result.rows == []
    assert result.rejection is not None
    assert result.rejection.reason == d.REASON_MALFORMED_ITEM


def test_long_offending_values_are_shortened_in_details() -> None:
    rejection = rejected(v2({"a": {"b": [{"timestamp": "x" * 500}]}}))
    assert len(rejection.detail) < 120
    assert rejection.detail.endswith("...' is not ISO 8601") or "..." in rejection.detail


def test_big_integers_are_numbers_not_errors() -> None:
    # orjson reads integers beyond 64 bits as floats instead of failing; value_number is a float
    # column anyway, so they decode rather than being quarantined.
    topic, payload = v1("diagnostics", "speed", {"data": 0})
    payload = payload.replace(b'"data":0', b'"data":123456789012345678901234567890')
    (row,) = ok((topic, payload))
    assert math.isclose(row["value_number"], 1.2345678901234568e29)


def test_decoder_bug_is_quarantined_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_: Any) -> Any:
        raise RuntimeError("bug")

    monkeypatch.setattr(d, "_item_values", boom)
    rejection = rejected(v2({"a": {"b": [{}]}}))
    assert rejection.reason == d.REASON_DECODER_ERROR
    assert "RuntimeError: bug" in rejection.detail


# --- properties ----------------------------------------------------------------------------------


@settings(max_examples=300)
@given(topic=st.one_of(st.just(V2_TOPIC), st.just(v1_topic("a", "b")), st.text(max_size=40)),
       payload=st.binary(max_size=300))  # fmt: skip
def test_arbitrary_bytes_never_raise(topic: str, payload: bytes) -> None:
    result = Decoder().decode(topic, payload, RECEIVED)
    assert (result.rejection is None) != (result.rows == [] and result.rejection is not None)
    if result.rejection is not None:
        assert result.rejection.reason in d.REASONS - {d.REASON_DECODER_ERROR}
        assert result.rejection.detail


json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**53), 2**53),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=10),
)
json_value = st.recursive(
    json_leaf,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=6,
)
names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8)
items = st.fixed_dictionaries(
    {},
    optional={
        "data": json_value,
        "timestamp": st.datetimes(timezones=st.just(UTC)).map(lambda t: t.isoformat()),
        "failure": st.fixed_dictionaries({}, optional={"reason": names, "description": st.text()}),
        "availability": st.dictionaries(names, json_leaf, max_size=2),
    },
)
envelopes = st.dictionaries(
    names, st.dictionaries(names, st.lists(items, max_size=4), max_size=3), max_size=3
)


def expected_values(data: Any) -> tuple[Any, ...]:
    if data is None:
        return (None,) * 5
    if isinstance(data, bool):
        return (None, None, None, data, None)
    if isinstance(data, int | float):
        return (float(data), None, None, None, None)
    if isinstance(data, str):
        return (None, None, data, None, None)
    if (
        isinstance(data, dict)
        and set(data) == {"value", "unit"}
        and isinstance(data["unit"], str)
        and isinstance(data["value"], int | float)
        and not isinstance(data["value"], bool)
    ):
        return (float(data["value"]), data["unit"], None, None, None)
    return (None, None, None, None, orjson.dumps(data, option=orjson.OPT_SORT_KEYS).decode())


@settings(max_examples=200)
@given(envelopes)
def test_generated_v2_envelopes_give_one_row_per_item(data: dict[str, Any]) -> None:
    result = run(v2(data))
    assert result.rejection is None, result.rejection
    flat = [(c, p, item) for c, props in data.items() for p, lst in props.items() for item in lst]
    assert len(result.rows) == len(flat)
    for index, (row, (capability, prop, item)) in enumerate(zip(result.rows, flat, strict=True)):
        named = dict(zip(COLUMNS, row, strict=True))
        assert named["item_index"] == index
        assert (named["capability"], named["property"]) == (capability, prop)
        assert values(named) == expected_values(item.get("data"))
        failure = item.get("failure") or {}
        assert named["failure_reason"] == failure.get("reason")
        assert named["failure_description"] == failure.get("description")
        if "timestamp" in item:
            parsed = datetime.fromisoformat(item["timestamp"])
            assert named["timestamp"] == (parsed - EPOCH) // timedelta(milliseconds=1)
        else:
            assert named["timestamp"] is None


@settings(max_examples=100)
@given(prop=names, item_list=st.lists(items, min_size=1, max_size=4))
def test_generated_v1_messages_round_trip(prop: str, item_list: list[dict[str, Any]]) -> None:
    value: Any = item_list[0] if len(item_list) == 1 else item_list
    rows = ok(v1("diagnostics", prop, value))
    assert [r["item_index"] for r in rows] == list(range(len(item_list)))
    assert [values(r) for r in rows] == [expected_values(i.get("data")) for i in item_list]
