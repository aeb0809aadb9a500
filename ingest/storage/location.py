"""Where the Parquet output lives: a local folder or an object-store URI.

``[output] path`` is either a local path (``./data``, ``/var/lib/hm-ingest/data``) or a URI that
``pyarrow.fs.FileSystem.from_uri`` understands: ``s3://bucket/prefix``, ``gs://bucket/prefix``,
``abfs://container@account.dfs.core.windows.net/prefix``. Credentials are never settings: pyarrow
takes them from each provider's standard environment variables and files (``AWS_ACCESS_KEY_ID``,
``~/.aws/credentials``, instance metadata; ``GOOGLE_APPLICATION_CREDENTIALS``; Azure's
``AZURE_STORAGE_*``). An S3-compatible store (MinIO, Ceph, moto) is reached through the standard
``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` variables, or query parameters of the URI
(``s3://bucket/prefix?endpoint_override=host:9000&scheme=http``).
"""

from __future__ import annotations

import re
from pathlib import Path

# Schemes handed to pyarrow.fs; "file://" is a local path written the long way.
OBJECT_STORE_SCHEMES = frozenset({"s3", "gs", "gcs", "abfs", "abfss"})
_URI = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<rest>.*)")


def is_uri(value: str | Path) -> bool:
    """Whether ``value`` names an object store (``scheme://...``) rather than a local path."""
    return isinstance(value, str) and _URI.fullmatch(value) is not None


def parse_output_path(value: object) -> Path | str:
    """``[output] path`` as the settings keep it: a ``Path``, or an object-store URI string.

    Meant as the field's pydantic ``BeforeValidator``; raises ``ValueError`` (which pydantic
    reports against the key) for a URI scheme this build cannot write to.
    """
    if isinstance(value, Path):
        return value
    if not isinstance(value, str):
        raise ValueError("must be a local path or an object-store URI such as s3://bucket/prefix")
    match = _URI.fullmatch(value)
    if match is None:
        return Path(value).expanduser()
    scheme = match.group("scheme").lower()
    if scheme == "file":
        return Path(match.group("rest"))
    if scheme not in OBJECT_STORE_SCHEMES:
        raise ValueError(
            f"unsupported URI scheme {scheme!r}; use a local path or one of "
            + ", ".join(f"{s}://" for s in sorted(OBJECT_STORE_SCHEMES))
        )
    bucket = match.group("rest").split("?", 1)[0].split("/", 1)[0]
    if not bucket:
        raise ValueError(f"{value!r} names no bucket; write it like {scheme}://bucket/prefix")
    return value


__all__ = [
    "OBJECT_STORE_SCHEMES",
    "is_uri",
    "parse_output_path",
]
