"""Conformance against High Mobility's official spec files.

These files are not part of the product: they sit beside the repository (``../shared/hm-specs``)
in CI and on development machines only, so this module skips itself everywhere else.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson
import pytest
import yaml

from ingest import catalogue
from ingest.decode import COLUMNS, Decoder

SPECS = Path(__file__).resolve().parents[2] / "shared" / "hm-specs"
REPO = Path(__file__).resolve().parents[1]
RECEIVED = 1_700_000_000_000_000
APP = "48aa1779-91c2-468e-97e9-ab112efd53b9"
SAMPLE_SIZE = 50  # push-API properties turned into V1 messages; spread over all capabilities

pytestmark = [
    pytest.mark.hmspecs,
    pytest.mark.skipif(
        not SPECS.is_dir(),
        reason=f"HM's official spec files are only present beside the repo in CI/dev ({SPECS}); "
        "the product and the ordinary tests do not need them",
    ),
]


def _rows(topic: str, payload: bytes) -> list[dict[str, Any]]:
    result = Decoder().decode(topic, payload, RECEIVED)
    assert result.rejection is None, result.rejection
    return [dict(zip(COLUMNS, row, strict=True)) for row in result.rows]


def test_janus_fixture_decodes_to_expected_rows() -> None:
    raw = (SPECS / "json-schema" / "janus-0002" / "fixtures" / "example.json").read_bytes()
    envelope = orjson.loads(raw)
    topic = f"live/level13/{envelope['application_id']}"
    (row,) = _rows(topic, raw)
    expected = {
        "message_id": "ABCDEF",
        "item_index": 0,
        "vin": "EXVETESTVIN000001",
        "capability": "diagnostics",
        "property": "odometer",
        "timestamp": 1_633_528_765_648,  # 2021-10-06T13:59:25.648943Z, truncated to ms
        "received_at": RECEIVED,
        "value_number": 2050.0,
        "value_unit": "kilometers",
        "value_string": None,
        "value_bool": None,
        "value_json": None,
        "failure_reason": None,
        "failure_description": None,
        "availability_json": None,
        "payload_version": 2,
        "topic": topic,
    }
    for column in COLUMNS:
        assert row[column] == expected[column], column


def test_auto_api_fixture_in_a_v2_envelope_decodes() -> None:
    data = orjson.loads(
        (SPECS / "json-schema" / "auto-api-0002" / "fixtures" / "example.json").read_bytes()
    )
    envelope = {
        "version": 2,
        "application_id": APP,
        "message_id": "M1",
        "vin": "EXVETESTVIN000001",
        "data": data,
    }
    rows = _rows(f"sandbox/level13/{APP}", orjson.dumps(envelope))
    got = [
        (r["item_index"], r["capability"], r["property"], r["value_number"], r["value_unit"],
         r["value_string"], r["timestamp"])
        for r in rows
    ]  # fmt: skip
    assert got == [
        (0, "diagnostics", "odometer", 2050.0, "kilometers", None, 1_633_528_765_648),
        (1, "diagnostics", "speed", 42.0, "kilometers_per_hour", None, 1_633_528_765_648),
        (2, "race", "vehicle_moving", None, None, "moving", 1_633_528_765_648),
    ]


def _gen_catalogue() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "gen_catalogue", REPO / "tools" / "gen_catalogue.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_catalogue_matches_the_capability_yaml() -> None:
    gen = _gen_catalogue()
    regenerated = gen.build_catalogue(SPECS)
    committed_path = REPO / "schemas" / "auto_api_catalogue.json"
    assert orjson.loads(committed_path.read_bytes()) == regenerated, (
        "schemas/auto_api_catalogue.json is stale: run python tools/gen_catalogue.py"
    )
    assert committed_path.read_bytes() == gen.render(regenerated)
    assert catalogue.load().source_commit == regenerated["source_commit"]
    # spot checks that could only pass if the YAML was really read
    assert catalogue.properties("diagnostics")["odometer"].unit_type == "length"
    assert catalogue.properties("diagnostics")["tire_pressures"].multiple is True
    assert "kilometers" in catalogue.units("length")


# --- push API (AsyncAPI) examples ----------------------------------------------------------------

EXAMPLE_TIMESTAMP = "2022-01-18T13:32:13Z"  # the spec's timestamp schema carries no example


def _load_push_api() -> dict[str, Any]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the file is ~900 kB
    with (SPECS / "openapi" / "hm-push-api-v1.yml").open(encoding="utf-8") as handle:
        document: dict[str, Any] = yaml.load(handle, Loader=loader)  # safe: CSafeLoader/SafeLoader
    return document


def _example(schema: dict[str, Any], schemas: dict[str, Any]) -> Any:
    """An instance of ``schema`` built from its ``example`` values (first enum value otherwise)."""
    if "$ref" in schema:
        ref = schema["$ref"]
        if ref == "#/components/schemas/timestamp":
            return EXAMPLE_TIMESTAMP
        return _example(schemas[ref.rsplit("/", 1)[1]], schemas)
    if "example" in schema:
        return schema["example"]
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][0]
    for combinator in ("oneOf", "anyOf"):
        if combinator in schema:
            return _example(schema[combinator][0], schemas)
    kind = str(schema.get("type"))
    if kind == "array":
        return [_example(schema["items"], schemas), _example(schema["items"], schemas)]
    if kind == "object" or "properties" in schema:
        return {name: _example(sub, schemas) for name, sub in schema.get("properties", {}).items()}
    return {"number": 1.5, "integer": 3, "string": "x", "boolean": True}.get(kind)


@pytest.fixture(scope="module")
def push_api_messages() -> list[tuple[str, str, dict[str, Any]]]:
    schemas = _load_push_api()["components"]["schemas"]
    messages = []
    for name in sorted(schemas):
        schema = schemas[name]
        props = schema.get("properties", {}) if isinstance(schema, dict) else {}
        if "capability" not in props or "property" not in props:
            continue
        messages.append((props["capability"]["const"], props["property"]["const"], schema))
    step = max(1, len(messages) // SAMPLE_SIZE)
    return [(c, p, {"schemas": schemas, "message": m}) for c, p, m in messages[::step]]


def test_push_api_examples_decode(push_api_messages: list[tuple[str, str, dict[str, Any]]]) -> None:
    assert len(push_api_messages) >= SAMPLE_SIZE
    vin = "VFXXXXXXXXXXXXXXX"  # the push API's own example VIN
    unknown = []
    for capability, prop, context in push_api_messages:
        payload = _example(context["message"], context["schemas"])
        payload["vin"] = vin
        assert payload["data"][capability][prop], (capability, prop)
        topic = f"live/level13/{APP}/{vin}/{capability}/get/{prop}"
        result = Decoder(app_id=APP).decode(topic, orjson.dumps(payload), RECEIVED)
        assert result.rejection is None, (capability, prop, result.rejection)
        item = payload["data"][capability][prop]
        assert len(result.rows) == (len(item) if isinstance(item, list) else 1), (capability, prop)
        first = dict(zip(COLUMNS, result.rows[0], strict=True))
        assert first["timestamp"] == 1_642_512_733_000
        has_value = any(
            first[c] is not None
            for c in ("value_number", "value_string", "value_bool", "value_json")
        )
        assert has_value, (capability, prop, first)
        if result.unknown_properties:
            unknown.append((capability, prop))
    # The push API and the auto-api YAML come from different repositories; a property missing from
    # the catalogue means they drifted: regenerate the catalogue from newer YAML.
    assert unknown == []
