"""Optional Apache Iceberg output: every committed batch also becomes an Iceberg snapshot.

Enabled by ``[iceberg] enabled = true``; needs the ``iceberg`` extra (pyiceberg). The tables
``<namespace>.telemetry`` and ``<namespace>.rejected`` register the Parquet files the sink writes
(no second copy), so Spark, Trino, Athena and DuckDB query one consistent table without listing
folders. See docs/iceberg.md, :mod:`ingest.iceberg.appender` (what is appended and how replays
stay idempotent) and :mod:`ingest.iceberg.catalog` (which catalog, which warehouse).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from ingest.config import Settings
from ingest.errors import ConfigError
from ingest.iceberg.catalog import INSTALL_HINT, catalog_properties, file_uri, open_catalog

if TYPE_CHECKING:
    from ingest.iceberg.appender import IcebergTables


def open_tables(settings: Settings) -> IcebergTables:
    """The appender for ``settings``; checks the settings now, connects at the first append."""
    try:
        from ingest.iceberg.appender import IcebergTables  # noqa: PLC0415 -- needs pyiceberg
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"[iceberg] enabled needs pyiceberg ({exc.name} is missing): {INSTALL_HINT}",
            key="iceberg.enabled",
        ) from exc
    catalog_properties(settings)  # a REST catalog without a uri fails here, before any batch
    return IcebergTables(
        functools.partial(open_catalog, settings),
        namespace=settings.iceberg.namespace,
        replica=settings.replica.id,
        file_uri=functools.partial(file_uri, settings.output.path),
        keep_snapshots=settings.iceberg.keep_snapshots,
    )


__all__ = ["open_tables"]
