"""The two Iceberg tables, created from the same schema files as the Parquet output.

``telemetry`` is partitioned by ``day(timestamp)``, ``rejected`` by ``day(received_at)``: the
columns whose UTC date names the ``date=`` folder each file is written to (telemetry falls back to
``received_at`` where ``timestamp`` is null, which Iceberg transforms cannot express; see
:mod:`ingest.iceberg.appender` for what happens to those rows).

Table properties set at creation, and why:

``schema.name-mapping.default``
    The Parquet files carry no Iceberg field ids; engines map their columns by name.
``gc.enabled = false``
    The data files are the plain layout's files too. With garbage collection off, engine
    maintenance (``expire_snapshots``, ``remove_orphan_files``) refuses to delete them, as for
    any table whose files another system owns (Iceberg's ``snapshot`` procedure does the same).
``commit.manifest-merge.enabled = true``
    One append per batch is one small manifest; merging keeps the manifest list short, so query
    planning does not slow down as batches accumulate.
``write.metadata.delete-after-commit.enabled`` / ``write.metadata.previous-versions-max``
    Every append writes a new ``metadata.json``; only the last 100 are kept.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from pyiceberg.catalog import Catalog
from pyiceberg.exceptions import NamespaceAlreadyExistsError, TableAlreadyExistsError
from pyiceberg.partitioning import PartitionField, PartitionSpec
from pyiceberg.schema import Schema, assign_fresh_schema_ids
from pyiceberg.table import Table
from pyiceberg.transforms import DayTransform

from ingest import schemas

TABLE_PROPERTIES = {
    "gc.enabled": "false",
    "commit.manifest-merge.enabled": "true",
    "write.metadata.delete-after-commit.enabled": "true",
    "write.metadata.previous-versions-max": "100",
}


@dataclass(frozen=True, slots=True)
class TableSpec:
    name: str  # also the Parquet writer's table folder
    schema_name: str
    day_column: str  # the table is partitioned by day(<this>)


TABLES = (
    TableSpec("telemetry", schemas.TELEMETRY, "timestamp"),
    TableSpec("rejected", schemas.REJECTED, "received_at"),
)


def ensure_table(catalog: Catalog, namespace: str, spec: TableSpec) -> Table:
    """Load ``<namespace>.<spec.name>``, creating the namespace and the table when missing.

    An existing table is used as it is (an operator may have evolved its partitioning); the
    appender copes with any spec whose fields it can fill from file statistics.
    """
    identifier = (namespace, spec.name)
    if catalog.table_exists(identifier):
        return catalog.load_table(identifier)
    with contextlib.suppress(NamespaceAlreadyExistsError):  # another replica made it
        catalog.create_namespace(namespace)
    schema = iceberg_schema(spec.schema_name)
    source = schema.find_field(spec.day_column)
    partition_spec = PartitionSpec(
        PartitionField(
            source_id=source.field_id,
            field_id=1000,
            transform=DayTransform(),
            name=f"{spec.day_column}_day",
        )
    )
    properties = {
        **TABLE_PROPERTIES,
        "schema.name-mapping.default": schema.name_mapping.model_dump_json(),
    }
    try:
        return catalog.create_table(
            identifier, schema=schema, partition_spec=partition_spec, properties=properties
        )
    except TableAlreadyExistsError:  # another replica created it first
        return catalog.load_table(identifier)


def iceberg_schema(schema_name: str) -> Schema:
    """The Iceberg schema of one of ``schemas/``: ids 1..n in column order, docs kept.

    Iceberg has no 8-bit integers (``int8`` becomes ``int``) and stores timestamps in
    microseconds (``timestamp[ms]`` columns are read and widened by every engine).
    """
    converted = Catalog._convert_schema_if_needed(schemas.arrow_schema(schema_name))
    return assign_fresh_schema_ids(converted)
