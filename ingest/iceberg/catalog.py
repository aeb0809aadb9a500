"""Opening the Iceberg catalog that ``[iceberg]`` names, and where its files live.

* ``catalog = "sql"`` (default): pyiceberg's SQL catalog. Without ``uri`` it is an embedded
  SQLite file, ``<[state] path>/iceberg-catalog.sqlite3``: nothing to run, and the catalog is
  backed up with the rest of the daemon's state. ``uri`` may name any SQLAlchemy database the
  engines can reach too (``postgresql+psycopg://user@host/db``), which is what Spark's and
  Trino's JDBC catalogs read.
* ``catalog = "rest"``: an Iceberg REST catalog at ``uri`` (Polaris, Nessie, Lakekeeper, Unity,
  Tabular...); ``warehouse`` is then whatever that server calls a warehouse.
* ``catalog = "glue"``: AWS Glue, with credentials and region from the standard AWS environment.

``warehouse`` defaults to ``<[output] path>/iceberg``: table metadata (and the few data files
pyiceberg writes itself, see :mod:`ingest.iceberg.appender`) sit beside the Parquet output, on
the same disk or bucket. ``properties`` are passed through to pyiceberg unchanged (credentials,
``s3.endpoint``, ``s3.region``...), and override anything derived here.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePath
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

from ingest.config import Settings
from ingest.errors import ConfigError
from ingest.storage.location import is_uri

if TYPE_CHECKING:
    from pyiceberg.catalog import Catalog

CATALOG_NAME = "hm_ingest"  # Spark's and Trino's JDBC catalogs must use the same name
SQLITE_FILE = "iceberg-catalog.sqlite3"
INSTALL_HINT = "install the extra: pip install 'hm-fleet-ingest[iceberg]'"


def catalog_properties(settings: Settings) -> dict[str, str]:
    """The pyiceberg properties of the configured catalog (no connection is made)."""
    iceberg = settings.iceberg
    properties = dict(io_properties(settings.output.path))
    warehouse = iceberg.warehouse or default_warehouse(settings.output.path)
    if iceberg.catalog == "sql":
        sqlite = settings.state.path.absolute() / SQLITE_FILE
        properties["uri"] = iceberg.uri or f"sqlite:///{sqlite}"
        properties["warehouse"] = warehouse
    elif iceberg.catalog == "rest":
        if not iceberg.uri:
            raise ConfigError(
                "iceberg.catalog = 'rest' needs iceberg.uri (environment HM_INGEST_ICEBERG_URI), "
                "the REST catalog's base URL such as https://catalog.example.com/api/catalog",
                key="iceberg.uri",
            )
        properties["uri"] = iceberg.uri
        if iceberg.warehouse:  # the server's own default otherwise
            properties["warehouse"] = iceberg.warehouse
    else:  # glue: tables are created under the warehouse unless their database has a location
        properties["warehouse"] = warehouse
    properties.update(iceberg.properties)
    return properties


def open_catalog(settings: Settings) -> Catalog:
    """Connect to the configured catalog; pyiceberg errors propagate (the caller classifies)."""
    properties = catalog_properties(settings)
    kind = settings.iceberg.catalog
    try:
        if kind == "sql":
            if not settings.iceberg.uri:  # the embedded SQLite file: its folder must exist
                settings.state.path.mkdir(parents=True, exist_ok=True)
            from pyiceberg.catalog.sql import SqlCatalog  # noqa: PLC0415 -- optional extra

            return SqlCatalog(CATALOG_NAME, **properties)
        if kind == "rest":
            from pyiceberg.catalog.rest import RestCatalog  # noqa: PLC0415

            return RestCatalog(CATALOG_NAME, **properties)
        from pyiceberg.catalog.glue import GlueCatalog  # noqa: PLC0415 -- needs boto3

        return GlueCatalog(CATALOG_NAME, **properties)
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"[iceberg] enabled with catalog {kind!r} needs {exc.name}: {INSTALL_HINT}"
            + (" (and boto3 for glue)" if kind == "glue" else ""),
            key="iceberg.enabled",
        ) from exc


def default_warehouse(output: Path | str) -> str:
    """``<output>/iceberg`` as a URI pyiceberg and the engines understand."""
    if isinstance(output, Path) or not is_uri(output):
        return _local_uri(Path(output) / "iceberg")
    return output.split("?", 1)[0].rstrip("/") + "/iceberg"


def io_properties(output: Path | str) -> dict[str, str]:
    """pyiceberg FileIO properties that reach the same object store as ``[output] path``.

    The endpoint comes from the output URI's pyarrow options (``endpoint_override``, ``scheme``)
    or the standard ``AWS_ENDPOINT_URL[_S3]``, the region from ``region`` or ``AWS_REGION`` /
    ``AWS_DEFAULT_REGION``; pyiceberg wants them as properties. Without a region pyiceberg asks
    AWS where the bucket is, a request that fails (slowly) against S3-compatible stores.
    """
    if isinstance(output, Path) or not is_uri(output) or not output.lower().startswith("s3://"):
        return {}
    query = {k: v[-1] for k, v in parse_qs(output.partition("?")[2]).items()}
    properties: dict[str, str] = {}
    if "endpoint_override" in query:
        endpoint = query["endpoint_override"]
        if "://" not in endpoint:
            endpoint = f"{query.get('scheme', 'https')}://{endpoint}"
        properties["s3.endpoint"] = endpoint
    else:
        # pyarrow's from_uri (the Parquet writer) honours these; pyiceberg's S3 client does not.
        from_env = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if from_env:
            properties["s3.endpoint"] = from_env
    region = (
        query.get("region") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    )
    if region:
        properties["s3.region"] = region
    return properties


def file_uri(output: Path | str, path: PurePath) -> str:
    """The URI of a file the Parquet writer wrote (``WrittenFile.path``) under ``output``.

    Local files become ``file:///abs/path``; object-store files are the store's path
    (``bucket/prefix/...``) under the output URI's scheme.
    """
    if isinstance(output, Path) or not is_uri(output):
        return _local_uri(Path(path))
    scheme = output.split("://", 1)[0].lower()
    return f"{scheme}://{path.as_posix()}"


def _local_uri(path: Path) -> str:
    # Not Path.as_uri(): it percent-encodes the "=" of "date=2026-11-28", and pyiceberg opens
    # file URIs without decoding them. Engines read "file:///a/date=2026-11-28/x" as it is.
    return f"file://{path.absolute().as_posix()}"
