"""``[output] path``: local paths stay Paths, object-store URIs stay URIs, the rest is refused."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import pyarrow.fs as pafs
import pytest

from ingest.errors import SinkError
from ingest.storage import OutputStore, is_uri, parse_output_path


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("./data", Path("data")),
        ("/var/lib/hm-ingest/data", Path("/var/lib/hm-ingest/data")),
        ("file:///srv/data", Path("/srv/data")),
        ("s3://bucket/prefix", "s3://bucket/prefix"),
        ("s3://bucket", "s3://bucket"),
        ("gs://bucket/a/b", "gs://bucket/a/b"),
        ("s3://bucket/p?endpoint_override=127.0.0.1:9000&scheme=http", None),
    ],
)
def test_parse_keeps_paths_and_uris_apart(value: str, expected: Path | str | None) -> None:
    parsed = parse_output_path(value)
    assert parsed == (value if expected is None else expected)
    assert is_uri(parsed) == isinstance(parsed, str)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("ftp://host/data", "unsupported URI scheme 'ftp'.*s3://"),
        ("s3://", "names no bucket"),
        ("s3:///prefix", "names no bucket"),
    ],
)
def test_parse_refuses_what_cannot_be_written(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_output_path(value)


def test_local_store_keeps_the_folder_as_given(tmp_path: Path) -> None:
    store = OutputStore.open(tmp_path / "data")
    assert store.local_root == tmp_path / "data"
    assert store.is_local
    assert store.list_files(store.join("telemetry")) == []
    assert store.describe(store.join("telemetry", "x")) == f"{tmp_path / 'data'}/telemetry/x"


def test_object_store_describes_paths_by_uri_without_query() -> None:
    store = OutputStore.open("s3://bucket/pre/fix?region=eu-central-1&endpoint_override=h:1")
    assert not store.is_local
    assert store.base == "bucket/pre/fix"
    assert store.describe(store.join("telemetry", "a.parquet")) == (
        "s3://bucket/pre/fix/telemetry/a.parquet"
    )


def test_unusable_uri_is_a_permanent_error() -> None:
    with pytest.raises(SinkError, match="cannot open output s3://bucket") as caught:
        OutputStore.open("s3://bucket/p?no_such_option=1")
    assert not caught.value.retriable


class _CreatedWhileListing:
    """A filesystem on which the first listings fail the way pyarrow's does when the folder is
    created between its two looks (missing when listed, there when checked again)."""

    def __init__(self, real: pafs.FileSystem, failures: int) -> None:
        self.real = real
        self.failures = failures

    def get_file_info(self, what: Any) -> Any:
        if isinstance(what, pafs.FileSelector) and self.failures:
            self.failures -= 1
            raise FileNotFoundError(f"Cannot list directory '{what.base_dir}'")
        return self.real.get_file_info(what)


def test_listing_a_folder_created_meanwhile_is_tried_again(tmp_path: Path) -> None:
    (tmp_path / "telemetry").mkdir()
    (tmp_path / "telemetry" / "part.parquet").write_bytes(b"x")
    local = OutputStore.open(tmp_path)
    racing = replace(
        local, filesystem=cast(pafs.FileSystem, _CreatedWhileListing(local.filesystem, 1))
    )
    files = racing.list_files(racing.join("telemetry"))
    assert [Path(f.path).name for f in files] == ["part.parquet"]


def test_a_folder_that_keeps_failing_to_list_is_an_error(tmp_path: Path) -> None:
    local = OutputStore.open(tmp_path)
    failing = replace(
        local, filesystem=cast(pafs.FileSystem, _CreatedWhileListing(local.filesystem, 99))
    )
    with pytest.raises(SinkError, match="could not list"):
        failing.list_files(failing.join("telemetry"))


def test_listing_partitions_created_meanwhile_is_tried_again(tmp_path: Path) -> None:
    (tmp_path / "telemetry" / "date=2026-10-01").mkdir(parents=True)
    local = OutputStore.open(tmp_path)
    racing = replace(
        local, filesystem=cast(pafs.FileSystem, _CreatedWhileListing(local.filesystem, 1))
    )
    folders = racing.list_folders(racing.join("telemetry"))
    assert [Path(f).name for f in folders] == ["date=2026-10-01"]
