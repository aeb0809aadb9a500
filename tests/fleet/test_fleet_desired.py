"""Reading the desired fleet file: CSV and YAML, and every kind of bad row reported at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingest.errors import ConfigError
from ingest.fleet import DesiredVehicle, load_desired_fleet
from ingest.hmapi import Odometer

VIN_A = "WBADT43452G296403"
VIN_B = "WBADT43452G296404"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_desired_fleet(path)
    assert caught.value.key == "fleet.file"
    return str(caught.value).splitlines()[1:]


def test_csv_with_odometer_tag_columns_and_tags_column(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "fleet.csv",
        "\ufeff# exported from the fleet sheet\n"
        "VIN,Brand,odometer,odometer_unit,depot,tags\n"
        f"{VIN_A},bmw,12000,miles,berlin,team=a;cost=7\n"
        "\n"
        f" {VIN_B} ,mercedes-benz,,,,\n",
    )
    assert load_desired_fleet(path) == [
        DesiredVehicle(VIN_A, "bmw", {"team": "a", "cost": "7", "depot": "berlin"},
                       Odometer(12000, "miles")),
        DesiredVehicle(VIN_B, "mercedes-benz", {}, None),
    ]  # fmt: skip


@pytest.mark.parametrize("top", ["list", "mapping"])
def test_yaml_list_or_vehicles_mapping(tmp_path: Path, top: str) -> None:
    items = (
        f"- {{vin: {VIN_A}, brand: bmw, tags: {{team: a, year: 2020}}, odometer: 5}}\n"
        f"- vin: {VIN_B}\n"
        "  brand: audi\n"
        "  odometer: {value: 7, unit: miles}\n"
    )
    text = items if top == "list" else "vehicles:\n" + "".join(f"  {line}\n" for line in
                                                               items.splitlines())  # fmt: skip
    fleet = load_desired_fleet(write(tmp_path, "fleet.yaml", text))
    assert fleet == [
        DesiredVehicle(VIN_A, "bmw", {"team": "a", "year": "2020"}, Odometer(5, "kilometers")),
        DesiredVehicle(VIN_B, "audi", {}, Odometer(7, "miles")),
    ]


def test_csv_reports_every_bad_row_with_file_line_and_fix(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "fleet.csv",
        "vin,brand,odometer,odometer_unit,tags\n"  # line 1
        f"{VIN_A},bmw,,,\n"  # 2: fine
        "WBADT43452G29640,bmw,,,\n"  # 3: 16 characters
        "wbadt43452g296405,bmw,,,\n"  # 4: lower case
        "WBADT43452G2964O6,bmw,,,\n"  # 5: letter O
        "WBADT43452G296407,bwm,,,\n"  # 6: brand typo
        "WBADT43452G296408,,,,\n"  # 7: brand missing
        ",bmw,,,\n"  # 8: vin missing
        f"{VIN_A},bmw,,,\n"  # 9: duplicate of line 2
        "WBADT43452G296409,bmw,12k,,\n"  # 10: odometer not a number
        "WBADT43452G296410,bmw,,miles,\n"  # 11: unit without odometer
        "WBADT43452G296411,bmw,5,furlongs,\n"  # 12: unknown unit
        "WBADT43452G296412,bmw,,,team\n"  # 13: tag without '='
        "WBADT43452G296413,bmw,,,,extra\n",  # 14: more cells than columns
    )
    lines = problems(path)
    expected = [
        f"{path}:3: VIN 'WBADT43452G29640': has 16 characters; a VIN has 17",
        f"{path}:4: VIN 'wbadt43452g296405': has lower-case letters; write it as "
        "'WBADT43452G296405'",
        f"{path}:5: VIN 'WBADT43452G2964O6': contains 'O'",
        f"{path}:6: VIN 'WBADT43452G296407': brand 'bwm' is not one HM accepts; did you mean "
        "'bmw'?",
        f"{path}:7: VIN 'WBADT43452G296408': brand is missing",
        f"{path}:8: VIN (none): vin is missing",
        f"{path}:9: VIN '{VIN_A}': duplicate of line 2",
        f"{path}:10: VIN 'WBADT43452G296409': odometer '12k' is not a whole non-negative number",
        f"{path}:11: VIN 'WBADT43452G296410': odometer_unit is set but odometer is empty",
        f"{path}:12: VIN 'WBADT43452G296411': odometer_unit 'furlongs' is unknown; use "
        "kilometers or miles",
        f"{path}:13: VIN 'WBADT43452G296412': tag 'team' is not key=value",
        f"{path}:14: VIN 'WBADT43452G296413': has 6 cells but the header names 5 columns",
    ]
    assert len(lines) == len(expected), lines
    for want, got in zip(expected, lines, strict=True):
        assert got.strip().startswith(want), (want, got)


def test_yaml_reports_every_bad_item_with_its_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "fleet.yml",
        "vehicles:\n"  # 1
        f"  - {{vin: {VIN_A}, brand: bmw}}\n"  # 2: fine
        "  - vin: 12345678901234567\n"  # 3: a number, not a string
        "    brand: bmw\n"
        f"  - {{vin: {VIN_B}, brand: bmw, tag: {{a: b}}}}\n"  # 5: unknown key
        "  - {vin: WBADT43452G296405, brand: bmw, tags: [a, b]}\n"  # 6: tags not a mapping
        "  - just a string\n"  # 7: not a mapping
        "  - {vin: WBADT43452G296406, brand: bmw, tags: {a: {b: c}}}\n",  # 8: nested tag value
    )
    lines = [line.strip() for line in problems(path)]
    assert lines[0].startswith(f"{path}:3: VIN '12345678901234567': is a number in YAML; quote it")
    assert lines[1].startswith(f"{path}:5: VIN '{VIN_B}': unknown key(s) tag")
    assert lines[2].startswith(f"{path}:6: VIN 'WBADT43452G296405': tags must be a mapping")
    assert lines[3].startswith(f"{path}:7: VIN (none): is not a mapping")
    assert lines[4].startswith(f"{path}:8: VIN 'WBADT43452G296406': tag 'a' has a dict value")


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("f.csv", "serial,brand\nX,bmw\n", "f.csv:1: the header lacks vin"),
        ("f.csv", "vin,brand,team,team\n", "f.csv:1: the header repeats team"),
        ("f.csv", "vin;brand\n", "separate columns with commas, not ';'"),
        ("f.json", "[]", "unknown fleet file type '.json'"),
        ("f.yaml", "vehicles: [\n", "not valid YAML"),
        ("f.yaml", "cars: []\n", "found keys ['cars']"),
        ("f.yaml", "vehicles: {a: 1}\n", "expected a list of vehicles"),
    ],
)
def test_file_level_problems(tmp_path: Path, name: str, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=r".*") as caught:
        load_desired_fleet(write(tmp_path, name, text))
    assert message in str(caught.value)


def test_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_desired_fleet(tmp_path / "nowhere.csv")


@pytest.mark.parametrize(("name", "text"), [("f.csv", ""), ("f.csv", "vin,brand\n"),
                                            ("f.yaml", ""), ("f.yaml", "vehicles:\n")])  # fmt: skip
def test_empty_files_are_an_empty_fleet(tmp_path: Path, name: str, text: str) -> None:
    assert load_desired_fleet(write(tmp_path, name, text)) == []


def test_many_problems_are_cut_off_with_a_count(tmp_path: Path) -> None:
    rows = "".join(f"SHORT{n},bmw\n" for n in range(80))
    lines = problems(write(tmp_path, "f.csv", "vin,brand\n" + rows))
    assert len(lines) == 51
    assert lines[-1].strip() == "... and 30 more"
