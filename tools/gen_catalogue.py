"""Generate ``schemas/auto_api_catalogue.json`` from HM's Auto API capability definitions.

Usage (from the repository root, with HM's spec files checked out beside it)::

    python tools/gen_catalogue.py [--specs ../shared/hm-specs] [--out schemas/...json]

Only names and types are extracted (derived data; no descriptions or examples), so the runtime
never needs the spec files. Output shape::

    {"source_commit": "<auto-api git commit>",
     "capabilities": {capability: {property: {"type": str, "unit_type": str | null,
                                              "multiple": bool}}},
     "unit_types": {measurement: [unit, ...]}}

``unit_type`` is the measurement (``length``) of ``unit.*`` properties; ``unit_types`` lists the
units each measurement can arrive in, so the emulator can pick realistic ones. ``multiple`` marks
properties HM sends as a list of items.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import orjson
import yaml

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SPECS = REPO.parent / "shared" / "hm-specs"
DEFAULT_OUT = REPO / "schemas" / "auto_api_catalogue.json"
_UNIT_PREFIX = "unit."
# The specs README records which upstream commit each folder was copied from.
_COMMIT_ROW = re.compile(r"^\|\s*`auto-api/`\s*\|.*\|\s*([0-9a-f]{40})\s*\|\s*$", re.MULTILINE)


def _read_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def source_commit(specs: Path) -> str:
    """The auto-api commit named in the specs README, or ``"unknown"``."""
    readme = specs / "README.md"
    if readme.is_file():
        match = _COMMIT_ROW.search(readme.read_text(encoding="utf-8"))
        if match:
            return match.group(1)
    return "unknown"


def build_catalogue(specs: Path) -> dict[str, Any]:
    """The catalogue as a plain dict, built from ``specs/auto-api``."""
    auto_api = specs / "auto-api"
    capabilities: dict[str, dict[str, dict[str, Any]]] = {}
    for path in sorted((auto_api / "capabilities").glob("*.yml")):
        definition = _read_yaml(path)
        props: dict[str, dict[str, Any]] = {}
        for prop in definition.get("properties") or []:
            kind: str = prop["type"]
            unit_type = kind[len(_UNIT_PREFIX) :] if kind.startswith(_UNIT_PREFIX) else None
            props[prop["name"]] = {
                "type": kind,
                "unit_type": unit_type,
                "multiple": bool(prop.get("multiple", False)),
            }
        capabilities[definition["name"]] = dict(sorted(props.items()))
    units = _read_yaml(auto_api / "misc" / "unit_types.yml")
    unit_types = {
        measurement["name"]: [unit["name"] for unit in measurement["unit_types"]]
        for measurement in units["measurement_types"]
    }
    return {
        "source_commit": source_commit(specs),
        "capabilities": dict(sorted(capabilities.items())),
        "unit_types": dict(sorted(unit_types.items())),
    }


def render(catalogue: dict[str, Any]) -> bytes:
    """Stable, compact bytes for the committed file: one property per line keeps diffs readable."""

    def dumps(value: Any) -> str:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()

    lines = ["{", f'"source_commit": {dumps(catalogue["source_commit"])},', '"capabilities": {']
    capabilities = catalogue["capabilities"]
    for i, (capability, props) in enumerate(sorted(capabilities.items())):
        lines.append(f"{dumps(capability)}: {{")
        entries = [f" {dumps(name)}: {dumps(spec)}" for name, spec in sorted(props.items())]
        lines.append(",\n".join(entries))
        lines.append("}" + ("," if i < len(capabilities) - 1 else ""))
    lines.append("},")
    units = catalogue["unit_types"]
    lines.append('"unit_types": {')
    lines.append(",\n".join(f" {dumps(k)}: {dumps(v)}" for k, v in sorted(units.items())))
    lines.append("}")
    lines.append("}")
    return ("\n".join(line for line in lines if line) + "\n").encode()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--specs", type=Path, default=DEFAULT_SPECS, help="HM spec folder")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="catalogue JSON to write")
    args = parser.parse_args(argv)
    if not (args.specs / "auto-api" / "capabilities").is_dir():
        print(f"no auto-api/capabilities folder under {args.specs}", file=sys.stderr)
        return 2
    catalogue = build_catalogue(args.specs)
    args.out.write_bytes(render(catalogue))
    count = sum(len(props) for props in catalogue["capabilities"].values())
    print(f"wrote {args.out}: {len(catalogue['capabilities'])} capabilities, {count} properties")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
