"""The desired fleet: which VINs should hold a clearance, read from a CSV or YAML file.

CSV (``.csv``): a header line, then one vehicle per line::

    vin,brand,odometer,odometer_unit,fleet,depot
    WBADT43452G296403,bmw,12000,kilometers,north,berlin

``vin`` and ``brand`` are required columns; ``odometer`` (a whole number) and ``odometer_unit``
(``kilometers``, the default, or ``miles``) are optional; a ``tags`` column holds ``k=v;k2=v2``;
every other column is a tag named after its header (empty cells are left out). Lines starting with
``#`` and blank lines are skipped.

YAML (``.yaml``/``.yml``): a list of mappings, or a mapping with a ``vehicles`` list::

    vehicles:
      - {vin: WBADT43452G296403, brand: bmw, tags: {fleet: north}, odometer: 12000}
      - vin: "12345678901234567"          # quote all-digit VINs, or YAML reads a number
        brand: mercedes-benz
        odometer: {value: 5000, unit: miles}

Every row is checked (VIN syntax, HM's brand strings, odometer, tags, duplicates) and *all*
problems are reported at once in one :class:`~ingest.errors.ConfigError`, one line each:
``file:line: VIN '...': problem; fix``.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from ingest.errors import ConfigError
from ingest.hmapi import Odometer, VehicleRequest
from ingest.hmapi.validation import brand_problem, vin_problem

CSV_SUFFIXES = frozenset({".csv"})
YAML_SUFFIXES = frozenset({".yaml", ".yml"})
ODOMETER_UNITS = ("kilometers", "miles")
_KNOWN_COLUMNS = frozenset({"vin", "brand", "odometer", "odometer_unit", "tags"})
# A file with thousands of bad rows (the wrong file) should not print thousands of lines.
MAX_LISTED_PROBLEMS = 50


@dataclass(frozen=True)
class DesiredVehicle:
    vin: str
    brand: str
    tags: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    odometer: Odometer | None = None

    def to_request(self) -> VehicleRequest:
        return VehicleRequest(self.vin, self.brand, self.tags, self.odometer)


@dataclass(frozen=True)
class _Row:
    """One vehicle as read from the file, before validation."""

    line: int
    vin: Any
    brand: Any
    tags: dict[str, str]
    odometer: Any = None
    odometer_unit: Any = None
    problems: tuple[str, ...] = ()
    # The row has no fields to check (a YAML item that is not a mapping).
    unreadable: bool = False


def load_desired_fleet(path: Path) -> list[DesiredVehicle]:
    """Read and validate the desired fleet in ``path`` (format chosen by suffix)."""
    suffix = path.suffix.lower()
    if suffix not in CSV_SUFFIXES | YAML_SUFFIXES:
        raise ConfigError(
            f"{path}: unknown fleet file type {path.suffix!r}; use a .csv, .yaml or .yml file",
            key="fleet.file",
        )
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: spreadsheets prepend a BOM
    except FileNotFoundError as exc:
        raise ConfigError(
            f"{path}: fleet file does not exist; check fleet.file / --file", key="fleet.file"
        ) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the fleet file ({exc})", key="fleet.file") from exc
    rows = list(_csv_rows(path, text) if suffix in CSV_SUFFIXES else _yaml_rows(path, text))
    return _validate(path, rows)


def _validate(path: Path, rows: list[_Row]) -> list[DesiredVehicle]:
    problems: list[str] = []
    vehicles: list[DesiredVehicle] = []
    first_line: dict[str, int] = {}
    for row in rows:
        found = list(row.problems)
        if row.unreadable:
            problems.extend(f"{path}:{row.line}: VIN (none): {p}" for p in found)
            continue
        vin_issue = _missing(row.vin, "vin") or vin_problem(row.vin)
        if vin_issue:
            found.append(vin_issue.removeprefix(f"VIN {row.vin!r} "))
        brand_issue = _missing(row.brand, "brand") or brand_problem(row.brand)
        if brand_issue:
            found.append(brand_issue)
        odometer = _odometer(row.odometer, row.odometer_unit, found)
        if isinstance(row.vin, str) and not vin_issue:
            if row.vin in first_line:
                found.append(
                    f"duplicate of line {first_line[row.vin]}; list each VIN once (remove one)"
                )
            else:
                first_line[row.vin] = row.line
        if found:
            label = repr(row.vin) if row.vin not in (None, "") else "(none)"
            problems.extend(f"{path}:{row.line}: VIN {label}: {p}" for p in found)
            continue
        vehicles.append(DesiredVehicle(row.vin, row.brand, MappingProxyType(row.tags), odometer))
    if problems:
        shown = problems[:MAX_LISTED_PROBLEMS]
        more = len(problems) - len(shown)
        raise ConfigError(
            f"{path}: {len(problems)} problem(s) in the fleet file; fix them and retry:\n  "
            + "\n  ".join(shown)
            + (f"\n  ... and {more} more" if more else ""),
            key="fleet.file",
        )
    return vehicles


def _missing(value: Any, name: str) -> str | None:
    if value is None or value == "":
        example = "a 17-character VIN" if name == "vin" else "one of HM's brands, e.g. bmw"
        return f"{name} is missing; every vehicle needs {example}"
    return None


def _odometer(value: Any, unit: Any, problems: list[str]) -> Odometer | None:
    if unit is not None and unit not in ODOMETER_UNITS:
        problems.append(f"odometer_unit {unit!r} is unknown; use kilometers or miles")
        return None
    if value is None:
        if unit is not None:
            problems.append("odometer_unit is set but odometer is empty; give both or neither")
        return None
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and value.strip().isdigit() and value.strip().isascii():
        number = int(value.strip())
    if number is None or number < 0:
        problems.append(f"odometer {value!r} is not a whole non-negative number; write e.g. 12000")
        return None
    return Odometer(number, unit or "kilometers")


# -- CSV ---------------------------------------------------------------------------------------


def _uncommented(text: str) -> Iterator[str]:
    # Comment lines become empty lines rather than vanishing, so csv's line numbers stay true.
    for line in io.StringIO(text):
        yield "\n" if line.lstrip().startswith("#") else line


def _csv_rows(path: Path, text: str) -> Iterator[_Row]:
    reader = csv.reader(_uncommented(text))
    header: list[str] | None = None
    for cells in reader:
        if not any(cell.strip() for cell in cells):
            continue
        if header is None:
            header = [_column_name(cell) for cell in cells]
            _check_header(path, reader.line_num, header)
            continue
        yield _csv_row(reader.line_num, header, cells)


def _column_name(cell: str) -> str:
    name = cell.strip()
    return name.lower() if name.lower() in _KNOWN_COLUMNS else name


def _check_header(path: Path, line: int, header: list[str]) -> None:
    missing = [name for name in ("vin", "brand") if name not in header]
    if missing:
        # Spreadsheets in many locales export with ';' between columns.
        hint = "; separate columns with commas, not ';'" if ";" in "".join(header) else ""
        raise ConfigError(
            f"{path}:{line}: the header lacks {' and '.join(missing)}; the first line must name "
            f"the columns, e.g. vin,brand[,odometer,odometer_unit][,tags or tag columns]{hint}",
            key="fleet.file",
        )
    duplicates = sorted({name for name in header if name and header.count(name) > 1})
    if duplicates or "" in header:
        what = f"repeats {', '.join(duplicates)}" if duplicates else "has an empty column name"
        raise ConfigError(
            f"{path}:{line}: the header {what}; give every column one unique name",
            key="fleet.file",
        )


def _csv_row(line: int, header: list[str], cells: list[str]) -> _Row:
    problems: list[str] = []
    if len(cells) > len(header):
        problems.append(
            f"has {len(cells)} cells but the header names {len(header)} columns; "
            "quote cells that contain commas"
        )
    values = {name: cells[i].strip() if i < len(cells) else "" for i, name in enumerate(header)}
    tags = _parse_tag_list(values.get("tags", ""), problems)
    for name, value in values.items():
        if name not in _KNOWN_COLUMNS and value:
            tags[name] = value
    return _Row(
        line=line,
        vin=values["vin"],
        brand=values["brand"],
        tags=tags,
        odometer=values.get("odometer") or None,
        odometer_unit=values.get("odometer_unit") or None,
        problems=tuple(problems),
    )


def _parse_tag_list(text: str, problems: list[str]) -> dict[str, str]:
    tags: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(";"))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"tag {item!r} is not key=value; write tags as k=v;k2=v2")
            continue
        tags[key.strip()] = value.strip()
    return tags


# -- YAML --------------------------------------------------------------------------------------


def _yaml_rows(path: Path, text: str) -> Iterator[_Row]:
    try:
        # Composed once for line numbers, loaded once for values: same document, same order.
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}", key="fleet.file") from exc
    if data is None:
        return
    items, nodes = data, root
    if isinstance(data, dict) and isinstance(root, yaml.MappingNode):
        if set(data) != {"vehicles"}:
            raise ConfigError(
                f"{path}: a YAML fleet file is a list of vehicles or a mapping with only a "
                f"'vehicles' list; found keys {sorted(map(str, data))}",
                key="fleet.file",
            )
        items = data["vehicles"]
        if items is None:
            return
        nodes = next(value for key, value in root.value if key.value == "vehicles")
    if not isinstance(items, list) or not isinstance(nodes, yaml.SequenceNode):
        raise ConfigError(
            f"{path}: expected a list of vehicles (or 'vehicles:' holding one), found "
            f"{type(items).__name__}",
            key="fleet.file",
        )
    lines = [node.start_mark.line + 1 for node in nodes.value]
    for line, item in zip(lines, items, strict=True):
        yield _yaml_row(line, item)


def _yaml_row(line: int, item: Any) -> _Row:
    if not isinstance(item, dict):
        problem = "is not a mapping with vin and brand; write - {vin: ..., brand: ...}"
        return _Row(line, None, None, {}, problems=(problem,), unreadable=True)
    problems: list[str] = []
    unknown = sorted(str(key) for key in item if key not in _KNOWN_COLUMNS)
    if unknown:
        problems.append(
            f"unknown key(s) {', '.join(unknown)}; use vin, brand, tags, odometer, odometer_unit"
        )
    vin = item.get("vin")
    if isinstance(vin, int) and not isinstance(vin, bool):
        # YAML reads an all-digit VIN as a number (and drops leading zeros): make it a string.
        problems.append('is a number in YAML; quote it (vin: "...")')
        vin = str(vin)
    tags = _yaml_tags(item.get("tags"), problems)
    odometer, unit = item.get("odometer"), item.get("odometer_unit")
    if isinstance(odometer, dict):
        unit = odometer.get("unit", unit)
        odometer = odometer.get("value")
    return _Row(line, vin, item.get("brand"), tags, odometer, unit, tuple(problems))


def _yaml_tags(value: Any, problems: list[str]) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.append("tags must be a mapping of names to values, e.g. tags: {fleet: north}")
        return {}
    tags: dict[str, str] = {}
    for key, item in value.items():
        if isinstance(item, str | int | float) and not isinstance(item, bool):
            tags[str(key)] = str(item)
        else:
            problems.append(f"tag {key!r} has a {type(item).__name__} value; use a plain string")
    return tags


__all__ = ["DesiredVehicle", "load_desired_fleet"]
