"""The output root as a filesystem: list, read, upload whole objects, delete.

One :class:`OutputStore` per ``[output] path``. Both kinds go through ``pyarrow.fs`` for listing,
reading and deleting, so the compaction command works the same on either; they differ where
durability does:

* a **local folder** is written by :class:`~ingest.parquet.PartitionedWriter` itself (temporary
  file, fsync, rename, folder fsync); deletions here fsync the folders they touch;
* an **object store** gets each file as one complete object (:meth:`OutputStore.put`): the bytes
  are encoded in memory first and handed over in one write, so the object appears whole or not at
  all. A multipart upload (large objects) is completed only after every part succeeded; one cut
  short is invisible to readers (set an ``AbortIncompleteMultipartUpload`` lifecycle rule so its
  parts are eventually freed). There is no rename: the deterministic name is written directly,
  and re-uploading a name replaces the object with identical content.

Every error is a :class:`~ingest.errors.SinkError`; store errors are retriable (an outage, a
revoked credential put back, a bucket created late all heal without a restart).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ingest.errors import SinkError
from ingest.storage.location import is_uri

# Deletes in flight at once on an object store (compaction removes hundreds of inputs).
DELETE_CONCURRENCY = 16
# Listings that meet a folder being created meanwhile (see list_files) are tried this often.
LIST_ATTEMPTS = 3
# Hidden (a leading "."): query engines and pyarrow.dataset skip it should one be left behind.
PROBE_PREFIX = ".hm-ingest-probe-"


@dataclass(frozen=True, slots=True)
class StoredFile:
    """One file under the root: its filesystem path, size in bytes and modification time."""

    path: str
    size: int
    mtime_ns: int | None

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def folder(self) -> str:
        return self.path.rsplit("/", 1)[0]


@dataclass(frozen=True, slots=True)
class OutputStore:
    """``filesystem`` and the ``base`` path in it that ``[output] path`` names."""

    filesystem: pafs.FileSystem
    base: str
    display: str  # what messages show: the folder or the URI without its query string
    local_root: Path | None  # the folder as given, for local roots

    @classmethod
    def open(cls, location: Path | str) -> OutputStore:
        """The store for a local ``Path`` or an object-store URI (see ``ingest.storage.location``).

        Raises ``SinkError`` (not retriable) when pyarrow cannot make a filesystem of the URI.
        """
        if isinstance(location, Path) or not is_uri(location):
            root = Path(location)
            return cls(pafs.LocalFileSystem(), str(root.absolute()), str(root), root)
        try:
            filesystem, base = pafs.FileSystem.from_uri(_tuned(location))
        except (OSError, ValueError, pa.ArrowException) as exc:
            raise SinkError(
                f"cannot open output {_without_query(location)}: {exc}; check the URI and that "
                "this pyarrow build supports its scheme",
                retriable=False,
            ) from exc
        return cls(filesystem, base.rstrip("/"), _without_query(location).rstrip("/"), None)

    @property
    def is_local(self) -> bool:
        return self.local_root is not None

    def join(self, *parts: str) -> str:
        return "/".join([self.base, *parts])

    def describe(self, path: str) -> str:
        """``path`` as users know it: under the folder or the URI they configured."""
        relative = path.removeprefix(self.base).lstrip("/")
        return f"{self.display}/{relative}" if relative else self.display

    def probe(self) -> str | None:
        """Why the daemon could not commit files here (None: it can), for ``hm-ingest check``.

        Object stores get a tiny hidden object written and deleted again, which exercises the
        endpoint, the bucket, the credentials and both permissions the daemon needs.
        """
        if self.is_local:
            raise RuntimeError("probe() is for object stores; preflight checks local folders")
        path = self.join(f"{PROBE_PREFIX}{uuid.uuid4().hex}")
        try:
            self.put(path, pa.py_buffer(b"hm-ingest write probe"))
            self.delete([path])
        except SinkError as exc:
            return str(exc)
        return None

    # -- reading ----------------------------------------------------------------------------------
    def list_files(self, folder: str) -> list[StoredFile]:
        """Every file below ``folder`` (recursively), sorted by path; none when it is missing."""
        infos = self._listed(folder, recursive=True)
        return sorted(
            (
                StoredFile(info.path, info.size or 0, info.mtime_ns)
                for info in infos
                if info.type == pafs.FileType.File
            ),
            key=lambda f: f.path,
        )

    def list_folders(self, folder: str) -> list[str]:
        """The direct sub-folders of ``folder`` (partitions of a table), sorted."""
        infos = self._listed(folder, recursive=False)
        return sorted(info.path for info in infos if info.type == pafs.FileType.Directory)

    def _listed(self, folder: str, *, recursive: bool) -> list[pafs.FileInfo]:
        """What is in ``folder``; nothing when it is missing."""
        selector = pafs.FileSelector(folder, allow_not_found=True, recursive=recursive)
        attempts_left = LIST_ATTEMPTS
        while True:
            try:
                return list(self.filesystem.get_file_info(selector))
            except FileNotFoundError as exc:
                # pyarrow lists a missing folder as empty only if it is still missing when it
                # looks again: a folder created in between (the daemon's first file of a table
                # or partition, beside `hm-ingest compact`) fails the listing. Listed again, it
                # is there.
                attempts_left -= 1
                if not attempts_left:
                    raise self._error("could not list", folder, exc) from exc
            except OSError as exc:
                raise self._error("could not list", folder, exc) from exc

    def existing(self, paths: list[str]) -> list[str]:
        """Those of ``paths`` that exist as files (one metadata request each on object stores)."""
        try:
            infos = self.filesystem.get_file_info(paths)
        except OSError as exc:
            raise self._error("could not look up", self.base, exc) from exc
        return [info.path for info in infos if info.type == pafs.FileType.File]

    def read_table(self, path: str) -> pa.Table:
        try:
            return pq.read_table(path, filesystem=self.filesystem)
        except OSError as exc:
            raise self._error("could not read", path, exc) from exc

    def read_tables(self, paths: list[str]) -> pa.Table:
        """The rows of ``paths`` concatenated in that order, the files fetched concurrently.

        Raises ``pa.ArrowInvalid`` when their schemas differ.
        """
        try:
            dataset = ds.dataset(paths, filesystem=self.filesystem, format="parquet")
            # Fragments keep the order given; to_table() returns their batches in that order.
            return dataset.to_table()
        except OSError as exc:
            raise self._error("could not read", paths[0].rsplit("/", 1)[0], exc) from exc

    # -- writing ----------------------------------------------------------------------------------
    def put(self, path: str, data: pa.Buffer) -> None:
        """Store ``data`` as the complete object ``path`` (object stores only).

        One write of the whole buffer, then close: the store publishes the object at close,
        and only when every byte arrived. Local roots are written by PartitionedWriter instead.
        """
        if self.is_local:
            raise RuntimeError("put() is for object stores; local files are written atomically")
        try:
            with self.filesystem.open_output_stream(path) as stream:
                stream.write(data)
        except OSError as exc:
            raise self._error("could not upload", path, exc) from exc

    def delete(self, paths: Iterable[str]) -> int:
        """Delete ``paths`` (missing ones are skipped); returns how many were deleted.

        Local deletions are made durable (one fsync per folder touched), so a power loss cannot
        bring back a file a later step relies on being gone.
        """
        paths = list(paths)
        if self.is_local:
            deleted = [self._delete_one(path) for path in paths]
            for folder in sorted({path.rsplit("/", 1)[0] for path in paths}):
                _fsync_folder(folder)
        else:
            # One request (or two) per object, each a round trip: overlap them.
            with ThreadPoolExecutor(max_workers=DELETE_CONCURRENCY) as pool:
                deleted = list(pool.map(self._delete_one, paths))
        return sum(deleted)

    def _delete_one(self, path: str) -> bool:
        try:
            self.filesystem.delete_file(path)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise self._error("could not delete", path, exc) from exc
        return True

    def _error(self, action: str, path: str, exc: OSError) -> SinkError:
        where = self.describe(path)
        if self.is_local:
            return SinkError(f"{action} {where}: {exc.strerror or exc}", retriable=True)
        return SinkError(
            f"{action} {where}: {exc}; check that the store is reachable and that the "
            "credentials in the environment may list, read, write and delete there",
            retriable=True,
        )


def _fsync_folder(folder: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _tuned(uri: str) -> str:
    """``uri`` with pyarrow options that suit whole-object uploads, unless the user set them.

    S3 ``allow_delayed_open``: an object smaller than one multipart part (most batch files) goes
    up as one PutObject instead of create-upload, upload-part and complete-upload round trips.
    """
    if not uri.lower().startswith("s3://") or "allow_delayed_open=" in uri:
        return uri
    return f"{uri}{'&' if '?' in uri else '?'}allow_delayed_open=true"


def _without_query(uri: str) -> str:
    return uri.split("?", 1)[0]


__all__ = ["OutputStore", "StoredFile"]
