"""Free space of the filesystems the daemon writes to: ``hm_ingest_volume_available_bytes``.

Two volumes matter: ``state`` (write-ahead log, dedupe index, checkpoint; ``[state] path``) and,
when it is a local folder, ``output`` (the Parquet tables; ``[output] path``). An object-store
output has no volume, so it gets no series. Running out of either stops commits or acks; the gauge
lets an alert fire before that, wherever the daemon runs (kubelet volume metrics exist only on
Kubernetes, and only for persistent volume claims).

The value is what ``shutil.disk_usage`` calls ``free``: bytes an unprivileged process may still
write (``f_bavail``), not counting the root-reserved blocks the daemon cannot use.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Mapping
from pathlib import Path

from prometheus_client import Gauge

from ingest.config import Settings


def watched_volumes(settings: Settings) -> dict[str, Path]:
    """Volume label → the folder whose filesystem it reports."""
    volumes = {"state": settings.state.path}
    if isinstance(settings.output.path, Path):  # an object-store URI is a str
        volumes["output"] = settings.output.path
    return volumes


def available_bytes(path: Path) -> int | None:
    """Free bytes for unprivileged writers on the filesystem that holds (or will hold) ``path``.

    A folder not created yet is measured at its nearest existing parent: that is where it will
    be made. None when even that cannot be read.
    """
    for candidate in (path, *path.absolute().parents):
        try:
            return shutil.disk_usage(candidate).free
        except FileNotFoundError:
            continue
        except OSError:
            return None
    return None


def refresh(gauge: Gauge, volumes: Mapping[str, Path]) -> None:
    """Set one ``volume`` series per folder; drop a series whose filesystem cannot be read, so
    a stale figure is never reported as current."""
    for name, path in volumes.items():
        free = available_bytes(path)
        if free is None:
            with contextlib.suppress(KeyError):
                gauge.remove(name)
        else:
            gauge.labels(name).set(free)
