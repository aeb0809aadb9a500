"""Which catalog and warehouse ``[iceberg]`` settings open, and a catalog in PostgreSQL."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pytest

from ingest.errors import ConfigError, SinkError
from ingest.iceberg import open_tables
from ingest.iceberg.catalog import catalog_properties, file_uri, io_properties
from tests.iceberg.support import (
    commit_groups,
    keys,
    load,
    lsn_summaries,
    messages,
    plain_rows,
    settings_for,
)

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"


def test_default_catalog_is_sqlite_in_the_state_folder(tmp_path: Path) -> None:
    properties = catalog_properties(settings_for(tmp_path))
    assert properties["uri"] == f"sqlite:///{tmp_path / 'state' / 'iceberg-catalog.sqlite3'}"
    assert properties["warehouse"] == f"file://{tmp_path / 'data' / 'iceberg'}"


def test_object_store_output_gives_the_warehouse_and_endpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    output = "s3://bucket/prefix?endpoint_override=minio:9000&scheme=http&region=eu-west-1"
    properties = catalog_properties(settings_for(tmp_path, output=output))
    assert properties["warehouse"] == "s3://bucket/prefix/iceberg"
    assert properties["s3.endpoint"] == "http://minio:9000"
    assert properties["s3.region"] == "eu-west-1"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9999")
    assert io_properties("s3://bucket/prefix")["s3.endpoint"] == "http://127.0.0.1:9999"
    assert file_uri(output, PurePosixPath("bucket/prefix/telemetry/x.parquet")) == (
        "s3://bucket/prefix/telemetry/x.parquet"
    )


def test_explicit_properties_win(tmp_path: Path) -> None:
    settings = settings_for(
        tmp_path,
        iceberg={"warehouse": "s3://elsewhere/wh", "properties": {"s3.region": "us-west-2"}},
    )
    properties = catalog_properties(settings)
    assert properties["warehouse"] == "s3://elsewhere/wh"
    assert properties["s3.region"] == "us-west-2"


def test_rest_catalog_without_uri_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"iceberg.catalog = 'rest' needs iceberg.uri"):
        open_tables(settings_for(tmp_path, iceberg={"catalog": "rest"}))


def test_unreachable_rest_catalog_is_retried_not_fatal(tmp_path: Path) -> None:
    """The catalog is reached at the first append: an outage is a retriable sink error."""
    tables = open_tables(
        settings_for(tmp_path, iceberg={"catalog": "rest", "uri": "http://127.0.0.1:9"})
    )
    with pytest.raises(SinkError) as raised:
        tables.holds("telemetry", 1, 10)
    assert raised.value.retriable


@pytest.fixture
def pg_catalog_url() -> Iterator[str]:
    psycopg = pytest.importorskip("psycopg", reason="psycopg 3 is not installed")
    try:
        admin = psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL at 127.0.0.1:5432 is unreachable: {exc}")
    schema = f"hm_iceberg_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield (
            f"postgresql+psycopg://postgres@127.0.0.1:5432/test?options=-csearch_path%3D{schema}"
        )
    finally:
        admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
        admin.close()


def test_sql_catalog_in_postgresql(tmp_path: Path, pg_catalog_url: str) -> None:
    """The catalog engines share (Spark's and Trino's JDBC catalogs read these tables)."""
    settings = settings_for(tmp_path, iceberg={"uri": pg_catalog_url})
    batch = messages(30)
    commit_groups(settings, [batch[:15], batch[15:]])
    table = load(settings, "telemetry")
    assert lsn_summaries(table) == [15, 30]
    assert keys(table.scan().to_arrow()) == keys(plain_rows(tmp_path / "data", "telemetry"))
    assert not (tmp_path / "state" / "iceberg-catalog.sqlite3").exists()
