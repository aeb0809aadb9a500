"""Rules of the table layout that the compactor and careful readers share.

Files are ``part-[<replica>-]<first>-<last>.parquet`` per date partition. Each replica (``""``: a
single daemon) numbers its own ranges, so ranges are compared only between files of the same
replica: overlapping ranges of different replicas are normal and say nothing. Within one replica,
ranges never overlap, except for a moment during compaction: a merged file covering a run of files
is complete before those inputs are deleted, so an input whose range lies *inside* another file's
range of the same replica in the same partition is *superseded* (its rows are in the covering
file). :func:`live_files` is the listing a reader should read to see every row exactly once at any
time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import groupby

from ingest.errors import IngestError
from ingest.parquet import parse_part_file_name
from ingest.storage.store import StoredFile


class OverlappingFilesError(IngestError):
    """Two files of one replica overlap without one lying inside the other (never compaction's)."""


@dataclass(frozen=True, slots=True)
class PartFile:
    """A committed file of a partition: whose it is and its LSN (or transition id) range."""

    stored: StoredFile
    first: int
    last: int
    replica: str = ""

    def inside(self, other: PartFile) -> bool:
        return (
            self is not other
            and self.replica == other.replica
            and other.first <= self.first
            and self.last <= other.last
        )


def part_files(files: Sequence[StoredFile]) -> list[PartFile]:
    """The part files among ``files``, by (replica, first, -last)."""
    parts = []
    for stored in files:
        try:
            replica, first, last = parse_part_file_name(stored.name)
        except ValueError:
            continue
        parts.append(PartFile(stored, first, last, replica))
    return sorted(parts, key=lambda p: (p.replica, p.first, -p.last))


def by_replica(parts: Sequence[PartFile]) -> dict[str, list[PartFile]]:
    """``parts`` grouped by replica, each group in (first, -last) order."""
    ordered = sorted(parts, key=lambda p: (p.replica, p.first, -p.last))
    return {replica: list(group) for replica, group in groupby(ordered, key=lambda p: p.replica)}


def superseded(parts: Sequence[PartFile]) -> list[PartFile]:
    """Files whose range lies inside another file's range of the same replica: merged inputs.

    ``parts`` are the files of one partition. Raises ``OverlappingFilesError`` for partially
    overlapping ranges of one replica, which compaction never makes (they mean that replica's
    state folder was reset, or hand edits).
    """
    gone: list[PartFile] = []
    for group in by_replica(parts).values():
        cover: PartFile | None = None  # the widest range seen so far; the group is by first
        for part in group:
            if cover is not None and part.inside(cover):
                gone.append(part)
                continue
            if cover is not None and part.first <= cover.last:
                raise OverlappingFilesError(
                    f"{part.stored.name} overlaps {cover.stored.name} without lying inside it: "
                    "the state folder of that replica was probably reset (LSNs restarted); "
                    "compaction leaves this partition alone, sort it out by hand"
                )
            cover = part
    return gone


def live_files(files: Sequence[StoredFile]) -> list[StoredFile]:
    """The files a reader should read in one partition: part files minus superseded ones."""
    parts = part_files(files)
    gone = {id(p) for p in superseded(parts)}
    return [p.stored for p in parts if id(p) not in gone]


__all__ = [
    "OverlappingFilesError",
    "PartFile",
    "by_replica",
    "live_files",
    "part_files",
    "superseded",
]
