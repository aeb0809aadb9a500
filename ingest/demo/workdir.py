"""The demo's output folder: created, or cleared of what an earlier demo left (and only that)."""

from __future__ import annotations

import shutil
from pathlib import Path

# Written into the folder on first use: only a folder carrying it is ever cleared by a later run.
MARKER = ".hm-demo"
OWNED = (
    "certs", "broker", "emulator", "state", "data", "fleet.csv", "hm-ingest.toml", "daemon.log",
    "emulator.json", "emulator.log", "summary.json",
)  # fmt: skip


class WorkdirError(Exception):
    """The output folder cannot be used; the message says why and what to pass instead."""


def prepare(out: Path) -> Path:
    """Create ``out`` or clear an earlier demo's files from it; returns it resolved."""
    if out.exists() and not out.is_dir():
        raise WorkdirError(f"{out} is a file; pass a folder with --output")
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise WorkdirError(
            f"{out} exists, is not empty and was not made by hm-ingest demo; "
            "pass an empty or new folder with --output"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by hm-ingest demo; safe to delete\n")
    for name in OWNED:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    return out.resolve()
