"""Clocks the emulator reads time from.

Every time-dependent decision in the emulator (token expiry, JWT ``iat`` tolerance, clearance
transitions) asks a :class:`Clock`, so tests can freeze time and jump it forward, not sleep.
Both clocks support :meth:`advance`, so ``POST /_emulator/advance`` also works against a live
emulator started from the command line (e.g. to get past HM's one-day cancellation limit).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Unix time in seconds."""
        ...

    def advance(self, seconds: float) -> None:
        """Move this clock forward; never backwards."""
        ...


class SystemClock:
    """Wall-clock time plus an offset that only grows."""

    def __init__(self) -> None:
        self._offset = 0.0

    def now(self) -> float:
        return time.time() + self._offset

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock cannot go backwards")
        self._offset += seconds


class ManualClock:
    """A frozen clock that moves only when told to: deterministic tests without sleeps."""

    def __init__(self, start: float | None = None) -> None:
        self._now = time.time() if start is None else start

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock cannot go backwards")
        self._now += seconds


def isoformat(ts: float) -> str:
    """ISO 8601 in UTC with microseconds and ``Z``, the form HM's specs show in examples."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
