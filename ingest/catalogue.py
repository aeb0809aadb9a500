"""The Auto API catalogue: which capabilities and properties HM defines, with types and units.

Loaded from ``schemas/auto_api_catalogue.json``, which ``tools/gen_catalogue.py`` derives from HM's
``auto-api/capabilities/*.yml``; the runtime never reads HM's spec files. The decoder uses it only
to count properties it does not know (they are still ingested); the emulator uses it to pick
realistic property names and units.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from types import MappingProxyType

import orjson

from ingest.errors import SchemaError

CATALOGUE_FILE = "auto_api_catalogue.json"


@dataclass(frozen=True, slots=True)
class PropertySpec:
    """One property: Auto API type (``unit.length``, ``types.coordinates``, ``enum``...),
    its measurement when it is a unit value, and whether HM sends it as a list of items."""

    type: str
    unit_type: str | None
    multiple: bool


@dataclass(frozen=True, slots=True)
class Catalogue:
    source_commit: str
    capabilities: Mapping[str, Mapping[str, PropertySpec]]
    unit_types: Mapping[str, tuple[str, ...]]
    known: frozenset[tuple[str, str]]


@functools.cache
def load() -> Catalogue:
    """The packaged catalogue, parsed once."""
    resource = resources.files("ingest").joinpath("_schemas", CATALOGUE_FILE)
    try:
        raw = orjson.loads(resource.read_bytes())
    except FileNotFoundError as exc:
        raise SchemaError(
            f"no {CATALOGUE_FILE} in the package's schemas folder; run tools/gen_catalogue.py"
        ) from exc
    except orjson.JSONDecodeError as exc:
        raise SchemaError(f"{CATALOGUE_FILE} is not valid JSON: {exc}") from exc
    try:
        capabilities = {
            capability: MappingProxyType(
                {
                    name: PropertySpec(spec["type"], spec["unit_type"], bool(spec["multiple"]))
                    for name, spec in props.items()
                }
            )
            for capability, props in raw["capabilities"].items()
        }
        unit_types = {name: tuple(units) for name, units in raw["unit_types"].items()}
        source_commit = str(raw["source_commit"])
    except (KeyError, TypeError, AttributeError) as exc:
        raise SchemaError(f"{CATALOGUE_FILE} is malformed ({exc!r}); regenerate it") from exc
    known = frozenset((cap, prop) for cap, props in capabilities.items() for prop in props)
    return Catalogue(
        source_commit, MappingProxyType(capabilities), MappingProxyType(unit_types), known
    )


def is_known(capability: str, prop: str) -> bool:
    """Whether HM's Auto API defines ``prop`` in ``capability``."""
    return (capability, prop) in load().known


_EMPTY: Mapping[str, PropertySpec] = MappingProxyType({})


def properties(capability: str) -> Mapping[str, PropertySpec]:
    """The properties of ``capability`` by name; empty when the capability is unknown."""
    return load().capabilities.get(capability, _EMPTY)


def capabilities() -> tuple[str, ...]:
    """Every capability name, sorted."""
    return tuple(sorted(load().capabilities))


def units(unit_type: str) -> tuple[str, ...]:
    """The units a measurement (``length``) can be sent in; empty when unknown."""
    return load().unit_types.get(unit_type, ())
