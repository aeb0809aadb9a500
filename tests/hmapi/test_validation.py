from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ingest.errors import ConfigError, IngestError
from ingest.hmapi import (
    BRANDS,
    Environment,
    InvalidVehicleError,
    Odometer,
    resolve_endpoint,
    suggest_brand,
    validate_vehicle,
    validate_vin,
)
from ingest.hmapi.validation import validate_vehicles

VIN_CHARS = "ABCDEFGHJKLMNPRSTUVWXYZ0123456789"


def test_reference_brand_list_is_exact() -> None:
    assert {
        "alfaromeo", "audi", "bmw", "citroen", "cupra", "dacia", "ds", "fiat", "ford", "jeep",
        "kia", "lexus", "maserati", "mercedes-benz", "mini", "nissan", "opel", "peugeot",
        "polestar", "porsche", "renault", "seat", "skoda", "tesla", "toyota", "vauxhall",
        "volkswagen", "volvo-cars", "sandbox",
    } == BRANDS  # fmt: skip


@given(st.text(alphabet=VIN_CHARS, min_size=17, max_size=17))
def test_valid_vins_pass(vin: str) -> None:
    assert validate_vin(vin) == vin


@pytest.mark.parametrize(
    ("vin", "reason"),
    [
        ("WBADT43452G29640", "16 characters"),
        ("WBADT43452G2964031", "18 characters"),
        ("WBADT43452G29640I", "'I'"),
        ("WBADT43452G29640O", "'O'"),
        ("QBADT43452G296403", "'Q'"),
        ("WBADT43452G29640-", "'-'"),
        ("wbadt43452g296403", "WBADT43452G296403"),
    ],
)
def test_invalid_vins_are_named_with_the_reason(vin: str, reason: str) -> None:
    with pytest.raises(InvalidVehicleError) as info:
        validate_vin(vin)
    assert vin in str(info.value)
    assert reason in str(info.value)


@pytest.mark.parametrize(
    ("brand", "suggestion"),
    [
        ("mercedes", "mercedes-benz"),
        ("Mercedes Benz", "mercedes-benz"),
        ("volvo", "volvo-cars"),
        ("Alfa Romeo", "alfaromeo"),
        ("porshe", "porsche"),
        ("BMW", "bmw"),
    ],
)
def test_bad_brand_suggests_the_closest(brand: str, suggestion: str) -> None:
    assert suggest_brand(brand) == suggestion
    with pytest.raises(InvalidVehicleError) as info:
        validate_vehicle("WBADT43452G296403", brand)
    assert repr(brand) in str(info.value)
    assert f"did you mean {suggestion!r}" in str(info.value)


def test_unrecognisable_brand_lists_valid_ones() -> None:
    with pytest.raises(InvalidVehicleError, match="valid: alfaromeo, audi"):
        validate_vehicle("WBADT43452G296403", "zzz")


def test_error_is_a_value_error_and_an_ingest_error() -> None:
    with pytest.raises(ValueError, match="SHORT"):
        validate_vehicle("SHORT", "bmw")
    assert issubclass(InvalidVehicleError, IngestError)
    assert not InvalidVehicleError(["x"]).retriable


def test_all_problems_reported_at_once_but_bounded() -> None:
    with pytest.raises(InvalidVehicleError) as info:
        validate_vehicles([(f"BAD{i}", "bmw") for i in range(15)])
    assert len(info.value.problems) == 15
    assert "and 5 more" in str(info.value)


def test_every_valid_brand_passes() -> None:
    for brand in BRANDS:
        validate_vehicle("WBADT43452G296403", brand)


def test_odometer_checks_its_unit() -> None:
    with pytest.raises(ValueError, match="kilometers"):
        Odometer(10, "furlongs")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-negative"):
        Odometer(-1)


def test_environments_and_override() -> None:
    production = resolve_endpoint("production")
    assert production.base_url == production.audience == "https://api.high-mobility.com/v1"
    sandbox = resolve_endpoint(Environment.SANDBOX)
    assert sandbox.audience == "https://sandbox.api.high-mobility.com/v1"
    local = resolve_endpoint("production", "http://127.0.0.1:8080/v1/")
    assert local.base_url == local.audience == "http://127.0.0.1:8080/v1"
    assert local.url("/fleets/vehicles") == "http://127.0.0.1:8080/v1/fleets/vehicles"
    with pytest.raises(ConfigError) as info:
        resolve_endpoint("staging")
    assert info.value.key == "api.environment"
    with pytest.raises(ConfigError) as info:
        resolve_endpoint("sandbox", "127.0.0.1:8080")
    assert info.value.key == "api.base_url"
