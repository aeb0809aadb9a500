"""Arrow table schemas loaded from the versioned JSON files in ``schemas/``.

The JSON files are the single source of truth: the Parquet writer uses exactly the schema built
here, and the README's column tables are generated from the same files' ``doc`` fields.
"""

from __future__ import annotations

import functools
import re
from importlib import resources
from typing import Any

import orjson
import pyarrow as pa

from ingest.errors import SchemaError

_TIMESTAMP = re.compile(r"timestamp\[(ms|us), tz=UTC\]")
_SIMPLE_TYPES: dict[str, pa.DataType] = {
    "string": pa.string(),
    "binary": pa.binary(),
    "bool": pa.bool_(),
    "int8": pa.int8(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "float64": pa.float64(),
}

TELEMETRY = "telemetry.v1"
REJECTED = "rejected.v1"


def _arrow_type(spec: str) -> pa.DataType:
    if spec in _SIMPLE_TYPES:
        return _SIMPLE_TYPES[spec]
    match = _TIMESTAMP.fullmatch(spec)
    if match:
        # Milli/microseconds only: nanosecond timestamps overflow in Spark and older engines.
        return pa.timestamp(match.group(1), tz="UTC")
    raise SchemaError(f"unsupported column type {spec!r}; use one of {sorted(_SIMPLE_TYPES)}")


def load_definition(name: str) -> dict[str, Any]:
    """The raw JSON definition of schema ``name`` (e.g. ``"telemetry.v1"``)."""
    resource = resources.files("ingest").joinpath("_schemas", f"{name}.json")
    try:
        data: dict[str, Any] = orjson.loads(resource.read_bytes())
    except FileNotFoundError as exc:
        raise SchemaError(f"no schema file {name}.json in the package's schemas folder") from exc
    return data


@functools.cache
def arrow_schema(name: str) -> pa.Schema:
    """The Arrow schema of table ``name``, with field docs kept as field metadata."""
    definition = load_definition(name)
    fields = []
    for field in definition["fields"]:
        metadata = {"doc": field["doc"]} if "doc" in field else None
        fields.append(
            pa.field(field["name"], _arrow_type(field["type"]), field["nullable"], metadata)
        )
    return pa.schema(
        fields, metadata={"table": definition["table"], "version": str(definition["version"])}
    )


@functools.cache
def dictionary_columns(name: str) -> tuple[str, ...]:
    """Columns whose values repeat a lot and are dictionary-encoded in Parquet."""
    return tuple(f["name"] for f in load_definition(name)["fields"] if f.get("dictionary"))
