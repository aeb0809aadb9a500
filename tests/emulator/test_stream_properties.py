"""What the stream emits is real Auto API: names, units, enum values and item shapes.

Checked against the bundled catalogue (always) and HM's capability YAML (``hmspecs``, where
``../shared/hm-specs`` is present). The samples come from vehicles driven through every phase.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from ingest import catalogue
from ingest.decode import Decoder
from ingest.emulator.clock import isoformat
from ingest.emulator.stream.messages import BAD_KINDS, FAILURES, MALFORMED_KINDS, MessageFactory
from ingest.emulator.stream.vehicle import PROPERTIES, V1_CYCLE, Sample, VehicleSim
from ingest.testing.accounting import payload_message_id

SPECS = Path(__file__).resolve().parents[3] / "shared" / "hm-specs" / "auto-api"
APP_ID = "6a1f0c2e-3b4d-4e5f-8a9b-0c1d2e3f4a5b"
VIN = "WHMSTRMTEST000001"
START = 1_800_000_000.0


def drive(seed: int, seconds: int = 1500) -> Iterator[tuple[VehicleSim, float]]:
    rng = random.Random(seed)
    sim = VehicleSim(VIN, rng, START)
    for second in range(1, seconds + 1):
        sim.advance(START + second)
        yield sim, START + second


def all_samples() -> Iterator[Sample]:
    for seed in range(6):
        for sim, _ in drive(seed):
            yield from sim.samples()


def test_vehicles_pass_through_every_phase() -> None:
    phases = {sim.phase for seed in range(6) for sim, _ in drive(seed)}
    assert phases == {"parked", "boarding", "driving", "stopping", "alighting", "charging"}


def test_odometer_rises_with_speed_and_battery_charges_and_drains() -> None:
    odometer, battery = [], []
    for sim, _ in drive(3, 3000):
        odometer.append(sim.odometer_km)
        battery.append((sim.phase, sim.battery))
    assert all(b >= a for a, b in itertools.pairwise(odometer))
    assert odometer[-1] > odometer[0]
    assert any(p == "charging" for p, _ in battery)
    deltas = [(p, b2 - b1) for (p, b1), (_, b2) in itertools.pairwise(battery)]
    assert any(d > 0 for p, d in deltas if p == "charging")
    assert any(d < 0 for p, d in deltas if p == "driving")


def test_every_property_is_in_the_bundled_catalogue_with_a_known_unit() -> None:
    assert set(V1_CYCLE) == set(PROPERTIES)
    seen = set()
    for sample in all_samples():
        key = (sample.capability, sample.property)
        seen.add(key)
        assert catalogue.is_known(*key), key
        spec = catalogue.properties(sample.capability)[sample.property]
        assert spec.multiple == sample.multiple, key
        for value in sample.values:
            if spec.unit_type is not None:
                assert set(value) == {"value", "unit"}, key
                assert value["unit"] in catalogue.units(spec.unit_type), (key, value)
            if spec.type == "types.percentage":
                assert 0.0 <= value <= 1.0, (key, value)
    assert seen == set(PROPERTIES)


def test_messages_decode_with_one_row_per_item_and_bad_ones_are_quarantined() -> None:
    decoder = Decoder(app_id=APP_ID)
    factory = MessageFactory(APP_ID)
    rng = random.Random(1)
    reasons = set()
    for sim, now in drive(1, 600):
        stamp = isoformat(now)
        for out in (
            factory.v2(VIN, f"v2-{now}", sim.samples(), stamp=stamp, rng=rng, failure_rate=0.2),
            *(
                factory.v1(VIN, f"v1-{now}-{i}", s, stamp=stamp, rng=rng, failure_rate=0.2)
                for i, s in enumerate(sim.samples())
            ),
        ):
            result = decoder.decode(out.topic, out.payload, 0)
            assert result.rejection is None, (result.rejection, out.payload)
            assert len(result.rows) == out.items
            assert result.unknown_properties == 0
        bad = factory.bad(VIN, f"bad-{now}", sim.samples()[0], stamp=stamp, rng=rng)
        rejection = decoder.decode(bad.topic, bad.payload, 0).rejection
        assert rejection is not None, bad.payload
        assert bad.damage is not None
        assert rejection.reason == BAD_KINDS[bad.damage]
        reasons.add(rejection.reason)
    assert reasons == set(BAD_KINDS.values())


def test_malformed_messages_are_not_json_yet_keep_their_message_id() -> None:
    """Each malformed shape is quarantined with its reason, and the raw bytes still name the id."""
    decoder = Decoder(app_id=APP_ID)
    factory = MessageFactory(APP_ID)
    rng = random.Random(2)
    damages: set[str] = set()
    for sim, now in drive(4, 400):
        message_id = f"{rng.getrandbits(128):032X}"
        sample = sim.samples()[int(now) % len(PROPERTIES)]
        out = factory.malformed(VIN, message_id, sample, isoformat(now), rng)
        assert out.damage is not None
        assert (out.kind, out.items, out.message_id) == ("bad", 0, message_id)
        result = decoder.decode(out.topic, out.payload, 0)
        assert result.rejection is not None, out.payload
        assert result.rejection.reason == MALFORMED_KINDS[out.damage], out.payload
        # Not parsed, so the rejected row has no message_id column value: the accounting reads
        # it from the raw payload instead.
        assert result.message_id is None
        assert payload_message_id(out.payload) == message_id, out.payload
        damages.add(out.damage)
    assert damages == set(MALFORMED_KINDS)


# -- against HM's YAML ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def specs() -> dict[str, Any]:
    if not SPECS.is_dir():
        pytest.skip(
            f"HM's spec files are only present beside the repo in CI/dev ({SPECS}); "
            "the product and the ordinary tests do not need them"
        )
    types = yaml.safe_load((SPECS / "misc" / "custom_types.yml").read_text())["types"]
    units = yaml.safe_load((SPECS / "misc" / "unit_types.yml").read_text())["measurement_types"]
    return {
        "types": {t["name"]: t for t in types},
        "units": {m["name"]: {u["name"] for u in m["unit_types"]} for m in units},
        "capabilities": {},
    }


def _capability(specs: dict[str, Any], name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = specs["capabilities"]
    if name not in loaded:
        data = yaml.safe_load((SPECS / "capabilities" / f"{name}.yml").read_text())
        loaded[name] = {p["name"]: p for p in data["properties"]}
    return dict(loaded[name])


def _check(specs: dict[str, Any], definition: dict[str, Any], value: Any, where: str) -> None:
    """``value`` conforms to an Auto API type definition (property, item or custom type)."""
    kind = definition["type"]
    if kind.startswith("types."):
        _check(specs, specs["types"][kind.removeprefix("types.")], value, where)
    elif kind.startswith("unit."):
        assert isinstance(value, dict), where
        assert set(value) == {"value", "unit"}, where
        assert isinstance(value["value"], int | float), where
        assert value["unit"] in specs["units"][kind.removeprefix("unit.")], (where, value)
    elif kind == "enum":
        assert value in {e["name"] for e in definition["enum_values"]}, (where, value)
    elif kind in ("double", "float"):
        assert isinstance(value, int | float), (where, value)
        for rule in definition.get("validation", "").split("|"):
            if rule.startswith("min:"):
                assert value >= float(rule[4:]), (where, value)
            if rule.startswith("max:"):
                assert value <= float(rule[4:]), (where, value)
    elif kind == "custom":
        items = {item["name"]: item for item in definition["items"]}
        assert isinstance(value, dict), (where, value)
        assert set(value) == set(items), (where, value)
        for name, item in items.items():
            _check(specs, item, value[name], f"{where}.{name}")
    else:
        pytest.fail(f"{where}: type {kind!r} has no check here yet")


@pytest.mark.hmspecs
def test_every_emitted_value_conforms_to_hm_yaml(specs: dict[str, Any]) -> None:
    checked = set()
    for sample in all_samples():
        where = f"{sample.capability}.{sample.property}"
        definition = _capability(specs, sample.capability).get(sample.property)
        assert definition is not None, f"{where} is not in {sample.capability}.yml"
        assert "deprecated" not in definition, f"{where} is deprecated: {definition['deprecated']}"
        assert bool(definition.get("multiple")) == sample.multiple, where
        for value in sample.values:
            _check(specs, definition, value, where)
        checked.add(where)
    assert len(checked) == len(PROPERTIES)


@pytest.mark.hmspecs
def test_failure_reasons_are_hm_failure_reasons(specs: dict[str, Any]) -> None:
    reason = next(i for i in specs["types"]["failure"]["items"] if i["name"] == "reason")
    allowed = {e["name"] for e in reason["enum_values"]}
    assert {name for name, _ in FAILURES} <= allowed
