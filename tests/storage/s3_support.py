"""A real S3-compatible server on loopback for the tests: moto in server mode, in this process.

In-process (``ThreadedMotoServer``) rather than a ``moto_server`` child so that stopping and
starting it again keeps the buckets and objects: that is how the outage tests take the store away
mid-stream and bring it back with everything it held.
"""

from __future__ import annotations

import uuid
from typing import Any

import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pytest

from ingest.testing.broker import free_port

moto_server = pytest.importorskip(
    "moto.server", reason="moto[server] is a dev dependency: pip install 'moto[server]'"
)


class MotoS3:
    """moto's S3 on ``127.0.0.1:<free port>``; ``stop()``/``start()`` simulate an outage."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server: Any = None

    def start(self) -> None:
        self._server = moto_server.ThreadedMotoServer(
            ip_address="127.0.0.1", port=self.port, verbose=False
        )
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def environment(self) -> dict[str, str]:
        """What a process needs to reach this server with the providers' standard variables."""
        return {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def new_bucket(self) -> str:
        """A fresh bucket (moto keeps every bucket of this process, so names are unique)."""
        name = f"hm-{uuid.uuid4().hex[:16]}"
        filesystem, _ = pafs.FileSystem.from_uri(f"s3://{name}?allow_bucket_creation=true")
        filesystem.create_dir(name)
        return name


def s3_dataset(uri: str, table: str) -> ds.Dataset:
    """``<uri>/<table>`` read back over S3 the way a user would, Hive partitions included."""
    filesystem, base = pafs.FileSystem.from_uri(uri)
    return ds.dataset(
        f"{base}/{table}", filesystem=filesystem, format="parquet", partitioning="hive"
    )


def s3_files(uri: str, table: str) -> list[str]:
    filesystem, base = pafs.FileSystem.from_uri(uri)
    selector = pafs.FileSelector(f"{base}/{table}", recursive=True, allow_not_found=True)
    return sorted(
        i.path for i in filesystem.get_file_info(selector) if i.type == pafs.FileType.File
    )
