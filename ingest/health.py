"""Liveness and readiness, computed from heartbeats rather than answered as a constant 200.

``/healthz`` (liveness) fails when the event loop or a pipeline thread has stopped beating: a
wedged process that an orchestrator should restart. ``/readyz`` (readiness) fails while the daemon
is not connected and subscribed, or the sink cannot write: it is alive but not doing its job.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

# A pipeline thread beats at least every POLL_S (0.1 s) and during retries; the event loop every
# HEARTBEAT_S. Ten seconds of silence means something is stuck, not merely busy with a big flush.
STALE_AFTER_S = 10.0
HEARTBEAT_S = 1.0


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    checks: dict[str, str]


@dataclass
class HealthState:
    """Named probes. Each returns None when fine, else a short human-readable problem."""

    liveness: dict[str, Callable[[], str | None]] = field(default_factory=dict)
    readiness: dict[str, Callable[[], str | None]] = field(default_factory=dict)
    loop_beat: float = field(default_factory=time.monotonic)

    def beat(self) -> None:
        self.loop_beat = time.monotonic()

    def live(self) -> Verdict:
        return _run({"event_loop": self._loop_fresh, **self.liveness})

    def ready(self) -> Verdict:
        return _run({**self.liveness, **self.readiness})

    def _loop_fresh(self) -> str | None:
        return stale("event loop", self.loop_beat)


def stale(name: str, beat: float) -> str | None:
    silent = time.monotonic() - beat
    if silent > STALE_AFTER_S:
        return f"{name} has not made progress for {silent:.0f} s"
    return None


def _run(probes: dict[str, Callable[[], str | None]]) -> Verdict:
    checks: dict[str, str] = {}
    ok = True
    for name, probe in probes.items():
        problem = probe()
        checks[name] = problem or "ok"
        ok = ok and problem is None
    return Verdict(ok, checks)
