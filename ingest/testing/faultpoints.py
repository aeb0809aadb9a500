"""Test-only fault points: named places in the storage code where a test can crash or fill the disk.

The fault-injection suite (``tests/faults``) needs to kill the daemon at exact moments that a
random SIGKILL hits too rarely (between writing a Parquet file and renaming it, say), and to make
the output disk "full" on machines where it cannot mount a small filesystem. The storage modules
call :func:`hit` at a few named points, behind the module constant :data:`ACTIVE`::

    if faultpoints.ACTIVE:
        faultpoints.hit("parquet.temp_written")

:data:`ACTIVE` is computed once at import from the environment; in production neither variable
is set, so each point costs one attribute load and a false branch.

``INGEST_TEST_CRASH_AT=<point>:<n>[,<point>:<n>...]``
    SIGKILL this process the ``n``-th time ``point`` is reached (1-based), as a crash would.
``INGEST_TEST_ENOSPC_WHILE=<path>``
    While ``<path>`` exists, points listed in :data:`ENOSPC_POINTS` raise ``OSError(ENOSPC)``.

The names deliberately do not start with ``HM_INGEST_``: the settings loader rejects unknown
variables with that prefix.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
from collections.abc import Mapping

CRASH_ENV = "INGEST_TEST_CRASH_AT"
ENOSPC_ENV = "INGEST_TEST_ENOSPC_WHILE"

# Every point the storage code reaches, in commit order; tests pick from these.
POINTS = (
    "wal.torn_write",  # half of a group's frames written to the segment, not yet fsynced
    "wal.logged",  # a group is durable in the log, its PUBACKs not sent yet
    "checkpoint.temp_written",  # new checkpoint written to its temporary file, not renamed
    "parquet.temp_written",  # a Parquet file complete under its temporary name, not renamed
    "parquet.renamed",  # renamed into place, folder not fsynced, later files not written
    "sink.files_written",  # every file of a batch in place, dedupe index not updated
    "sink.dedupe_recorded",  # dedupe index updated, checkpoint not committed
    "sink.committed",  # checkpoint committed, log segments not released
)
# Points where an injected "disk full" applies (the output side; the log is tested on tmpfs).
ENOSPC_POINTS = frozenset({"parquet.temp_written"})


def _parse_crash(spec: str) -> dict[str, int]:
    targets: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        point, _, count = item.rpartition(":")
        if point not in POINTS or not count.isdigit() or int(count) < 1:
            raise ValueError(
                f"{CRASH_ENV}={spec!r}: {item!r} must be <point>:<n> with n >= 1 and point one "
                f"of {', '.join(POINTS)}"
            )
        targets[point] = int(count)
    return targets


class _Faults:
    def __init__(self, environ: Mapping[str, str]) -> None:
        self.crash_at = _parse_crash(environ.get(CRASH_ENV, ""))
        self.enospc_flag = environ.get(ENOSPC_ENV) or None
        self._hits: dict[str, int] = {}
        self._lock = threading.Lock()

    def crash_due(self, point: str) -> bool:
        target = self.crash_at.get(point)
        if target is None:
            return False
        with self._lock:
            count = self._hits[point] = self._hits.get(point, 0) + 1
        return count == target

    def hit(self, point: str) -> None:
        if self.crash_due(point):
            crash()
        if (
            self.enospc_flag is not None
            and point in ENOSPC_POINTS
            and os.path.exists(self.enospc_flag)
        ):
            raise OSError(errno.ENOSPC, f"No space left on device (injected at {point})")


_FAULTS = _Faults(os.environ)
ACTIVE: bool = bool(_FAULTS.crash_at or _FAULTS.enospc_flag)


def hit(point: str) -> None:
    """Crash or raise here if a test asked for it; see the module docstring."""
    _FAULTS.hit(point)


def crash_due(point: str) -> bool:
    """Count one pass through ``point``; True when this is the pass to crash at.

    For points that must do part of their work first (a torn write), then call :func:`crash`.
    """
    return _FAULTS.crash_due(point)


def crash() -> None:
    """SIGKILL this process: nothing runs on the way out (no finally, no atexit), as in a crash."""
    os.kill(os.getpid(), signal.SIGKILL)
