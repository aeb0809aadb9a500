"""Plain-text tables and a progress line for the operator CLI.

Kept to the standard library on purpose: the values shown are VINs, statuses and short HM
messages (ASCII, narrow), which fixed-width columns show well, and the daemon's image does not
grow a terminal-rendering dependency for one command.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import TextIO

PROGRESS_WIDTH = 30
# Redraw at most this often: a 10,000-VIN sync must not spend its time repainting.
PROGRESS_REDRAW_S = 0.1


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns padded to their widest cell; ``None`` shows as ``-``."""
    cells = [[_text(value) for value in row] for row in rows]
    widths = [len(header) for header in headers]
    for row in cells:
        for i, value in enumerate(row):
            widths[i] = max(widths[i], len(value))
    lines = [_line(headers, widths), _line(["-" * w for w in widths], widths)]
    lines.extend(_line(row, widths) for row in cells)
    return "\n".join(lines)


def _text(value: object) -> str:
    if value is None:
        return "-"
    return str(value).replace("\n", " ")


def _line(values: Sequence[str], widths: Sequence[int]) -> str:
    return "  ".join(
        value.ljust(width) for value, width in zip(values, widths, strict=True)
    ).rstrip()


class ProgressLine:
    """``phase [#####-----] done/total`` redrawn in place on ``stream``, only if it is a TTY.

    Scripts that capture stderr get nothing from it, so they never parse a progress bar.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream or sys.stderr
        self._enabled = self._stream.isatty()
        self._last_draw = 0.0
        self._open = False

    def __call__(self, phase: str, done: int, total: int) -> None:
        if not self._enabled or total <= 0:
            return
        now = time.monotonic()
        finished = done >= total
        if not finished and now - self._last_draw < PROGRESS_REDRAW_S:
            return
        self._last_draw = now
        filled = PROGRESS_WIDTH * done // total
        bar = "#" * filled + "-" * (PROGRESS_WIDTH - filled)
        self._stream.write(f"\r{phase:<7} [{bar}] {done}/{total}")
        self._open = not finished
        if finished:
            self._stream.write("\n")
        self._stream.flush()

    def close(self) -> None:
        """End a line left open by a run that stopped part-way."""
        if self._open:
            self._stream.write("\n")
            self._stream.flush()
            self._open = False
