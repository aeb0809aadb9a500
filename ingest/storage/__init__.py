"""Output storage: local folders and object stores (S3, GCS, Azure) behind one interface."""

from ingest.storage.location import (
    OBJECT_STORE_SCHEMES,
    is_uri,
    parse_output_path,
)
from ingest.storage.store import OutputStore, StoredFile

__all__ = [
    "OBJECT_STORE_SCHEMES",
    "OutputStore",
    "StoredFile",
    "is_uri",
    "parse_output_path",
]
