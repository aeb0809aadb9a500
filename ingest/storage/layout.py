"""Rules of the table layout that the compactor and careful readers share.

Files are ``part-<first>-<last>.parquet`` per date partition, with LSN (or transition id) ranges
that never overlap, except for a moment during compaction: a merged file covering a run of files
is complete before those inputs are deleted, so an input whose range lies *inside* another file's
range in the same partition is *superseded* (its rows are in the covering file).
:func:`live_files` is the listing a reader should read to see every row exactly once at any time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ingest.errors import IngestError
from ingest.parquet import parse_part_file_name
from ingest.storage.store import StoredFile


class OverlappingFilesError(IngestError):
    """Two files' ranges overlap without one lying inside the other (never made by compaction)."""


@dataclass(frozen=True, slots=True)
class PartFile:
    """A committed file of a partition and its LSN (or transition id) range."""

    stored: StoredFile
    first: int
    last: int

    def inside(self, other: PartFile) -> bool:
        return self is not other and other.first <= self.first and self.last <= other.last


def part_files(files: Sequence[StoredFile]) -> list[PartFile]:
    """The ``part-<first>-<last>.parquet`` files among ``files``, by (first, -last)."""
    parts = []
    for stored in files:
        try:
            first, last = parse_part_file_name(stored.name)
        except ValueError:
            continue
        parts.append(PartFile(stored, first, last))
    return sorted(parts, key=lambda p: (p.first, -p.last))


def superseded(parts: Sequence[PartFile]) -> list[PartFile]:
    """Files whose range lies inside another file's range: inputs of an already-merged file.

    Raises ``OverlappingFilesError`` for partially overlapping ranges, which compaction never
    makes (they mean the state folder was reset, or hand edits).
    """
    gone: list[PartFile] = []
    cover: PartFile | None = None  # the widest range seen so far; parts are sorted by first
    for part in parts:
        if cover is not None and part.inside(cover):
            gone.append(part)
            continue
        if cover is not None and part.first <= cover.last:
            raise OverlappingFilesError(
                f"{part.stored.name} overlaps {cover.stored.name} without lying inside it: "
                "the state folder was probably reset (LSNs restarted); compaction leaves this "
                "partition alone, sort it out by hand"
            )
        cover = part
    return gone


def live_files(files: Sequence[StoredFile]) -> list[StoredFile]:
    """The files a reader should read in one partition: part files minus superseded ones."""
    parts = part_files(files)
    gone = {id(p) for p in superseded(parts)}
    return [p.stored for p in parts if id(p) not in gone]


__all__ = ["OverlappingFilesError", "PartFile", "live_files", "part_files", "superseded"]
